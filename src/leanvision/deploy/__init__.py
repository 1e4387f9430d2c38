"""Inference-time transformations: batch-norm folding, pointwise convolutions, fused RRR-Net inference."""

from leanvision.deploy.fold import fold_batchnorm_, fuse_for_inference, use_pointwise_convs_
from leanvision.deploy.fused_rrr import FusedRRRNet

__all__ = ["FusedRRRNet", "fold_batchnorm_", "fuse_for_inference", "use_pointwise_convs_"]
