"""RNNPool-Face detectors (S3FD with an RNNPool stem): models, priors, matching, loss, post-processing."""

from leanvision.models.face.nets import DETECTORS, DetectionHead, L2Norm, RNNPoolFace, Source

__all__ = ["DETECTORS", "DetectionHead", "L2Norm", "RNNPoolFace", "Source"]
