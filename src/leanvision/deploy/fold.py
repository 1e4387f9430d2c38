"""Inference-only rewrite of a model: BatchNorm folded into its convolution, fastest CPU memory layout.

Folding rule (no tracing): in every module, walk the direct children in registration order; a child of
exact type nn.Conv2d immediately followed by a child of exact type nn.BatchNorm2d over as many channels,
with running statistics, is replaced by one convolution computing conv -> BN, and the BN by nn.Identity.
This relies on the parent's forward applying that BN straight to that conv's output and using the raw
conv output nowhere else: always true for nn.Sequential (torchvision's Conv2dNormActivation, the
InvertedResidual tail) and true by construction for ConvNormAct, SqueezeExcite (fc1 -> bn) and the
ClassifierHead hidden layer here, as for timm's and torchvision's modules. Exact types keep subclasses
whose forward differs (weight-standardised convs, BN with a built-in activation) out of the rule.

Then modules that define `fuse_for_inference_()` rewrite themselves (a face detector's head runs its loc
and conf branches as one convolution), and every plain 1x1 convolution becomes a PointwiseConv: a GEMM
over the pixels when the map is small.

channels_last stores 4-D weights NHWC, so oneDNN runs the convolutions (depthwise ones especially) on NHWC
activations directly instead of reordering them around every call. TorchScript freezing and prepacked
oneDNN weights are not used; torch.compile on top is left to the caller
(`leanvision.bench.benchmark(..., deploy=True, compile=True)`). README "Bench" gives the measured gains.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from leanvision.errors import InvalidArgumentError


class PointwiseConv(nn.Conv2d):
    """A 1x1, stride-1, ungrouped convolution that runs as one GEMM over the pixels when the map is small.

    On an NHWC (channels_last) tensor a 1x1 convolution is a matrix product of [pixels, C_in] by
    [C_in, C_out]. For small maps (squeeze-excite vectors, 7x7 and 14x14 stages at batch 1) oneDNN's
    per-call set-up dominates and the plain GEMM is faster; above `max_pixels` the convolution wins.
    Same parameters and state_dict keys as the Conv2d it replaces.
    """

    max_pixels = 256

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if n * h * w > self.max_pixels:
            return super().forward(x)
        y = nn.functional.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias)
        return y.permute(0, 3, 1, 2)


def _as_pointwise(conv: nn.Conv2d) -> PointwiseConv:
    pointwise = PointwiseConv(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None)
    pointwise.load_state_dict(conv.state_dict())
    return pointwise


def _is_pointwise(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def use_pointwise_convs_(model: nn.Module) -> int:
    """Replace, in place, every plain 1x1 convolution by an equivalent PointwiseConv; returns how many."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_pointwise(child):
                setattr(parent, name, _as_pointwise(child))
                replaced += 1
    return replaced


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and type(bn) is nn.BatchNorm2d
        and bn.num_features == conv.out_channels
        and bn.running_mean is not None
        and bn.running_var is not None
    )


def fold_batchnorm_(model: nn.Module) -> int:
    """Fold, in place, every Conv2d -> BatchNorm2d pair found by the rule above; returns how many.

    `model` must be in eval mode: the folded convolution reproduces the BN's running-statistics output.
    """
    folded = 0
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if _foldable(conv, bn):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(parent, bn_name, nn.Identity())
                folded += 1
    return folded


def check_built_model(model: object, function: str) -> None:
    """Raise an InvalidArgumentError unless `model` is an nn.Module (a name is a common slip)."""
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(
            f"{function} takes a built model (leanvision.create_model(name).eval()), got {model!r}"
        )


def fuse_for_inference(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """A new eval-mode copy of `model` with BatchNorm folded into convolutions; `model` is left unchanged.

    With `channels_last=True` the 4-D weights are stored NHWC, so convolutions produce channels_last
    outputs whatever the input layout (feeding channels_last inputs saves one conversion). Plain 1x1
    convolutions become PointwiseConv; modules with a `fuse_for_inference_` method rewrite themselves.
    Outputs equal the eval-mode original's to float rounding.
    """
    check_built_model(model, "fuse_for_inference")
    fused = copy.deepcopy(model).eval()
    fold_batchnorm_(fused)
    for module in list(fused.modules()):
        if hasattr(module, "fuse_for_inference_"):
            module.fuse_for_inference_()
    use_pointwise_convs_(fused)
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
    return fused
