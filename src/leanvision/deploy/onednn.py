"""Convolutions on weights packed once per input shape: with the residual add and ReLU in one oneDNN call
(conv_add_relu, fused RRR-Net inference), or alone without a bias (conv_unbiased, the row bands of
streaming inference, where F.conv2d's reorder of the weights on every call costs more than the band).

torch exposes this only through private ops (torch.ops.mkldnn._convolution_pointwise and
_reorder_convolution_weight, what inductor's freezing pass emits). Their signatures are not a public
contract, so they are used only on the torch releases they were checked on; everywhere else, and off the
CPU, the same result comes from plain conv, add and relu.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

CHECKED_TORCH = ((2, 9), (2, 14))  # oldest and newest minor releases the private ops were checked on
MAX_PACKED_SHAPES = 8  # packed weights kept per convolution, least recently used dropped first


@functools.cache
def private_ops_usable() -> bool:
    """Whether this torch build has oneDNN and a release whose private convolution ops are known."""
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return (
        CHECKED_TORCH[0] <= (major, minor) <= CHECKED_TORCH[1]
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")
    )


class PackedWeights:
    """Input shape -> the convolution's weight reordered into oneDNN's blocked layout, at most
    MAX_PACKED_SHAPES of them. A copy starts empty: packed tensors cannot be copied."""

    def __init__(self, max_shapes: int = MAX_PACKED_SHAPES) -> None:
        self.max_shapes = max_shapes
        self._by_shape: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_shape)

    def __deepcopy__(self, memo: dict) -> PackedWeights:
        return PackedWeights(self.max_shapes)

    def get(self, conv: nn.Conv2d, shape: torch.Size, padding: tuple[int, int] | None = None) -> torch.Tensor:
        """The weight packed for inputs of `shape` and `padding` (default the conv's own)."""
        args = _conv_args(conv, padding)
        key = (shape, tuple(args[0]))
        weight = self._by_shape.get(key)
        if weight is None:
            weight = torch.ops.mkldnn._reorder_convolution_weight(conv.weight, *args, list(shape))
            self._by_shape[key] = weight
            if len(self._by_shape) > self.max_shapes:
                self._by_shape.popitem(last=False)
        else:
            self._by_shape.move_to_end(key)
        return weight


def _conv_args(
    conv: nn.Conv2d, padding: tuple[int, int] | None = None
) -> tuple[list[int], list[int], list[int], int]:
    return (
        list(conv.padding if padding is None else padding),
        list(conv.stride),
        list(conv.dilation),
        conv.groups,
    )


def conv_unbiased(
    conv: nn.Conv2d, x: torch.Tensor, padding: tuple[int, int], packed: PackedWeights
) -> torch.Tensor:
    """F.conv2d(x, conv.weight, None, conv.stride, padding, ...) on the weight packed once per input shape
    and padding: a convolution of a few rows costs about a pass over its weights, which F.conv2d reorders
    into oneDNN's layout on every call (2-3x the convolution itself for ResNet's 256-channel 3x3 convs)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or not private_ops_usable():
        return F.conv2d(x, conv.weight, None, conv.stride, padding, conv.dilation, conv.groups)
    weight = packed.get(conv, x.shape, padding)
    return torch.ops.mkldnn._convolution_pointwise(
        x, weight, None, *_conv_args(conv, padding), "none", [], ""
    )


def conv_add_relu(
    conv: nn.Conv2d,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    relu: bool,
    packed: PackedWeights,
) -> torch.Tensor:
    """relu?(conv(x) + residual?): one oneDNN primitive with post-ops where usable, else plain ops."""
    if x.device.type != "cpu" or not private_ops_usable():
        y = conv(x) if residual is None else conv(x) + residual
        return F.relu(y) if relu else y
    weight, args = packed.get(conv, x.shape), _conv_args(conv)
    if residual is None:
        unary = "relu" if relu else "none"
        return torch.ops.mkldnn._convolution_pointwise(x, weight, conv.bias, *args, unary, [], "")
    unary = "relu" if relu else None  # the binary form takes None, not "none"
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, residual, weight, conv.bias, *args, "add", None, unary, [], ""
    )
