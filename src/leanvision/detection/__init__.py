"""Face detection around the RNNPool-Face detectors: WIDER FACE AP (evaluation)."""

from leanvision.detection.evaluation import few_faces_subsets, size_subsets, subsets_from_targets, wider_ap

__all__ = ["few_faces_subsets", "size_subsets", "subsets_from_targets", "wider_ap"]
