"""Lean forms of blocks, for streaming inference (eval mode, batch 1; larger batches image by image):
each computes its block's output while holding the block's input, its output and one group of work.

- ChunkedBottleneck: inverted-residual / MBConv / ReXNet / depthwise-separable blocks channel group by
  channel group (expand -> depthwise for a group of the expanded channels, then that group's share of the
  projection added into the output): the layer convention's "input + output";
- BandedBasicBlock: ResNet's BasicBlock band of output rows by band (recomputing the halo rows);
- BandedInception: GoogLeNet's inception block band of rows by band into one output (chain_rows runs a
  path's convolutions and max pools on a band of rows), optionally with the max pool after it;
- StreamedDenseBlock: DenseNet's dense block written into one preallocated output;
- BandedTransition, ChunkedMaxPool: DenseNet's transition in row bands; max pools in channel groups;
- InPlaceConv: conv -> BN -> activation with BN and activation in place on the conv's output.
`lean_module(module, input_shape, band_bytes)` gives the lean form of a module, or None.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair
from torchvision.models import densenet
from torchvision.models.efficientnet import MBConv
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock
from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation

from leanvision.deploy.onednn import PackedWeights, conv_unbiased
from leanvision.deploy.regions import Span, conv_out, pad_zeros
from leanvision.errors import InvalidArgumentError
from leanvision.layers import ImageNormalize, LinearBottleneck
from leanvision.layers.rnn_cells import kernel_applies, kernel_threads

# An InPlaceConv with this many weights or more runs on weights packed once per input shape
# (onednn.conv_unbiased), which F.conv2d reorders on every call: a band of a few rows costs about that
# pass over the weights. Below, F.conv2d is faster. Measured on band shapes, 2 threads: 3x3 64->64 83 us
# packed vs 97, 32->64 57 vs 50; 1x1 160->960 113 vs 197, 256->256 57 vs 46 (a 1x1 conv of a band
# held as rows runs as a GEMM instead: _conv_rows).
PACK_FROM, PACK_POINTWISE_FROM = 2**15, 2**17
# Input shapes an InPlaceConv keeps packed weights for: every band and region shape of a streamed forward
# (the edges' and the last band's differ), so that a forward packs none (packing costs a call's time).
PACKED_SHAPES = 32


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


def _norm_affine(
    bn: nn.BatchNorm2d, bias: torch.Tensor | float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(offset, scale, shift) of eval-mode `bn` after a bias: (y + offset) * scale + shift."""
    return bias - bn.running_mean, bn.weight / torch.sqrt(bn.running_var + bn.eps), bn.bias


@functools.cache
def _depthwise_kernels():
    """The numba kernels module (depthwise_kernels.py), or None where numba is not installed."""
    try:
        from leanvision.deploy import depthwise_kernels
    except ImportError:
        return None
    return depthwise_kernels


@dataclass
class _Chunk:
    """One group of expanded channels [start, stop): its slices of the weights and affines."""

    start: int
    stop: int
    expand: tuple[torch.Tensor, ...] | None  # weight [g, C_in], offset, scale, shift [g, 1]
    depthwise: tuple[torch.Tensor, ...]  # weight [g, 1, k, k], offset, scale, shift [1, g, 1, 1]
    project_weight: torch.Tensor  # [C_out, g]
    kernel_consts: np.ndarray | None  # the numba kernel's [g, 6 + k * k] (depthwise_kernels.py)


