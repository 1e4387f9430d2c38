"""Streaming inference: run an RNNPool network in the RAM that its memory analysis reports.

`stream(model, input_size)` returns a StreamedModel, an inference-only copy of `model` with the same output,
in which
- the layers before the first RNNPoolLayer and the layer itself run patch group by patch group
  (StreamedRNNPool): for each group of neighbouring patches of one patch row, the stem layers compute only
  the input region those patches read (receptive fields, recomputing the overlap of neighbouring groups),
  RNN1 and RNN2 pool it, and the pooled values are written into the output map. No map of the stem's
  resolution is ever whole;
- inverted-residual blocks (torchvision's InvertedResidual, leanvision's LinearBottleneck without SE and
  DepthwiseSeparable) run channel group by channel group (ChunkedBottleneck): expand -> depthwise for a
  group of the expanded channels, then that group's share of the projection is added into the output. The
  expanded map is never whole: the block holds its input, its output and one group, the layer
  convention's "input + output";
- every other layer runs as it is.
Batch 1 is the target; larger batches run image by image.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair
from torch.utils._pytree import tree_flatten
from torchvision.models import densenet
from torchvision.models.efficientnet import MBConv
from torchvision.models.googlenet import BasicConv2d
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock
from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation

from leanvision.errors import InvalidArgumentError
from leanvision.layers import LinearBottleneck, RNNPoolLayer
from leanvision.layers.rnn_cells import INDEXED_LANES

if TYPE_CHECKING:
    from leanvision.deploy.patch_based import PatchBasedModel

IndexedSweep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [C, S], index [T, N]) -> [h, N]

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.Tanh)
ELEMENTWISE = (*ACTIVATIONS, nn.Identity, nn.BatchNorm2d)


@dataclass(frozen=True)
class _Span:
    """Rows (or columns) [start, stop) of a map, which may reach past its edges into zero padding."""

    start: int
    stop: int

    def clip(self, size: int) -> tuple[_Span, int, int]:
        """The part inside [0, size), and how much padding lies before and after it."""
        inside = _Span(max(self.start, 0), min(self.stop, size))
        return inside, inside.start - self.start, self.stop - inside.stop

    def through_conv(self, conv: nn.Conv2d, axis: int = 0) -> _Span:
        """The input span `conv` reads along `axis` (0 rows, 1 columns) to produce this output span."""
        return self.through(
            conv.kernel_size[axis], conv.stride[axis], conv.padding[axis], conv.dilation[axis]
        )

    def through(self, kernel: int, stride: int, padding: int, dilation: int) -> _Span:
        """The input span a convolution reads to produce this output span."""
        start = self.start * stride - padding
        return _Span(start, (self.stop - 1) * stride - padding + dilation * (kernel - 1) + 1)


def _conv_out(size: int, conv: nn.Conv2d, axis: int) -> int:
    """Output size of `conv` along `axis` (0 rows, 1 columns) for an input of `size`."""
    k, s, p, d = conv.kernel_size[axis], conv.stride[axis], conv.padding[axis], conv.dilation[axis]
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _pad(x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """F.pad with zeros, without the copy F.pad makes when there is nothing to pad."""
    return F.pad(x, pads) if any(pads) else x


def _fused(prefix: Sequence[nn.Module]) -> list[nn.Module]:
    """The prefix with every convolution [-> BatchNorm] [-> activation] as one InPlaceConv (so that its
    output is the only map it makes), other layers as they are."""
    layers, i = [], 0
    while i < len(prefix):
        layer, i = prefix[i], i + 1
        if not isinstance(layer, nn.Conv2d):
            layers.append(layer)
            continue
        bn = prefix[i] if i < len(prefix) and isinstance(prefix[i], nn.BatchNorm2d) else None
        i += bn is not None
        act = prefix[i] if i < len(prefix) and isinstance(prefix[i], ACTIVATIONS) else nn.Identity()
        i += not isinstance(act, nn.Identity)
        layers.append(InPlaceConv(ConvStep(layer, bn, act)))
    return layers


def _sweep_indexed(sweep: IndexedSweep, x: torch.Tensor, indices: list[torch.Tensor]) -> torch.Tensor:
    """A cell's inference_sweep over the sequences of every index [T, n] side by side -> [hidden, sum of
    n]; one sweep when all have the same length."""
    if all(len(index) == len(indices[0]) for index in indices):
        return sweep(x, torch.cat(indices, 1))
    return torch.cat([sweep(x, index) for index in indices], 1)


class StreamedRNNPool(nn.Module):
    """`prefix` (convolutions and elementwise layers, in order) followed by `pool`, computed patch group by
    patch group so that only one group's input region of the prefix output is alive at a time."""

    def __init__(self, prefix: Sequence[nn.Module], pool: RNNPoolLayer, patches_per_group: int) -> None:
        super().__init__()
        for layer in prefix:
            if not isinstance(layer, (nn.Conv2d, *ELEMENTWISE)):
                raise InvalidArgumentError(
                    f"streaming supports convolutions and elementwise layers before the RNNPoolLayer, "
                    f"got {type(layer).__name__}"
                )
        if patches_per_group < 1:
            raise InvalidArgumentError(f"patches_per_group must be >= 1, got {patches_per_group}")
        self.prefix, self.pool, self.patches_per_group = (
            nn.ModuleList(_fused(prefix)),
            pool,
            patches_per_group,
        )
        self._index_cache: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._sweeps = pool.pool.rnn1.inference_sweep(), pool.pool.rnn2.inference_sweep()

    def _sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """(H, W) of the input of every prefix layer, and of the pool's input last."""
        sizes = [(height, width)]
        for layer in self.prefix:
            if isinstance(layer, InPlaceConv):
                height, width = _conv_out(height, layer.conv, 0), _conv_out(width, layer.conv, 1)
            sizes.append((height, width))
        return sizes

    def group_bytes(self, patches: int) -> int:
        """fp32 bytes alive while a group of `patches` neighbouring patches runs (its input region is
        computed, then pooled): the largest input + output region of a prefix layer, or the pool's region
        with RNN1's summaries, RNN2's states and the per-thread scratch of the sweeps."""
        (kh, kw), (_, sw) = self.pool.patch_size, self.pool.stride
        rnn1, h1, h2 = self.pool.pool.rnn1, self.pool.pool.hidden1, self.pool.pool.hidden2
        rows, cols, channels = _Span(0, kh), _Span(0, (patches - 1) * sw + kw), rnn1.input_size
        width = cols.stop
        floats = channels * kh * width + h1 * (kh * patches + width) + 2 * 4 * h2 * patches
        floats += (
            torch.get_num_threads() * INDEXED_LANES * max(channels + 4 * h1, h1 + 4 * h2)
        )  # sweeps' scratch
        for layer in reversed(self.prefix):
            if isinstance(layer, InPlaceConv):
                out_area, conv = (rows.stop - rows.start) * (cols.stop - cols.start), layer.conv
                rows, cols = rows.through_conv(conv, 0), cols.through_conv(conv, 1)
                in_area = (rows.stop - rows.start) * (cols.stop - cols.start)
                floats = max(floats, conv.in_channels * in_area + conv.out_channels * out_area)
        return 4 * floats

    def _region(self, x: torch.Tensor, depth: int, rows: _Span, cols: _Span, sizes) -> torch.Tensor:
        """Output of the first `depth` prefix layers on rows x cols (inside that output's bounds)."""
        if depth == 0:
            return x[:, :, rows.start : rows.stop, cols.start : cols.stop]
        layer = self.prefix[depth - 1]
        if not isinstance(layer, InPlaceConv):
            return layer(self._region(x, depth - 1, rows, cols, sizes))
        (in_rows, top, bottom), (in_cols, left, right) = (
            span.through_conv(layer.conv, axis).clip(size)
            for axis, (span, size) in enumerate(zip((rows, cols), sizes[depth - 1]))
        )
        inner = _pad(self._region(x, depth - 1, in_rows, in_cols, sizes), (left, right, top, bottom))
        return layer(inner, padding=(0, 0))

    def _indices(self, width: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Where the sweeps of one patch row's region [C, kh, width] read their steps (sweep_indexed):
        RNN1's row segments ([kw, kh n]: row y of patch j at step t is column y width + j sw + t of the
        region) and columns ([kh, width]); RNN2's row summaries forwards and backwards ([kh, n]) and column
        summaries ([kw, n]), as columns of RNN1's outputs [h1, kh n + width]. Cached per width."""
        if width not in self._index_cache:
            (kh, kw), (_, sw) = self.pool.patch_size, self.pool.stride
            n, t_row, t_col = (width - kw) // sw + 1, torch.arange(kw)[:, None], torch.arange(kh)[:, None]
            starts = (torch.arange(kh)[:, None] * width + torch.arange(n) * sw).view(1, -1)
            rnn1 = [t_row + starts, t_col * width + torch.arange(width)]
            rows, cols = t_col * n + torch.arange(n), kh * n + torch.arange(n) * sw + t_row
            self._index_cache[width] = rnn1, [rows, rows.flip(0), cols, cols.flip(0)]
        return self._index_cache[width]

    def _pool_patches(self, region: torch.Tensor) -> torch.Tensor:
        """RNNPool of the patches side by side in one patch row's region [1, C, kh, width] -> [4 h2, n].

        As rnnpool_map, RNN1 runs once over every row segment and every column of the region; the sweeps
        read their inputs in place (sweep_indexed), so nothing but the region and the states is alive."""
        (rnn1, rnn2), h2 = self._sweeps, self.pool.pool.hidden2
        rnn1_index, rnn2_index = self._indices(region.shape[3])
        summaries = _sweep_indexed(rnn1, region.reshape(region.shape[1], -1), rnn1_index)
        pooled = _sweep_indexed(rnn2, summaries, rnn2_index)  # [h2, 4 n]: rows fwd, bwd, cols fwd, bwd
        return pooled.view(h2, 4, -1).transpose(0, 1).reshape(4 * h2, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            return torch.cat([self(image[None]) for image in x])
        pool, (kh, kw), (sh, sw) = self.pool, self.pool.patch_size, self.pool.stride
        sizes = self._sizes(x.shape[2], x.shape[3])
        height, width = sizes[-1]
        oh, ow = pool.output_size(height, width)
        extra = 1 if pool.padding == "edgeml" else 0
        out = x.new_empty(x.shape[0], pool.out_channels, oh, ow)
        top = left = 0
        if pool.padding == "same":  # the zero padding RNNPoolLayer adds: evenly, extra at the bottom/right
            top, left = max((oh - 1) * sh + kh - height, 0) // 2, max((ow - 1) * sw + kw - width, 0) // 2
        valid_h, valid_w = oh - extra, ow - extra
        for i in range(valid_h):
            rows = _Span(i * sh - top, i * sh - top + kh)
            for j0 in range(0, valid_w, self.patches_per_group):
                j1 = min(j0 + self.patches_per_group, valid_w)
                cols = _Span(j0 * sw - left, (j1 - 1) * sw - left + kw)
                (in_rows, pad_t, pad_b), (in_cols, pad_l, pad_r) = rows.clip(height), cols.clip(width)
                region = self._region(x, len(self.prefix), in_rows, in_cols, sizes)
                out[0, :, i, j0:j1] = self._pool_patches(_pad(region, (pad_l, pad_r, pad_t, pad_b)))
                del region  # not alive while the next group's region is computed
        if extra:  # "edgeml": one replicated row at the bottom and column at the right
            out[:, :, :valid_h, valid_w] = out[:, :, :valid_h, valid_w - 1]
            out[:, :, valid_h] = out[:, :, valid_h - 1]
        return out


@dataclass(frozen=True)
class ConvStep:
    """A convolution, the BatchNorm after it (or None) and the activation after that."""

    conv: nn.Conv2d
    bn: nn.BatchNorm2d | None
    act: nn.Module

    def affine(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-channel (offset, scale, shift) of the conv bias and eval-mode BN, applied to the convolution
        without its bias as (y + offset) * scale + shift: the order of BN's own (y - mean) * ... + beta.

        Kept apart from the weights, not folded into them: folding (and scaling before subtracting the
        mean) reorders the rounding, which moves the outputs beyond 1e-5 of the eager model's."""
        conv, bn = self.conv, self.bn
        bias = conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)
        if bn is None:
            return bias, torch.ones_like(bias), torch.zeros_like(bias)
        return _norm_affine(bn, bias)


def _norm_affine(bn: nn.BatchNorm2d, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(offset, scale, shift) of eval-mode `bn` after a bias: (y + offset) * scale + shift."""
    return bias - bn.running_mean, bn.weight / torch.sqrt(bn.running_var + bn.eps), bn.bias


@dataclass
class _Chunk:
    """One group of expanded channels [start, stop): its slices of the weights and affines."""

    start: int
    stop: int
    expand: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # weight [g, C_in], scale, shift [g, 1]
    depthwise: tuple[
        torch.Tensor, torch.Tensor, torch.Tensor
    ]  # weight [g, 1, k, k], scale, shift [1, g, 1, 1]
    project_weight: torch.Tensor  # [C_out, g]


class ChunkedBottleneck(nn.Module):
    """[1x1 expand, BN, act] -> depthwise, BN, act [-> squeeze-excite -> act] -> 1x1 project, BN, act
    [+ shortcut], one group of expanded channels at a time: each group's share of the projection is added
    into the output, so the expanded and depthwise maps are never whole (batch 1 runs as matrix products).

    `se` maps the depthwise output's channel means [1, C, 1, 1] to its channel scales: the means need
    every group, so with an SE the groups run twice (means first, then scale and project), recomputing
    the expansion and the depthwise conv. `post_se_act` follows the scaling (ReXNet's dw activation).
    `shortcut`: "none", "add" (input + output) or "partial" (the input added to the first input-width
    output channels, ReXNet's zero-padded shortcut).
    """

    def __init__(
        self,
        expand: ConvStep | None,
        depthwise: ConvStep,
        project: ConvStep,
        shortcut: str,
        group: int,
        se: Callable[[torch.Tensor], torch.Tensor] | None = None,
        post_se_act: nn.Module | None = None,
    ) -> None:
        super().__init__()
        dw, pw = depthwise.conv, project.conv
        if (
            dw.groups != dw.in_channels
            or pw.kernel_size != (1, 1)
            or (expand and expand.conv.kernel_size != (1, 1))
        ):
            raise InvalidArgumentError(
                "ChunkedBottleneck needs 1x1 expand and project convs around a depthwise one"
            )
        if shortcut not in ("none", "add", "partial") or group < 1:
            raise InvalidArgumentError(
                f"need shortcut none/add/partial and group >= 1, got {shortcut!r}, {group}"
            )
        self.shortcut, self.stride, self.padding, self.dilation = shortcut, dw.stride, dw.padding, dw.dilation
        self.expand_act = expand.act if expand else nn.Identity()
        self.dw_act, self.project_act = depthwise.act, project.act
        self.se, self.post_se_act = se, post_se_act or nn.Identity()
        with torch.no_grad():
            self.project_affine = tuple(t[:, None].clone() for t in project.affine())
            dw_affine, ex_affine = depthwise.affine(), expand.affine() if expand else None
            self.chunks = []
            for start in range(0, dw.in_channels, group):
                part = slice(start, min(start + group, dw.in_channels))
                expand_part = None
                if expand is not None:
                    weight = expand.conv.weight[part, :, 0, 0]
                    expand_part = (weight.clone(), *(t[part, None].clone() for t in ex_affine))
                depthwise_part = (
                    dw.weight[part].clone(),
                    *(t[None, part, None, None].clone() for t in dw_affine),
                )
                self.chunks.append(
                    _Chunk(
                        part.start, part.stop, expand_part, depthwise_part, pw.weight[:, part, 0, 0].clone()
                    )
                )

    def _depthwise(self, chunk: _Chunk, x: torch.Tensor) -> torch.Tensor:
        """The chunk's expanded channels after the depthwise conv, BN and act: [1, group, H', W']."""
        if chunk.expand is None:
            e = x[:, chunk.start : chunk.stop]
        else:
            weight, offset, scale, shift = chunk.expand
            e = torch.mm(weight, x.view(x.shape[1], -1)).add_(offset).mul_(scale).add_(shift)
            e = self.expand_act(e).view(1, -1, *x.shape[2:])
        weight, offset, scale, shift = chunk.depthwise
        d = F.conv2d(e, weight, None, self.stride, self.padding, self.dilation, len(weight))
        return self.dw_act(d.add_(offset).mul_(scale).add_(shift))

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        scales = None
        if self.se is not None:  # first pass: the channel means the squeeze-excite needs
            means = torch.cat(
                [self._depthwise(chunk, x).mean((2, 3), keepdim=True) for chunk in self.chunks], 1
            )
            scales = self.se(means)
        out = None
        for chunk in self.chunks:
            d = self._depthwise(chunk, x)
            if scales is not None:
                d = d.mul_(scales[:, chunk.start : chunk.stop])
            d = self.post_se_act(d)
            if out is None:
                out_size = d.shape[2:]
                out = torch.mm(chunk.project_weight, d.view(d.shape[1], -1))
            else:
                out.addmm_(chunk.project_weight, d.view(d.shape[1], -1))
            del d
        offset, scale, shift = self.project_affine
        out = self.project_act(out.add_(offset).mul_(scale).add_(shift))
        x2d = x.view(x.shape[1], -1)
        if self.shortcut == "add":
            out += x2d
        elif self.shortcut == "partial":
            out[: x.shape[1]] += x2d
        return out.view(1, -1, *out_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return self._one(x)
        return torch.cat([self._one(image[None]) for image in x])


@dataclass(frozen=True)
class _Rows:
    """Rows [start, start + tensor.shape[2]) of a map `height` rows high."""

    tensor: torch.Tensor
    start: int
    height: int


def _conv_rows(layer: InPlaceConv, rows: _Rows, out: _Span, out_height: int) -> _Rows:
    """Rows `out` (inside [0, out_height)) of layer(map), from the rows of the map that `rows` holds."""
    inside, top, bottom = out.through_conv(layer.conv).clip(rows.height)
    if inside.start < rows.start or inside.stop > rows.start + rows.tensor.shape[2]:
        raise AssertionError(f"rows {inside} of the input are needed, {rows.start}.. are held")
    x = F.pad(rows.tensor[:, :, inside.start - rows.start : inside.stop - rows.start], (0, 0, top, bottom))
    return _Rows(layer(x, padding=(0, layer.conv.padding[1])), out.start, out_height)


class BandedBasicBlock(nn.Module):
    """torchvision's BasicBlock (3x3 conv, BN, ReLU, 3x3 conv, BN, + shortcut, ReLU) band of output rows by
    band: each band's first conv covers its rows plus the halo row above and below that the second reads
    (recomputed by the neighbouring bands), so the block holds its input, its output and one band."""

    def __init__(self, block: nn.Module, rows_per_band: int) -> None:
        super().__init__()
        if rows_per_band < 1:
            raise InvalidArgumentError(f"rows_per_band must be >= 1, got {rows_per_band}")
        self.conv1 = InPlaceConv(ConvStep(block.conv1, block.bn1, nn.ReLU()))
        self.conv2 = InPlaceConv(ConvStep(block.conv2, block.bn2, nn.Identity()))
        down = block.downsample
        self.downsample = None if down is None else InPlaceConv(ConvStep(down[0], down[1], nn.Identity()))
        self.rows_per_band = rows_per_band

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[2]
        mid = _conv_out(height, self.conv1.conv, 0)
        out = None
        for r0 in range(0, mid, self.rows_per_band):
            band = _Span(r0, min(r0 + self.rows_per_band, mid))
            held = _Rows(x, 0, height)
            halo, _, _ = band.through_conv(self.conv2.conv).clip(mid)
            h = _conv_rows(self.conv1, held, halo, mid)
            y = _conv_rows(self.conv2, h, band, mid).tensor
            if self.downsample is None:
                y += x[:, :, band.start : band.stop]
            else:
                y += _conv_rows(self.downsample, held, band, mid).tensor
            if out is None:
                out = x.new_empty(x.shape[0], y.shape[1], mid, y.shape[3])
            out[:, :, band.start : band.stop] = y.relu_()
            del h, y
        return out


class StreamedDenseBlock(nn.Module):
    """torchvision's _DenseBlock (eval mode) with its concatenations made once: the block's output is
    allocated up front, its input copied in, and every dense layer writes its new features into it. A
    layer's BN -> ReLU -> 1x1 conv reads the channels written so far in groups of `group` channels, adding
    each group's share of the 1x1 conv into the bottleneck map, so the block holds its input, its output,
    one bottleneck map and one group (the layer convention's "a dense block costs its output")."""

    def __init__(self, block: nn.Module, group: int) -> None:
        super().__init__()
        if group < 1:
            raise InvalidArgumentError(f"group must be >= 1, got {group}")
        self.group, self.layers = group, []
        with torch.no_grad():
            for layer in block.values():
                norm1 = _norm_affine(layer.norm1, layer.norm1.running_mean.new_zeros(()))
                norm2 = ConvStep(layer.conv1, layer.norm2, nn.ReLU()).affine()  # norm2 follows conv1
                self.layers.append(
                    (
                        tuple(t[:, None].clone() for t in norm1),
                        layer.conv1.weight[:, :, 0, 0].clone(),
                        tuple(t[None, :, None, None].clone() for t in norm2),
                        layer.conv2,
                    )
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            return torch.cat([self(image[None]) for image in x])
        grown = sum(conv2.out_channels for *_, conv2 in self.layers)
        out = x.new_empty(1, x.shape[1] + grown, *x.shape[2:])
        out[:, : x.shape[1]] = x
        flat, channels = out.view(out.shape[1], -1), x.shape[1]
        for (offset1, scale1, shift1), weight1, (offset2, scale2, shift2), conv2 in self.layers:
            bottleneck = None
            for start in range(0, channels, self.group):
                part = slice(start, min(start + self.group, channels))
                t = (flat[part] + offset1[part]).mul_(scale1[part]).add_(shift1[part]).relu_()
                if bottleneck is None:
                    bottleneck = torch.mm(weight1[:, part], t)
                else:
                    bottleneck.addmm_(weight1[:, part], t)
                del t
            b = bottleneck.view(1, -1, *x.shape[2:]).add_(offset2).mul_(scale2).add_(shift2).relu_()
            new = F.conv2d(b, conv2.weight, None, conv2.stride, conv2.padding, conv2.dilation, conv2.groups)
            del bottleneck, b
            out[:, channels : channels + new.shape[1]] = new
            channels += new.shape[1]
        return out


class BandedTransition(nn.Module):
    """torchvision's DenseNet _Transition (BN, ReLU, 1x1 conv, average pool without padding) band of output
    rows by band, so that neither its BN output nor its conv output is ever whole."""

    def __init__(self, transition: nn.Module, rows_per_band: int) -> None:
        super().__init__()
        if rows_per_band < 1:
            raise InvalidArgumentError(f"rows_per_band must be >= 1, got {rows_per_band}")
        with torch.no_grad():
            norm = _norm_affine(transition.norm, transition.norm.running_mean.new_zeros(()))
            self.norm = tuple(t[None, :, None, None].clone() for t in norm)
        self.conv, self.pool, self.rows_per_band = transition.conv, transition.pool, rows_per_band

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (offset, scale, shift), conv, pool = self.norm, self.conv, self.pool
        kernel, stride = _pair(pool.kernel_size)[0], _pair(pool.stride or pool.kernel_size)[0]
        out_height = (x.shape[2] - kernel) // stride + 1
        out = None
        for r0 in range(0, out_height, self.rows_per_band):
            r1 = min(r0 + self.rows_per_band, out_height)
            band = (
                (x[:, :, r0 * stride : (r1 - 1) * stride + kernel] + offset).mul_(scale).add_(shift).relu_()
            )
            y = pool(F.conv2d(band, conv.weight, conv.bias))
            del band
            if out is None:
                out = x.new_empty(x.shape[0], y.shape[1], out_height, y.shape[3])
            out[:, :, r0:r1] = y
        return out


class ChunkedMaxPool(nn.Module):
    """nn.MaxPool2d channel group by channel group: PyTorch's CPU max pool also makes an int64 index map
    (twice the output's bytes at fp32), which is then never whole."""

    def __init__(self, pool: nn.MaxPool2d, group: int) -> None:
        super().__init__()
        if group < 1:
            raise InvalidArgumentError(f"group must be >= 1, got {group}")
        self.pool, self.group = pool, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for start in range(0, x.shape[1], self.group):
            y = self.pool(x[:, start : start + self.group])
            if out is None:
                out = x.new_empty(x.shape[0], x.shape[1], *y.shape[2:])
            out[:, start : start + y.shape[1]] = y
        return out


def patches_per_group(pool: StreamedRNNPool, valid_width: int, budget: int) -> int:
    """The most patches of one patch row (at most `valid_width`) whose group_bytes fit `budget`, or 1."""
    return max([n for n in range(1, valid_width + 1) if pool.group_bytes(n) <= budget], default=1)


class InPlaceConv(nn.Module):
    """A convolution -> BN -> activation whose BN and activation run in place on the convolution's output,
    so that only the input and the output are alive (as a folded convolution; see ConvStep.affine)."""

    def __init__(self, step: ConvStep) -> None:
        super().__init__()
        self.conv, self.act = step.conv, copy.deepcopy(step.act)
        if hasattr(self.act, "inplace"):
            self.act.inplace = True
        with torch.no_grad():
            self.affine = tuple(t[None, :, None, None].clone() for t in step.affine())

    @classmethod
    def of(cls, module: nn.Module) -> InPlaceConv | None:
        """For torchvision's Conv2dNormActivation and leanvision's ConvNormAct; None for other modules."""
        from leanvision.layers import ConvNormAct

        if isinstance(module, Conv2dNormActivation):
            return cls(_step(module))
        if isinstance(module, ConvNormAct):
            return cls(ConvStep(module.conv, module.bn, module.act))
        return None

    def forward(self, x: torch.Tensor, padding: tuple[int, int] | None = None) -> torch.Tensor:
        """`padding` replaces the conv's own (rows, columns) padding, for an x that holds some already."""
        c = self.conv
        padding = c.padding if padding is None else padding
        return self.finish(F.conv2d(x, c.weight, None, c.stride, padding, c.dilation, c.groups))

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """The BN and the activation, in place on y, the convolution's output without its bias."""
        offset, scale, shift = self.affine
        return self.act(y.add_(offset).mul_(scale).add_(shift))


def _step(cna: nn.Sequential) -> ConvStep:
    """The ConvStep of a torchvision Conv2dNormActivation: [conv, BN?, act?]."""
    layers = list(cna)
    bn = next((m for m in layers[1:] if isinstance(m, nn.BatchNorm2d)), None)
    act = next((m for m in layers[1:] if not isinstance(m, nn.BatchNorm2d)), nn.Identity())
    return ConvStep(layers[0], bn, act)


def _bottleneck_parts(block: nn.Module) -> dict | None:
    """ChunkedBottleneck's arguments (but the group) for a bottleneck block, or None for other modules."""
    from leanvision.models.mobilenet import DepthwiseSeparable

    if isinstance(block, (InvertedResidual, MBConv)):
        layers = list(block.conv if isinstance(block, InvertedResidual) else block.block)
        se = next((m._scale for m in layers if isinstance(m, SqueezeExcitation)), None)
        layers = [m for m in layers if not isinstance(m, SqueezeExcitation)]
        if isinstance(block, InvertedResidual):  # [expand]?, depthwise, project conv, BN
            layers = [*layers[:-2], nn.Sequential(*layers[-2:])]
        expand = _step(layers[0]) if len(layers) == 3 else None
        shortcut = "add" if block.use_res_connect else "none"
        return dict(
            expand=expand, depthwise=_step(layers[-2]), project=_step(layers[-1]), shortcut=shortcut, se=se
        )
    if isinstance(block, LinearBottleneck):
        exp, dw, pwl = block.conv_exp, block.conv_dw, block.conv_pwl
        shortcut = "none"
        if block.use_shortcut:
            shortcut = "add" if block.in_channels == block.out_channels else "partial"
        return dict(
            expand=None if exp is None else ConvStep(exp.conv, exp.bn, exp.act),
            depthwise=ConvStep(dw.conv, dw.bn, nn.Identity()),  # the SE (if any) and act_dw follow
            project=ConvStep(pwl.conv, pwl.bn, nn.Identity()),
            shortcut=shortcut,
            se=None if block.se is None else block.se.scale,
            post_se_act=block.act_dw,
        )
    if isinstance(block, DepthwiseSeparable):
        dw, pw = block.conv_dw, block.conv_pw
        return dict(
            expand=None,
            depthwise=ConvStep(dw.conv, dw.bn, dw.act),
            project=ConvStep(pw.conv, pw.bn, pw.act),
            shortcut="none",
        )
    return None


def chunked_bottleneck(
    block: nn.Module, input_hw: tuple[int, int], band_bytes: int
) -> ChunkedBottleneck | None:
    """The ChunkedBottleneck computing eval-mode `block` on inputs of input_hw, in groups of expanded
    channels whose expanded and depthwise maps fit `band_bytes`; None for blocks it does not cover."""
    parts = _bottleneck_parts(block)
    if parts is None:
        return None
    (height, width), (sh, sw) = input_hw, parts["depthwise"].conv.stride
    per_channel = 4 * (height * width + -(-height // sh) * -(-width // sw))
    return ChunkedBottleneck(**parts, group=max(1, band_bytes // per_channel))


def banded_basic_block(block: nn.Module, input_shape: torch.Size, band_bytes: int) -> BandedBasicBlock | None:
    """BandedBasicBlock for a torchvision BasicBlock, with bands whose first-conv rows fit `band_bytes`."""
    if not isinstance(block, BasicBlock):
        return None
    conv = block.conv1
    row_bytes = 4 * conv.out_channels * -(-input_shape[3] // conv.stride[1])
    return BandedBasicBlock(block, max(1, band_bytes // row_bytes - 2))


def streamed_dense_block(
    block: nn.Module, input_shape: torch.Size, band_bytes: int
) -> StreamedDenseBlock | None:
    """StreamedDenseBlock for a torchvision _DenseBlock, with channel groups whose maps fit `band_bytes`."""
    if not isinstance(block, densenet._DenseBlock):
        return None
    return StreamedDenseBlock(block, max(1, band_bytes // (4 * input_shape[2] * input_shape[3])))


def banded_transition(
    transition: nn.Module, input_shape: torch.Size, band_bytes: int
) -> BandedTransition | None:
    """BandedTransition for a DenseNet _Transition whose pool is an unpadded AvgPool2d, with bands whose
    conv rows fit `band_bytes`."""
    pool = getattr(transition, "pool", None)
    if not isinstance(transition, densenet._Transition) or not isinstance(pool, nn.AvgPool2d):
        return None
    if _pair(pool.padding) != (0, 0) or pool.ceil_mode:
        return None
    row_bytes = 4 * (transition.conv.in_channels + transition.conv.out_channels) * input_shape[3]
    return BandedTransition(transition, max(1, band_bytes // (row_bytes * _pair(pool.kernel_size)[0])))


def chunked_max_pool(pool: nn.Module, input_shape: torch.Size, band_bytes: int) -> ChunkedMaxPool | None:
    """ChunkedMaxPool for an nn.MaxPool2d (without return_indices), with groups whose indices fit
    `band_bytes`."""
    if not isinstance(pool, nn.MaxPool2d) or pool.return_indices:
        return None
    return ChunkedMaxPool(pool, max(1, band_bytes // (8 * input_shape[2] * input_shape[3])))


def lean_module(module: nn.Module, input_shape: torch.Size, band_bytes: int) -> nn.Module | None:
    """The streaming form of `module` (run on inputs of input_shape), or None to run it as it is."""
    return (
        chunked_bottleneck(module, tuple(input_shape[2:]), band_bytes)
        or banded_basic_block(module, input_shape, band_bytes)
        or streamed_dense_block(module, input_shape, band_bytes)
        or banded_transition(module, input_shape, band_bytes)
        or chunked_max_pool(module, input_shape, band_bytes)
        or InPlaceConv.of(module)
    )


def _flatten_sequentials(module: nn.Module) -> nn.Module:
    """Inline every nn.Sequential directly inside an nn.Sequential (same computation). A nested one keeps
    its input referenced by the outer loop until its last module returns: a stage's input map would stay
    alive through the whole stage."""
    for name, child in module.named_children():
        setattr(module, name, _flatten_sequentials(child))
    if type(module) is nn.Sequential and any(type(child) is nn.Sequential for child in module):
        flat = []
        for child in module:
            flat.extend(child if type(child) is nn.Sequential else [child])
        return nn.Sequential(*flat)
    return module


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


@dataclass
class _Call:
    """One module call of a forward pass: the bytes of its tensor input and output (0 where the input or
    the output is not one tensor, as some blocks take lists (DenseNet's dense layers), and for an output
    in the input's storage)."""

    name: str
    module: nn.Module
    input_shape: torch.Size | None
    input_bytes: int = 0
    output_bytes: int = 0
    input: torch.Tensor | None = None  # kept up to the first RNNPoolLayer, for the prefix replay
    output_shape: torch.Size | None = None


def _nbytes(t: object) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _calls(model: nn.Module, x: torch.Tensor) -> tuple[list[_Call], list[torch.Tensor], object]:
    """Every module call of one forward pass, in call order, the outputs of the RNNPoolLayers called and
    the model's output."""
    calls, pooled, handles, running = [], [], [], []  # running: the calls not yet returned, innermost last
    for name, module in model.named_modules():
        if isinstance(module, RNNPoolLayer):
            handles.append(module.register_forward_hook(lambda m, args, out: pooled.append(out)))

        def before(module: nn.Module, args: tuple, name: str = name) -> None:
            first = args[0] if args else None
            shape = first.shape if isinstance(first, torch.Tensor) else None
            kept = (
                first if not pooled and not any(isinstance(c.module, RNNPoolLayer) for c in running) else None
            )
            calls.append(_Call(name, module, shape, _nbytes(first), input=kept))
            running.append(calls[-1])

        def after(module: nn.Module, args: tuple, out: object) -> None:
            first = args[0] if args else None
            same = _nbytes(first) and _nbytes(out) and first.data_ptr() == out.data_ptr()
            call = running.pop()
            call.output_bytes = 0 if same else _nbytes(out)  # in place (or Identity): nothing new
            call.output_shape = out.shape if isinstance(out, torch.Tensor) else None

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        with torch.no_grad():
            output = getattr(model, "head_outputs", model)(x)
    finally:
        for handle in handles:
            handle.remove()
    return calls, pooled, output


def _prefix_layers(calls: list[_Call]) -> list[tuple[str, nn.Module]]:
    """(name, layer) of the leaf modules called before the RNNPoolLayer, in order, with torchvision's
    GoogLeNet BasicConv2d (conv, BN, then a functional ReLU) spelled out as its three layers."""
    layers, inside = [], ()
    for name, module in ((call.name, call.module) for call in calls):
        if not name or name.startswith(inside):
            continue
        if isinstance(module, BasicConv2d):
            layers += [(f"{name}.conv", module.conv), (f"{name}.bn", module.bn), (name, nn.ReLU())]
            inside = (name + ".",)
        elif not list(module.children()) and not isinstance(module, nn.Sequential):  # an empty one: nothing
            layers.append((name, module))
    return layers


def _raw(model: nn.Module, x: torch.Tensor) -> object:
    """model(x), or a detector's head_outputs(x) (before its discontinuous NMS); None if a layer fails (it
    got the wrong map)."""
    try:
        with torch.no_grad():
            return getattr(model, "head_outputs", model)(x)
    except RuntimeError:
        return None


def _chained_after_pool(net: nn.Module, calls: list[_Call], first: int) -> nn.Module | None:
    """A copy of `net` whose RNNPool call also runs the siblings called after it that take its output, in a
    chain (the siblings left as Identity), or None if no sibling chains on. A parent's forward such as
    torchvision ResNet's `x = self.layer3(x)` holds its input until the call returns: chained in one
    nn.Sequential, the pool's output is freed after the first block that reads it. The caller checks that
    the copy computes the same output (the parent's forward might not be a chain)."""
    pool_call = calls[first]
    parent, _, _ = pool_call.name.rpartition(".")
    chain = [pool_call]
    for call in calls[first + 1 :]:
        sibling, _, child = call.name.rpartition(".")
        if sibling != parent or not child:
            continue
        if call.input_shape != chain[-1].output_shape:
            break
        chain.append(call)
    if len(chain) == 1:
        return None
    chained = copy.deepcopy(net)
    modules = [chained.get_submodule(call.name) for call in chain]
    for call in chain[1:]:
        _set_module(chained, call.name, nn.Identity())
    _set_module(chained, pool_call.name, nn.Sequential(*modules))
    return chained


def _same_outputs(got: object, expected: object) -> bool:
    """Whether two model outputs (tensors, or lists/dicts of them) agree to 1e-3 of the largest value: a
    check of structure (a layer fed the wrong map is far off), not of rounding, which BN can make ~1e-4."""
    if got is None:
        return False
    got_leaves, got_spec = tree_flatten(got)
    expected_leaves, expected_spec = tree_flatten(expected)
    if got_spec != expected_spec or any(a.shape != b.shape for a, b in zip(got_leaves, expected_leaves)):
        return False
    return all(
        (a.float() - b.float()).abs().max() <= 1e-3 * b.float().abs().max().clamp_min(1e-12)
        for a, b in zip(got_leaves, expected_leaves)
        if b.numel()
    )


def _eval_copy(
    model: nn.Module, input_size: tuple[int, int, int], band_bytes: int | None
) -> tuple[nn.Module, torch.Tensor]:
    """An eval-mode copy of `model` to rebuild and a batch-1 probe input of `input_size`, once the
    arguments every streamed form takes are checked."""
    if any(m.training for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        raise InvalidArgumentError("stream() runs inference: put the model in eval mode (model.eval()) first")
    if len(input_size) != 3 or min(input_size) < 1:
        raise InvalidArgumentError(f"input_size must be (C, H, W) of positive sizes, got {input_size!r}")
    if band_bytes is not None and band_bytes < 1:
        raise InvalidArgumentError(f"band_bytes must be >= 1 (or None), got {band_bytes}")
    probe = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
    return copy.deepcopy(model).eval(), probe


def _lean_calls(
    calls: list[_Call], done: Sequence[_Call], band_bytes: int
) -> tuple[list[_Call], list[_Call]]:
    """The outermost of `calls` (none inside `done` or inside a call lean_module replaces), and those of
    them that lean_module replaces."""
    run, replaced = [], []
    for call in calls:
        if any(call.name.startswith(outer.name + ".") for outer in (*done, *replaced)):
            continue
        run.append(call)
        if call.input_shape is not None and lean_module(call.module, call.input_shape, band_bytes):
            replaced.append(call)
    return run, replaced


def _make_lean(net: nn.Module, replaced: list[_Call], band_bytes: int, budget: int) -> None:
    """Put the lean form of each replaced call's module into `net`, its groups taking band_bytes or the
    headroom below `budget` beside the call's input and output, whichever is more."""
    for call in replaced:
        group_bytes = max(band_bytes, budget - call.input_bytes - call.output_bytes)
        _set_module(net, call.name, lean_module(call.module, call.input_shape, group_bytes))


class _InferenceOnly(nn.Module):
    """Runs `self.net` without gradients; refuses to run in training mode."""

    net: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise InvalidArgumentError(
                f"a {type(self).__name__} runs inference only: call .eval() (no gradients)"
            )
        with torch.no_grad():
            return self.net(x)


class StreamedModel(_InferenceOnly):
    """An inference-only copy of an RNNPool network that runs in (about) the RAM its layer-convention
    analysis reports; see the module docstring. Its forward equals the eval-mode model's."""

    def __init__(
        self, model: nn.Module, input_size: tuple[int, int, int], band_bytes: int | None = None
    ) -> None:
        super().__init__()
        net, probe = _eval_copy(model, input_size, band_bytes)
        self.input_size = tuple(input_size)
        calls, pooled, expected = _calls(net, probe)
        first = next((i for i, call in enumerate(calls) if isinstance(call.module, RNNPoolLayer)), None)
        if first is None:
            raise InvalidArgumentError(
                f"{type(model).__name__} has no RNNPoolLayer to stream; for patch-based inference of its "
                "first blocks, pass split_blocks=K"
            )
        pool_call, prefix = calls[first], _prefix_layers(calls[:first])
        if band_bytes is None:  # a quarter of the pool's fp32 output, the first map the network keeps whole
            band_bytes = pool_call.output_bytes // 4
        streamed_pool = StreamedRNNPool([m for _, m in prefix], pool_call.module, 1)
        prefix_input = next((c.input for c in calls if c.name == prefix[0][0]), None) if prefix else None
        with torch.no_grad():  # the prefix's input may be the image after the model's own normalisation
            replayed = streamed_pool(pool_call.input if prefix_input is None else prefix_input)
        if (replayed - pooled[0]).abs().max() > 1e-4 * pooled[0].abs().max():  # e.g. a functional op
            raise InvalidArgumentError(
                f"{type(model).__name__} cannot be streamed: its layers before the RNNPoolLayer are not a "
                "plain chain of modules (convolutions, BatchNorms, activations) that the executor can replay"
            )
        _set_module(net, pool_call.name, streamed_pool)
        for name, _ in prefix:
            _set_module(net, name, nn.Identity())
        run, replaced = _lean_calls(calls[first + 1 :], [pool_call], band_bytes)
        run = [pool_call, *run]  # the calls that run (from the pool on)
        # Every executor holds some call's input and its output at once: groups may use the headroom below
        # the largest such pair at no cost (the pool's input is never whole: its output alone counts).
        floor = max(c.input_bytes * (c is not pool_call) + c.output_bytes for c in run if c.output_bytes)
        valid_width = pool_call.module.output_size(*pool_call.input_shape[2:])[1]
        budget = max(band_bytes, floor - pool_call.output_bytes)
        streamed_pool.patches_per_group = patches_per_group(streamed_pool, valid_width, budget)
        streamed_pool._index_cache.clear()
        with torch.no_grad():  # fills the index tables of input_size's groups: state, as the weights are
            streamed_pool(probe)
        _make_lean(net, replaced, band_bytes, floor)
        chained = _chained_after_pool(net, calls, first)
        if chained is not None and _same_outputs(_raw(chained, probe), expected):
            net = chained
        elif not _same_outputs(_raw(net, probe), expected):  # e.g. a prefix map that a later layer reads
            raise InvalidArgumentError(
                f"{type(model).__name__} cannot be streamed: a map before its RNNPoolLayer is read again "
                "after it (e.g. by a detection head), so it cannot be computed patch by patch and dropped"
            )
        self.net = _flatten_sequentials(net).requires_grad_(False)
        self.eval()


def stream(
    model: nn.Module,
    input_size: tuple[int, int, int],
    band_bytes: int | None = None,
    split_blocks: int | None = None,
) -> StreamedModel | PatchBasedModel:
    """`model` (eval mode) as a StreamedModel for inputs of `input_size` (C, H, W), or with `split_blocks`
    as a PatchBasedModel whose first split_blocks blocks run patch by patch (any plain CNN, see
    leanvision.deploy.patch_based).

    `band_bytes`: the least RAM the work of one group (of patches, expanded channels or rows) may take
    beyond the input and output its layer holds (default: a quarter of the RNNPool's fp32 output, or with
    split_blocks of the last patch-based block's). Groups also take the headroom below the largest input
    + output of any layer after the RNNPool, which every executor holds at once: larger groups there cost
    no peak RAM and run faster."""
    if split_blocks is not None:
        from leanvision.deploy.patch_based import PatchBasedModel

        return PatchBasedModel(model, input_size, split_blocks, band_bytes)
    return StreamedModel(model, input_size, band_bytes)
