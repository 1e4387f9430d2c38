"""Rows or columns of a map and the spans convolutions read: the receptive-field arithmetic of the
band, patch-group and patch executors (streamed_rnnpool, lean_blocks, patch_based)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Span:
    """Rows (or columns) [start, stop) of a map, which may reach past its edges into zero padding."""

    start: int
    stop: int

    def clip(self, size: int) -> tuple[Span, int, int]:
        """The part inside [0, size), and how much padding lies before and after it."""
        inside = Span(max(self.start, 0), min(self.stop, size))
        return inside, inside.start - self.start, self.stop - inside.stop

    def through_conv(self, conv: nn.Conv2d, axis: int = 0) -> Span:
        """The input span `conv` reads along `axis` (0 rows, 1 columns) to produce this output span."""
        return self.through(
            conv.kernel_size[axis], conv.stride[axis], conv.padding[axis], conv.dilation[axis]
        )

    def through(self, kernel: int, stride: int, padding: int, dilation: int) -> Span:
        """The input span a convolution reads to produce this output span."""
        start = self.start * stride - padding
        return Span(start, (self.stop - 1) * stride - padding + dilation * (kernel - 1) + 1)


def conv_out(size: int, conv: nn.Conv2d, axis: int) -> int:
    """Output size of `conv` along `axis` (0 rows, 1 columns) for an input of `size`."""
    k, s, p, d = conv.kernel_size[axis], conv.stride[axis], conv.padding[axis], conv.dilation[axis]
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def pad_zeros(x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """F.pad with zeros, without the copy F.pad makes when there is nothing to pad."""
    return F.pad(x, pads) if any(pads) else x