class ChunkedBottleneck(nn.Module):
    """[1x1 expand, BN, act] -> depthwise, BN, act [-> squeeze-excite -> act] -> 1x1 project, BN, act
    [+ shortcut], one group of expanded channels at a time: each group's share of the projection is added
    into the output, so the expanded and depthwise maps are never whole (batch 1 runs as matrix products).

    `se` maps the depthwise output's channel means [1, C, 1, 1] to its channel scales: the means need
    every group, so with an SE the groups run twice (means first, then scale and project), recomputing
    the expansion and the depthwise conv of all but the last group, whose maps the second pass starts
    with. The first pass holds no output yet: its groups are of `mean_group` channels (default `group`).
    `post_se_act` follows the scaling (ReXNet's dw activation; without an SE it is not applied).
    Where numba is installed, a numba kernel runs each group's steps between the GEMMs (expand BN and act,
    depthwise conv, BN and act, and the SE's means or scaling: depthwise_kernels.py) on CPU float32 and
    float64 inputs, if it computes the activations; else (and for autograd and the MAdds counter) torch
    ops do.
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
        mean_group: int | None = None,
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
        mean_group = group if mean_group is None else mean_group
        if shortcut not in ("none", "add", "partial") or min(group, mean_group) < 1:
            raise InvalidArgumentError(
                f"need shortcut none/add/partial and group, mean_group >= 1, got {shortcut!r}, {group}, "
                f"{mean_group}"
            )
        if post_se_act is not None and se is None:
            raise InvalidArgumentError("post_se_act follows an SE's scaling: without one, it is the dw act")
        self.shortcut, self.stride, self.padding, self.dilation = shortcut, dw.stride, dw.padding, dw.dilation
        self.expand_act = expand.act if expand else nn.Identity()
        self.dw_act, self.project_act = depthwise.act, project.act
        self.se, self.post_se_act = se, post_se_act or nn.Identity()
        # the numba kernel's geometry and activations (its config less the sizes), where it computes them
        self.kernel_config, kernels = None, _depthwise_kernels()
        if kernels is not None:
            acts = (kernels.activation(self.expand_act) if expand else -1, kernels.activation(self.dw_act))
            acts = (*acts, kernels.activation(self.post_se_act))
            if None not in acts:
                self.kernel_config = (*dw.kernel_size, *dw.stride, *dw.padding, *dw.dilation, *acts)
        with torch.no_grad():
            self.project_affine = tuple(t[:, None].clone() for t in project.affine())
            dw_affine, ex_affine = depthwise.affine(), expand.affine() if expand else None
            consts = None
            if self.kernel_config is not None:  # one row per channel, sliced by the chunks
                ex = ex_affine or dw.weight.new_zeros(3, dw.in_channels)  # unused without expansion
                consts = torch.cat((torch.stack((*ex, *dw_affine), 1), dw.weight.flatten(1)), 1).numpy()

            def chunk(start: int, stop: int) -> _Chunk:
                part, expand_part = slice(start, stop), None
                if expand is not None:
                    weight = expand.conv.weight[part, :, 0, 0]
                    expand_part = (weight.clone(), *(t[part, None].clone() for t in ex_affine))
                depthwise_part = (
                    dw.weight[part].clone(),
                    *(t[None, part, None, None].clone() for t in dw_affine),
                )
                project_weight = pw.weight[:, part, 0, 0].clone()
                kernel_consts = None if consts is None else consts[part]
                return _Chunk(start, stop, expand_part, depthwise_part, project_weight, kernel_consts)

            def chunks(stop: int, size: int) -> list[_Chunk]:
                return [chunk(start, min(start + size, stop)) for start in range(0, stop, size)]

            channels = dw.in_channels
            if se is None:
                self.chunks, self.mean_chunks = chunks(channels, group), []
            else:  # the last group of the first pass is the first of the second
                tail = chunk(max(channels - group, 0), channels)
                self.mean_chunks = [*chunks(tail.start, mean_group), tail]
                self.chunks = [tail, *chunks(tail.start, group)]

    def _out_size(self, height: int, width: int) -> tuple[int, int]:
        """The depthwise conv's output size on an input height x width."""
        kernel = self.chunks[0].depthwise[0].shape[2:]
        return tuple(
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, k, s, p, d in zip((height, width), kernel, self.stride, self.padding, self.dilation)
        )

    def group_bytes(self, height: int, width: int) -> int:
        """fp32 bytes beside the input and the output of the largest group's maps on an input height x
        width (its expanded map, unless that is a view of the input, and its depthwise output; a first
        pass group's less the output, which is not made yet) and of the squeeze-excite's scales."""
        out_h, out_w = self._out_size(height, width)
        per_channel = (height * width if self.chunks[0].expand is not None else 0) + out_h * out_w
        group = max(chunk.stop - chunk.start for chunk in self.chunks)
        mean_group = max((chunk.stop - chunk.start for chunk in self.mean_chunks), default=0)
        output = self.chunks[0].project_weight.shape[0] * out_h * out_w
        scales = self.chunks[0].stop if self.se is not None else 0
        return 4 * (max(group * per_channel, mean_group * per_channel - output) + scales)

    def _depthwise(
        self,
        chunk: _Chunk,
        x: torch.Tensor,
        x2d: torch.Tensor,
        config: np.ndarray | None,
        means: torch.Tensor | None = None,
        scales: torch.Tensor | None = None,
        band: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """The chunk's expanded channels after the depthwise conv, BN and act: [group, H' * W'], from x
        [1, C, H, W] (x2d its view [C, H * W]); by the numba kernel after the expand GEMM where its
        `config` is given. With the SE's `means` [C], writes the maps' channel means into the chunk's
        slice; with its `scales` [C], the maps are scaled by the chunk's slice, then post_se_act. With
        `band` (top, rows), x is a band of a map's rows: see `rows`."""
        part, group = slice(chunk.start, chunk.stop), chunk.stop - chunk.start
        e = x2d[part] if chunk.expand is None else torch.mm(chunk.expand[0], x2d)
        if config is not None:
            d, kernels = x.new_empty(group, int(config[-2] * config[-1])), _depthwise_kernels()
            parallel = kernels.taps(group, config) >= kernels.PARALLEL_TAPS and kernel_threads() > 1
            (kernels.expand_depthwise_parallel if parallel else kernels.expand_depthwise)(
                e.numpy(),
                d.numpy(),
                chunk.kernel_consts,
                config,
                None if means is None else means.numpy()[part],
                None if scales is None else scales.numpy()[part],
            )
            return d
        if chunk.expand is not None:
            _, offset, scale, shift = chunk.expand
            e = self.expand_act(e.add_(offset).mul_(scale).add_(shift))
        weight, offset, scale, shift = chunk.depthwise
        e, padding = e.view(1, group, *x.shape[2:]), self.padding
        if band is not None:  # the band's zero rows above and, at the map's bottom, below
            (top, rows), reach = band, self.dilation[0] * (weight.shape[2] - 1) + 1
            below = max((rows - 1) * self.stride[0] + reach - top - e.shape[2], 0)
            e, padding = pad_zeros(e, (0, 0, top, below)), (0, self.padding[1])
        d = F.conv2d(e, weight, None, self.stride, padding, self.dilation, group)
        if band is not None:
            d = d[:, :, : band[1]].contiguous()
        d = self.dw_act(d.add_(offset).mul_(scale).add_(shift)).view(group, -1)
        if means is not None:
            means[part] = d.mean(1)
        return d if scales is None else self._scale(d, scales[part])

    def _scale(self, d: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """A group's maps [group, H' * W'] scaled by its SE scales [group], then post_se_act."""
        return self.post_se_act(d.mul_(scales[:, None]))

    def _config(self, x: torch.Tensor, out_size: tuple[int, int], top: int | None) -> np.ndarray | None:
        """The numba kernel's config on x [1, C, H, W] (contiguous) for an output of out_size, with `top`
        rows of zero padding above x (None: the conv's own), or None where it does not run: see
        rnn_cells.kernel_applies (and not for autograd)."""
        if (
            self.kernel_config is None
            or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and x.requires_grad)
            or not kernel_applies(self.chunks[0].depthwise[0], x)
        ):
            return None
        config = np.array((*self.kernel_config, *x.shape[2:], *out_size), np.int64)
        if top is not None:
            config[4] = top  # the depthwise conv's padding: rows, then columns
        return config

    @classmethod
    def row_step(
        cls, parts: dict, rows: int | None = None, width: int | None = None, band_bytes: int | None = None
    ) -> ChunkedBottleneck | None:
        """The block of bottleneck_parts `parts` for `rows`, where the numba kernel computes it (an SE or
        ReXNet's partial shortcut excluded: None; the shortcut is left to the caller): one group, or with
        `band_bytes` and an expansion the fewest groups whose step of `rows` output rows on a map `width`
        wide fits it (without one, the band's copy that every group reads is what holds the RAM)."""
        if parts.get("se") is not None or parts["shortcut"] == "partial":
            return None
        channels = parts["depthwise"].conv.in_channels
        step = cls(parts["expand"], parts["depthwise"], parts["project"], "none", channels)
        if step.kernel_config is None:
            return None
        groups = 1
        regroups = band_bytes is not None and parts["expand"] is not None
        while regroups and groups < channels and step.rows_bytes(rows, width) > band_bytes:
            groups += 1
            step = cls(parts["expand"], parts["depthwise"], parts["project"], "none", -(-channels // groups))
        return step

    def rows_bytes(self, rows: int, width: int) -> int:
        """fp32 bytes that `self.rows` computing `rows` output rows on a band `width` wide (a view of a map's
        rows) makes beside the band, at most: a group's expansion of the band with its depthwise output,
        then with one group the depthwise output with the projection, with more the projection's output
        throughout; without an expansion, a contiguous copy of the band, the depthwise output and the
        projection."""
        kernel = self.chunks[0].depthwise[0].shape[2]
        band = (rows - 1) * self.stride[0] + self.dilation[0] * (kernel - 1) + 1
        out = rows * self._out_size(band, width)[1]
        group = max(chunk.stop - chunk.start for chunk in self.chunks)
        projected = self.chunks[0].project_weight.shape[0] * out
        if self.chunks[0].expand is None:
            return 4 * (self.chunks[-1].stop * band * width + group * out + projected)
        if len(self.chunks) == 1:
            return 4 * (group * out + max(group * band * width, projected))
        return 4 * (projected + group * (out + band * width))

    def rows(self, x: torch.Tensor, top: int, rows: int) -> torch.Tensor:
        """`rows` output rows [1, C', rows, W'] of the block on a band x [1, C, r, W] of its input map's rows
        that holds (from its top) the rows they read, less `top` rows of zero padding above it (the
        depthwise conv's at the map's top edge, else 0) and those below the map's bottom edge; the
        columns are whole. The shortcut, if any, is left to the caller."""
        if self.se is not None or self.shortcut != "none":
            raise InvalidArgumentError("ChunkedBottleneck.rows computes blocks without an SE or a shortcut")
        return self._one(x, (top, rows))

    def _one(self, x: torch.Tensor, band: tuple[int, int] | None = None) -> torch.Tensor:
        if band is None or self.chunks[0].expand is None:
            x = x.contiguous()  # else the expand GEMM reads a band of a map's rows in place
        out_size = self._out_size(*x.shape[2:])
        if band is not None:
            out_size = (band[1], out_size[1])
        x2d, config = x[0].flatten(1), self._config(x, out_size, None if band is None else band[0])
        scales, d = None, None
        if self.se is not None:  # first pass: the channel means the squeeze-excite needs
            means = x.new_empty(self.mean_chunks[-1].stop)
            for chunk in self.mean_chunks:
                d = None  # not alive while the next chunk's maps are made
                d = self._depthwise(chunk, x, x2d, config, means=means)
            scales = self.se(means.view(1, -1, 1, 1)).view(-1)
            del means
            tail = self.chunks[0]  # d holds its maps: the second pass starts with them
            d = self._scale(d, scales[tail.start : tail.stop])
        out = None
        for chunk in self.chunks:
            if d is None:
                d = self._depthwise(chunk, x, x2d, config, scales=scales, band=band)
            if out is None:
                out = torch.mm(chunk.project_weight, d)
            else:
                out.addmm_(chunk.project_weight, d)
            d = None
        offset, scale, shift = self.project_affine
        out = self.project_act(out.add_(offset).mul_(scale).add_(shift))
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


def _pool_params(pool: nn.MaxPool2d) -> tuple[int, int, int, int]:
    """(kernel, stride, padding, dilation) of a max pool along the rows."""
    return tuple(_pair(v)[0] for v in (pool.kernel_size, pool.stride, pool.padding, pool.dilation))


def _reads(layer: InPlaceConv | nn.MaxPool2d, out: Span) -> Span:
    """The input rows `layer` reads to produce the output rows `out`."""
    if isinstance(layer, nn.MaxPool2d):
        return out.through(*_pool_params(layer))
    return out.through_conv(layer.conv)


def _out_height(layer: InPlaceConv | nn.MaxPool2d, height: int) -> int:
    """Output height of `layer` for an input `height` rows high (a max pool's ceil_mode included)."""
    if isinstance(layer, InPlaceConv):
        return conv_out(height, layer.conv, 0)
    kernel, stride, padding, dilation = _pool_params(layer)
    span = height + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1) * layer.ceil_mode) // stride + 1
    return out - 1 if layer.ceil_mode and (out - 1) * stride >= height + padding else out


def _conv_rows(layer: InPlaceConv, rows: _Rows, out: Span, out_height: int) -> _Rows:
    """Rows `out` (inside [0, out_height)) of layer(map), from the rows of the map that `rows` holds."""
    inside, top, bottom = out.through_conv(layer.conv).clip(rows.height)
    x, conv = _held(rows, inside), layer.conv
    pointwise = conv.kernel_size == conv.stride == (1, 1) and conv.groups == 1
    if x.shape[0] == 1 and pointwise and not isinstance(layer, NormalizedConv):
        # a pointwise conv of a band runs ~2x faster as a matrix product, which reads the rows in place
        y = torch.mm(conv.weight.view(conv.out_channels, -1), x.view(x.shape[1], -1))
        return _Rows(layer.finish(y.view(1, -1, *x.shape[2:])), out.start, out_height)
    pads = (conv.padding[1], conv.padding[1], top, bottom)
    return _Rows(conv_zero_padded(layer, x, pads), out.start, out_height)


def conv_zero_padded(layer: InPlaceConv, x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """layer(layer.padded(x, pads), padding=0) (pads: left, right, top, bottom; zeros, or what the layer's
    input is padded with) with the conv's own padding where it can, not a padded copy of x: padding both
    sides of an axis by the larger amount makes extra outputs at the other side, which are dropped (a
    view); a padded copy where they would not line up."""
    conv, padding, kept = layer.conv, [], []
    for axis, size, (before, after) in ((0, x.shape[2], pads[2:]), (1, x.shape[3], pads[:2])):
        skip, uneven = divmod(max(before, after) - before, conv.stride[axis])
        if uneven:
            return layer(layer.padded(x, pads), padding=(0, 0))
        reach = conv.dilation[axis] * (conv.kernel_size[axis] - 1) + 1
        padding.append(max(before, after))
        kept.append(slice(skip, skip + (size + before + after - reach) // conv.stride[axis] + 1))
    return layer(x, padding=tuple(padding))[:, :, kept[0], kept[1]]


POOL_GROUPS = 8  # _pool_rows pools channel group by group: int64 indices and padded copies of 1/8 of a band


def _pool_rows(pool: nn.MaxPool2d, rows: _Rows, out: Span, out_height: int) -> _Rows:
    """Rows `out` of pool(map) from the rows of the map that `rows` holds, in POOL_GROUPS channel groups
    (the CPU max pool makes int64 indices beside its output). The rows it reads beyond the map's edges
    are padded with -inf (copying a group's rows, at the edges only), the columns by the pool."""
    inside, top, bottom = _reads(pool, out).clip(rows.height)
    x, y = _held(rows, inside), None
    group = -(-x.shape[1] // POOL_GROUPS)
    for start in range(0, x.shape[1], group):
        part = x[:, start : start + group]
        if top or bottom:
            part = F.pad(part, (0, 0, top, bottom), value=float("-inf"))
        padding = (0, _pair(pool.padding)[1])
        pooled = F.max_pool2d(part, pool.kernel_size, pool.stride, padding, pool.dilation, pool.ceil_mode)
        if y is None:
            y = x.new_empty(x.shape[0], x.shape[1], *pooled.shape[2:])
        y[:, start : start + group] = pooled
        del part, pooled
    return _Rows(y, out.start, out_height)


def pool_runs_in_rows(pool: nn.Module) -> bool:
    """Whether _pool_rows computes `pool`: a max pool without indices."""
    return isinstance(pool, nn.MaxPool2d) and not pool.return_indices


def _held(rows: _Rows, inside: Span) -> torch.Tensor:
    """Rows `inside` of the map, which `rows` must hold."""
    if inside.start < rows.start or inside.stop > rows.start + rows.tensor.shape[2]:
        raise AssertionError(f"rows {inside} of the input are needed, {rows.start}.. are held")
    return rows.tensor[:, :, inside.start - rows.start : inside.stop - rows.start]


def chain_rows(layers: Sequence[nn.Module], rows: _Rows, out: Span) -> torch.Tensor:
    """Rows `out` of the output of `layers` (convolutions and max pools, in order) from the rows of their
    input map that `rows` holds: each layer computes the rows the next one reads (its halo included)."""
    heights = [rows.height]
    for layer in layers:
        heights.append(_out_height(layer, heights[-1]))
    spans = [out]
    for layer, height in zip(layers[:0:-1], heights[-2:0:-1]):
        spans.append(_reads(layer, spans[-1]).clip(height)[0])
    for layer, span, height in zip(layers, reversed(spans), heights[1:]):
        run = _pool_rows if isinstance(layer, nn.MaxPool2d) else _conv_rows
        rows = run(layer, rows, span, height)
    return rows.tensor


class BandedBasicBlock(nn.Module):
    """torchvision's BasicBlock (3x3 conv, BN, ReLU, 3x3 conv, BN, + shortcut, ReLU) band of output rows by
    band: each band's first conv covers its rows plus the halo row above and below that the second reads
    (recomputed by the neighbouring bands), so the block holds its input, its output and one band."""

    def __init__(self, block: nn.Module, rows_per_band: int) -> None:
        super().__init__()
        if rows_per_band < 1:
            raise InvalidArgumentError(f"rows_per_band must be >= 1, got {rows_per_band}")
        self.convs = nn.ModuleList(
            [
                InPlaceConv(ConvStep(block.conv1, block.bn1, nn.ReLU())),
                InPlaceConv(ConvStep(block.conv2, block.bn2, nn.Identity())),
            ]
        )
        down = block.downsample
        self.downsample = None if down is None else InPlaceConv(ConvStep(down[0], down[1], nn.Identity()))
        self.rows_per_band = rows_per_band

    def group_bytes(self, height: int, width: int) -> int:
        """fp32 bytes of a band's maps on an input height x width: the first conv's rows (the band's and
        their halo), the second's and the downsample's."""
        conv = self.convs[0].conv
        rows = min(self.rows_per_band, conv_out(height, conv, 0))
        maps = 2 * rows + 2 + (rows if self.downsample is not None else 0)
        return 4 * conv.out_channels * conv_out(width, conv, 1) * maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        held, out = _Rows(x, 0, x.shape[2]), None
        out_height = conv_out(x.shape[2], self.convs[0].conv, 0)
        for r0 in range(0, out_height, self.rows_per_band):
            band = Span(r0, min(r0 + self.rows_per_band, out_height))
            y = chain_rows(self.convs, held, band)
            if self.downsample is None:
                y += x[:, :, band.start : band.stop]
            else:
                y += chain_rows([self.downsample], held, band)
            if out is None:
                out = x.new_empty(x.shape[0], y.shape[1], out_height, y.shape[3])
            out[:, :, band.start : band.stop] = y.relu_()
            del y
        return out


class BandedInception(nn.Module):
    """An inception block (torchvision's GoogLeNet Inception: parallel paths of convolutions and max pools
    whose outputs are concatenated) path by path, band of output rows by band, each path's rows written
    into one preallocated output, so neither a path's output nor a concatenation is ever whole: the block
    holds its input, its output and one band of one path. `rows_per_band` is one per path (or one for
    all): a path whose band takes little RAM (few channels, no max pool of the input) runs in taller
    bands, fewer passes over its weights. With `pool` (a max pool after the block), the block's rows are
    made band by band of `pool_rows_per_band` of the pool's output rows, so the block's output is never
    whole either."""

    def __init__(
        self,
        paths: Sequence[Sequence[nn.Module]],
        rows_per_band: int | Sequence[int],
        pool: nn.MaxPool2d | None = None,
        pool_rows_per_band: int = 1,
    ) -> None:
        super().__init__()
        rows = [rows_per_band] * len(paths) if isinstance(rows_per_band, int) else list(rows_per_band)
        if len(rows) != len(paths) or min(*rows, pool_rows_per_band) < 1:
            raise InvalidArgumentError(
                f"need rows_per_band (one, or one per path) and pool_rows_per_band >= 1, got "
                f"{rows_per_band}, {pool_rows_per_band} for {len(paths)} paths"
            )
        self.paths = nn.ModuleList(nn.ModuleList(path) for path in paths)
        self.out_channels = sum(path[-1].conv.out_channels for path in self.paths)
        self.rows_per_band, self.pool, self.pool_rows_per_band = rows, pool, pool_rows_per_band

    def _write(self, held: _Rows, span: Span, dest: torch.Tensor) -> None:
        """Rows `span` of the block's output into dest, whose row 0 is the span's first."""
        start = 0
        for path, rows_per_band in zip(self.paths, self.rows_per_band):
            for r0 in range(span.start, span.stop, rows_per_band):
                band = Span(r0, min(r0 + rows_per_band, span.stop))
                y = chain_rows(path, held, band)
                dest[:, start : start + y.shape[1], band.start - span.start : band.stop - span.start] = y
                del y
            start += path[-1].conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            return torch.cat([self(image[None]) for image in x])
        held = _Rows(x, 0, x.shape[2])
        if self.pool is None:
            out = x.new_empty(1, self.out_channels, *x.shape[2:])
            self._write(held, Span(0, x.shape[2]), out)
            return out
        out_height, out = _out_height(self.pool, x.shape[2]), None
        for r0 in range(0, out_height, self.pool_rows_per_band):
            band = Span(r0, min(r0 + self.pool_rows_per_band, out_height))
            span, _, _ = _reads(self.pool, band).clip(x.shape[2])
            y = x.new_empty(1, self.out_channels, span.stop - span.start, x.shape[3])
            self._write(held, span, y)
            pooled = _pool_rows(self.pool, _Rows(y, span.start, x.shape[2]), band, out_height).tensor
            del y
            if out is None:
                out = x.new_empty(1, self.out_channels, out_height, pooled.shape[3])
            out[:, :, band.start : band.stop] = pooled
            del pooled
        return out


class StreamedDenseBlock(nn.Module):
    """torchvision's _DenseBlock (eval mode) with its concatenations made once: the block's output is
    allocated up front, its input copied in, and every dense layer writes its new features into it. A
    layer's BN -> ReLU -> 1x1 conv reads the channels written so far in groups of `group` channels, adding
    each group's share of the 1x1 conv into the bottleneck map, so the block holds its output, one
    bottleneck map, one layer's new features and one group (the layer convention's "a dense block costs
    its output"), and its input where its caller holds that (not in a rewrite.Chain: `take`)."""

    def __init__(self, block: nn.Module, group: int) -> None:
        super().__init__()
        if group < 1:
            raise InvalidArgumentError(f"group must be >= 1, got {group}")
        self.group, self.layers = group, []
        with torch.no_grad():
            for layer in block.values():
                norm1 = _norm_affine(layer.norm1)
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
        return self.take([x])

    def take(self, box: list[torch.Tensor]) -> torch.Tensor:
        """The block on box.pop(), whose input is freed once copied into the output where the box held
        the only reference to it."""
        x = box.pop()
        if x.shape[0] > 1:
            return torch.cat([self(image[None]) for image in x])
        grown = sum(conv2.out_channels for *_, conv2 in self.layers)
        channels, size = x.shape[1], x.shape[2:]
        out = x.new_empty(1, channels + grown, *size)
        out[:, :channels] = x
        del x
        flat = out.view(out.shape[1], -1)
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
            b = bottleneck.view(1, -1, *size).add_(offset2).mul_(scale2).add_(shift2).relu_()
            new = F.conv2d(b, conv2.weight, None, conv2.stride, conv2.padding, conv2.dilation, conv2.groups)
            del bottleneck, b
            out[:, channels : channels + new.shape[1]] = new
            channels += new.shape[1]
        return out


class BandedTransition(nn.Module):
    """torchvision's DenseNet _Transition (BN, ReLU, 1x1 conv, average pool without padding) band of output
    rows by band, with the pool before the 1x1 conv (linear maps that commute: a quarter of the MACs) and
    BN -> ReLU -> pool in groups of `group` channels, so the block holds its input, its output, one band
    of the pooled map and one group."""

    def __init__(self, transition: nn.Module, rows_per_band: int, group: int) -> None:
        super().__init__()
        if rows_per_band < 1 or group < 1:
            raise InvalidArgumentError(f"need rows_per_band, group >= 1, got {rows_per_band}, {group}")
        with torch.no_grad():
            norm = _norm_affine(transition.norm)
            self.norm = tuple(t[None, :, None, None].clone() for t in norm)
        self.conv, self.pool = transition.conv, transition.pool
        self.rows_per_band, self.group = rows_per_band, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (offset, scale, shift), conv, pool = self.norm, self.conv, self.pool
        kernel, stride = _pair(pool.kernel_size)[0], _pair(pool.stride or pool.kernel_size)[0]
        out_height = (x.shape[2] - kernel) // stride + 1
        out = None
        for r0 in range(0, out_height, self.rows_per_band):
            r1 = min(r0 + self.rows_per_band, out_height)
            rows, pooled = x[:, :, r0 * stride : (r1 - 1) * stride + kernel], None
            for start in range(0, x.shape[1], self.group):
                part = slice(start, start + self.group)
                p = pool((rows[:, part] + offset[:, part]).mul_(scale[:, part]).add_(shift[:, part]).relu_())
                if pooled is None:
                    pooled = x.new_empty(x.shape[0], x.shape[1], *p.shape[2:])
                pooled[:, part] = p
                del p
            y = F.conv2d(pooled, conv.weight, conv.bias)
            del pooled
            if out is None:
                out = x.new_empty(x.shape[0], y.shape[1], out_height, y.shape[3])
            out[:, :, r0:r1] = y
            del y
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


class InPlaceConv(nn.Module):
    """A convolution -> BN -> activation whose BN and activation run in place on the convolution's output,
    so that only the input and the output are alive (as a folded convolution; see ConvStep.affine)."""

    def __init__(self, step: ConvStep) -> None:
        super().__init__()
        self.conv, self.act = step.conv, copy.deepcopy(step.act)
        if hasattr(self.act, "inplace"):
            self.act.inplace = True
        with torch.no_grad():  # (offset, scale, shift); without a BN only the offset, the conv's bias
            affine = tuple(t[None, :, None, None].clone() for t in step.affine())
        self.affine = affine if step.bn is not None else (affine[0], None, None)
        pointwise = self.conv.kernel_size == (1, 1)
        packs = self.conv.weight.numel() >= (PACK_POINTWISE_FROM if pointwise else PACK_FROM)
        self.packed = PackedWeights(PACKED_SHAPES) if packs else None

    @classmethod
    def of(cls, module: nn.Module) -> InPlaceConv | None:
        """For torchvision's Conv2dNormActivation and leanvision's ConvNormAct; None for other modules."""
        from leanvision.layers import ConvNormAct

        if isinstance(module, Conv2dNormActivation):
            return cls(conv_norm_act_step(module))
        if isinstance(module, ConvNormAct):
            return cls(ConvStep(module.conv, module.bn, module.act))
        return None

    def forward(self, x: torch.Tensor, padding: tuple[int, int] | None = None) -> torch.Tensor:
        """`padding` replaces the conv's own (rows, columns) padding, for an x that holds some already."""
        return self.finish(self.convolve(x, self.conv.padding if padding is None else tuple(padding)))

    def convolve(self, x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
        """The convolution alone, without its bias."""
        c = self.conv
        if self.packed is None:
            return F.conv2d(x, c.weight, None, c.stride, padding, c.dilation, c.groups)
        return conv_unbiased(c, x, padding, self.packed)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """The bias, the BN and the activation, in place on y, the convolution's output without its bias."""
        offset, scale, shift = self.affine
        y.add_(offset)
        return self.act(y if scale is None else y.mul_(scale).add_(shift))

    def padded(self, x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
        """x with `pads` (left, right, top, bottom) of what this layer's input is padded with: zeros."""
        return pad_zeros(x, pads)


class NormalizedConv(InPlaceConv):
    """An ImageNormalize, (x - mean) / std, and the convolution [-> BN] [-> activation] after it as one
    InPlaceConv of the raw image, so that no normalised copy of the image is made (a streamed stem's
    largest map: RNNPool-Face-Quant's 3 channels at the image's resolution). The weights take the 1 / std;
    the convolution of the constant image `mean` (zero-padded as the normalised image would be) is
    subtracted from the output. That constant map depends only on the input's shape and the padding
    (one row where the rows are not padded, one column where the columns are not): kept per shape."""

    def __init__(self, normalize: ImageNormalize, step: ConvStep) -> None:
        conv = copy.deepcopy(step.conv)
        with torch.no_grad():
            conv.weight.div_(conv.weight.new_tensor(normalize.std).view(1, -1, 1, 1))
        super().__init__(ConvStep(conv, step.bn, step.act))
        self.mean = normalize.mean
        self._constants: dict[tuple, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, padding: tuple[int, int] | None = None) -> torch.Tensor:
        padding = self.conv.padding if padding is None else tuple(padding)
        return self.finish(self.convolve(x, padding).sub_(self._constant(x, padding)))

    def padded(self, x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
        """x with `pads` of the raw value that normalises to zero, the mean."""
        if not any(pads):
            return x
        left, right, top, bottom = pads
        out = x.new_empty(*x.shape[:2], x.shape[2] + top + bottom, x.shape[3] + left + right)
        out.copy_(x.new_tensor(self.mean).view(1, -1, 1, 1).expand_as(out))
        out[:, :, top : top + x.shape[2], left : left + x.shape[3]] = x
        return out

    def _constant(self, x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
        """The convolution (without bias) of the image `mean` of x's shape, zero-padded by `padding`."""
        key = (tuple(x.shape), padding, x.dtype)
        if key not in self._constants:
            if len(self._constants) >= PACKED_SHAPES:  # the oldest dropped, as PackedWeights does
                del self._constants[next(iter(self._constants))]
            # an axis not padded gives the same output along it: the least input that makes one output
            shape = [
                size if pad else dilation * (kernel - 1) + 1
                for size, pad, kernel, dilation in zip(
                    x.shape[2:], padding, self.conv.kernel_size, self.conv.dilation
                )
            ]
            image = x.new_tensor(self.mean).view(1, -1, 1, 1).expand(1, x.shape[1], *shape)
            self._constants[key] = self.convolve(image.contiguous(), padding)
        return self._constants[key]


def rows_conv(convs: Sequence[InPlaceConv]) -> nn.Conv2d:
    """The convolution of a bottleneck's chain that sets which input rows a band of output rows reads
    (the depthwise one: the others are 1x1)."""
    return next(layer.conv for layer in convs if layer.conv.kernel_size != (1, 1))


def conv_norm_act_step(cna: nn.Sequential) -> ConvStep:
    """The ConvStep of a torchvision Conv2dNormActivation: [conv, BN?, act?]."""
    layers = list(cna)
    bn = next((m for m in layers[1:] if isinstance(m, nn.BatchNorm2d)), None)
    act = next((m for m in layers[1:] if not isinstance(m, nn.BatchNorm2d)), nn.Identity())
    return ConvStep(layers[0], bn, act)


def bottleneck_parts(block: nn.Module) -> dict | None:
    """ChunkedBottleneck's arguments (but the group) for a bottleneck block, or None for other modules."""
    from leanvision.models.mobilenet import DepthwiseSeparable

    if isinstance(block, (InvertedResidual, MBConv)):
        layers = list(block.conv if isinstance(block, InvertedResidual) else block.block)
        se = next((m._scale for m in layers if isinstance(m, SqueezeExcitation)), None)
        layers = [m for m in layers if not isinstance(m, SqueezeExcitation)]
        if isinstance(block, InvertedResidual):  # [expand]?, depthwise, project conv, BN
            layers = [*layers[:-2], nn.Sequential(*layers[-2:])]
        expand = conv_norm_act_step(layers[0]) if len(layers) == 3 else None
        shortcut = "add" if block.use_res_connect else "none"
        return dict(
            expand=expand,
            depthwise=conv_norm_act_step(layers[-2]),
            project=conv_norm_act_step(layers[-1]),
            shortcut=shortcut,
            se=se,
        )
    if isinstance(block, LinearBottleneck):
        exp, dw, pwl = block.conv_exp, block.conv_dw, block.conv_pwl
        shortcut = "none"
        if block.use_shortcut:
            shortcut = "add" if block.in_channels == block.out_channels else "partial"
        se = None if block.se is None else block.se.scale
        return dict(
            expand=None if exp is None else ConvStep(exp.conv, exp.bn, exp.act),
            depthwise=ConvStep(dw.conv, dw.bn, nn.Identity() if se else block.act_dw),  # [SE,] act_dw
            project=ConvStep(pwl.conv, pwl.bn, nn.Identity()),
            shortcut=shortcut,
            se=se,
            post_se_act=block.act_dw if se else None,
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
    parts = bottleneck_parts(block)
    if parts is None:
        return None
    (height, width), (sh, sw) = input_hw, parts["depthwise"].conv.stride
    out_area = -(-height // sh) * -(-width // sw)
    per_channel = 4 * (height * width + out_area)
    if parts.get("se") is not None:  # the squeeze-excite's channel scales are held beside every group
        band_bytes -= 4 * parts["depthwise"].conv.in_channels
    # the SE's first pass holds no output yet: its groups take the output's bytes too
    mean_bytes = band_bytes + 4 * parts["project"].conv.out_channels * out_area
    return ChunkedBottleneck(
        **parts, group=max(1, band_bytes // per_channel), mean_group=max(1, mean_bytes // per_channel)
    )


def banded_basic_block(block: nn.Module, input_shape: torch.Size, band_bytes: int) -> BandedBasicBlock | None:
    """BandedBasicBlock for a torchvision BasicBlock, with bands whose maps fit `band_bytes`: the first
    conv's rows (the band's and a halo row above and below), the second's, and the downsample's."""
    if not isinstance(block, BasicBlock):
        return None
    conv = block.conv1
    row_bytes = 4 * conv.out_channels * conv_out(input_shape[3], conv, 1)
    maps = 2 + (block.downsample is not None)
    return BandedBasicBlock(block, max(1, (band_bytes // row_bytes - 2) // maps))


def banded_inception(
    block: nn.Module, input_shape: torch.Size, band_bytes: int, pool: nn.Module | None = None
) -> BandedInception | None:
    """BandedInception for a torchvision Inception (then `pool`, a max pool pool_runs_in_rows computes),
    with bands whose largest path's maps fit `band_bytes`; None for other modules."""
    from torchvision.models.googlenet import BasicConv2d, Inception

    if not isinstance(block, Inception) or (pool is not None and not pool_runs_in_rows(pool)):
        return None
    paths = []
    for branch in (block.branch1, block.branch2, block.branch3, block.branch4):
        path = []
        for layer in branch if isinstance(branch, nn.Sequential) else [branch]:
            if isinstance(layer, BasicConv2d):  # conv, BN, then a functional ReLU
                path.append(InPlaceConv(ConvStep(layer.conv, layer.bn, nn.ReLU())))
            elif pool_runs_in_rows(layer):
                path.append(layer)
            else:
                return None
        if not isinstance(path[-1], InPlaceConv):
            return None
        paths.append(path)
    channels, width = sum(path[-1].conv.out_channels for path in paths), input_shape[3]

    def most_rows(bytes_of: Callable[[int], int], budget: int) -> int:
        return max([r for r in range(1, input_shape[2] + 1) if bytes_of(r) <= budget], default=1)

    def path_rows(budget: int) -> list[int]:  # each path's band that fits budget
        return [
            most_rows(functools.partial(_band_bytes, path, in_channels=input_shape[1], width=width), budget)
            for path in paths
        ]

    if pool is None:
        return BandedInception(paths, path_rows(band_bytes))

    def pool_bytes(rows: int) -> int:  # the block's rows that `rows` pool output rows read, and the pool's
        block_rows = _reads(pool, Span(0, rows)).stop
        return 4 * channels * block_rows * width + _band_bytes([pool], rows, channels, width)

    half = band_bytes // 2
    return BandedInception(paths, path_rows(half), pool, most_rows(pool_bytes, half))


def _band_bytes(layers: Sequence[nn.Module], rows: int, in_channels: int, width: int) -> int:
    """fp32 bytes of the maps chain_rows makes for `rows` output rows of `layers` on a map `width` wide
    with `in_channels` channels, all counted alive: each layer's rows with their halos, and a max pool's
    int64 indices and -inf padded copy of the rows it reads (at the map's edges) for one channel group."""
    spans = [Span(0, rows)]
    for layer in reversed(layers):
        spans.append(_reads(layer, spans[-1]))
    total, channels = 0, in_channels
    for layer, read, made in zip(layers, reversed(spans), reversed(spans[:-1])):
        if isinstance(layer, InPlaceConv):
            channels = layer.conv.out_channels
            total += channels * (made.stop - made.start)
        else:
            group = -(-channels // POOL_GROUPS)
            total += channels * (made.stop - made.start)
            total += group * (2 * (made.stop - made.start) + read.stop - read.start)
    return 4 * total * width


def streamed_dense_block(
    block: nn.Module, input_shape: torch.Size, band_bytes: int
) -> StreamedDenseBlock | None:
    """StreamedDenseBlock for a torchvision _DenseBlock, with channel groups whose maps fit `band_bytes`
    beside a dense layer's bottleneck map and new features."""
    if not isinstance(block, densenet._DenseBlock):
        return None
    first = next(iter(block.values()))
    maps = band_bytes // (4 * input_shape[2] * input_shape[3])
    return StreamedDenseBlock(block, max(1, maps - first.conv1.out_channels - first.conv2.out_channels))


def banded_transition(
    transition: nn.Module, input_shape: torch.Size, band_bytes: int
) -> BandedTransition | None:
    """BandedTransition for a DenseNet _Transition (1x1 conv) whose pool is an unpadded AvgPool2d, with bands
    and groups whose maps fit `band_bytes`."""
    pool = getattr(transition, "pool", None)
    if not isinstance(transition, densenet._Transition) or not isinstance(pool, nn.AvgPool2d):
        return None
    if _pair(pool.padding) != (0, 0) or pool.ceil_mode:
        return None
    if transition.conv.kernel_size != (1, 1):
        return None
    kernel, stride = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size)
    out_width = (input_shape[3] - kernel[1]) // stride[1] + 1
    # half the bytes for a band of the pooled map and the conv's output, a quarter for a group
    row_bytes = 4 * (transition.conv.in_channels + transition.conv.out_channels) * out_width
    rows = max(1, band_bytes // (2 * row_bytes))
    group = band_bytes // (16 * ((rows - 1) * stride[0] + kernel[0]) * input_shape[3])
    return BandedTransition(transition, rows, max(1, group))


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
        or banded_inception(module, input_shape, band_bytes)
        or streamed_dense_block(module, input_shape, band_bytes)
        or banded_transition(module, input_shape, band_bytes)
        or chunked_max_pool(module, input_shape, band_bytes)
        or InPlaceConv.of(module)
    )
