"""Inference forms of a model: batch-norm folding, ahead-of-time compilation, fused RRR-Net inference,
streaming in the reported RAM (and patch-based inference of a plain CNN's first blocks)."""

from leanvision.deploy.aot import AotModel, aot_compile
from leanvision.deploy.fold import fold_batchnorm_, fuse_for_inference, use_pointwise_convs_
from leanvision.deploy.fused_rrr import FusedRRRNet
from leanvision.deploy.patch_based import PatchBasedModel
from leanvision.deploy.streaming import StreamedModel, stream

__all__ = [
    "AotModel",
    "FusedRRRNet",
    "PatchBasedModel",
    "StreamedModel",
    "aot_compile",
    "fold_batchnorm_",
    "fuse_for_inference",
    "stream",
    "use_pointwise_convs_",
]
