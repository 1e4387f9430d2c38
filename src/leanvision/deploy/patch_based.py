"""MCUNetV2-style patch-based inference: the first blocks of a plain CNN run output patch by output patch.

`stream(model, input_size, split_blocks=K)` returns a PatchBasedModel, an inference-only copy of `model`
with the same output, in which
- the first K blocks (torchvision's Conv2dNormActivation and InvertedResidual, leanvision's ConvNormAct and
  DepthwiseSeparable) run as PatchedBlocks: for each patch of the K-th block's output (full-width bands of
  rows where they fit the budget, square patches otherwise) the receptive fields are walked back block by
  block, each convolution computes only the region of its output that the patch needs (zero padding added
  explicitly at the map's borders, the overlap of neighbouring patches recomputed), and the patch is
  written into the K-th block's output map, the only map of the first K blocks that is ever whole;
- the later layers run as in StreamedModel (streaming.lean_module: inverted residuals channel group by
  channel group), each holding its input and its output.
The recomputation is counted: `extra_macs`, the convolution MACs run beyond the eager model's `base_macs`
(batch 1). Batch 1 is the target; larger batches run image by image through the first blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.ops.misc import Conv2dNormActivation

from leanvision.deploy.lean_blocks import ChunkedBottleneck, InPlaceConv, bottleneck_parts, rows_conv
from leanvision.deploy.regions import Span, conv_out, pad_zeros
from leanvision.deploy.rewrite import (
    InferenceOnly,
    ModuleCall,
    computes,
    eval_copy,
    flatten_sequentials,
    lean_calls,
    make_lean,
    module_calls,
    set_module,
)
from leanvision.errors import InvalidArgumentError
from leanvision.layers import ConvNormAct
from leanvision.models.mobilenet import DepthwiseSeparable

BANDED_KINDS = (Conv2dNormActivation, ConvNormAct, InvertedResidual, DepthwiseSeparable)
PEAK_TOLERANCE = 1.1  # the default split: the fewest blocks within 10% of the least estimated peak


def _out_hw(size: tuple[int, int], conv: nn.Conv2d) -> tuple[int, int]:
    return conv_out(size[0], conv, 0), conv_out(size[1], conv, 1)


def _area(rows: Span, cols: Span) -> int:
    return (rows.stop - rows.start) * (cols.stop - cols.start)


def _axis_padding(lead: int, trail: int, stride: int) -> tuple[int, int, int]:
    """For one axis of a convolution whose input region needs `lead` zeros before it and `trail` after:
    the padding the convolution adds on both sides, the zeros F.pad adds after the region first, and the
    outputs to drop at the start. Both sides take the larger padding where the extra zeros before the
    region shift the outputs by whole strides (their outputs are dropped): nothing is copied then."""
    both = max(lead, trail)
    if (both - lead) % stride:
        both = lead
    return both, max(trail - both, 0), (both - lead) // stride


def _conv_len(size: int, conv: nn.Conv2d, axis: int, padding: int) -> int:
    """Output length of `conv` along `axis` for an input of `size` padded by `padding` on both sides."""
    kernel, stride, dilation = conv.kernel_size[axis], conv.stride[axis], conv.dilation[axis]
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@dataclass(frozen=True)
class _Read:
    """How a convolution computes its part of a patch: the rows and columns of its input map it reads
    (inside the map), the padding it adds on both sides, the zeros F.pad adds after the region first, and
    the outputs it drops at the start and keeps after them; each as (rows, columns)."""

    rows: Span
    cols: Span
    padding: tuple[int, int]
    extra: tuple[int, int]
    drop: tuple[int, int]
    keep: tuple[int, int]

    @classmethod
    def of(cls, conv: nn.Conv2d, rows: Span, cols: Span, size: tuple[int, int]) -> _Read:
        """For output rows x cols of `conv` on an input map of `size` (H, W)."""
        axes = []
        for axis, span in enumerate((rows, cols)):
            inside, lead, trail = span.through_conv(conv, axis).clip(size[axis])
            axes.append((inside, *_axis_padding(lead, trail, conv.stride[axis])))
        (in_rows, pad_r, extra_r, drop_r), (in_cols, pad_c, extra_c, drop_c) = axes
        keep = (rows.stop - rows.start, cols.stop - cols.start)
        return cls(in_rows, in_cols, (pad_r, pad_c), (extra_r, extra_c), (drop_r, drop_c), keep)

    def floats(self, conv: nn.Conv2d) -> int:
        """Elements alive while the convolution runs: its input region, the copy F.pad makes of it (if
        any) and its output before the drop."""
        height, width = self.rows.stop - self.rows.start, self.cols.stop - self.cols.start
        copy = (height + self.extra[0]) * (width + self.extra[1]) if any(self.extra) else 0
        out_h = _conv_len(height + self.extra[0], conv, 0, self.padding[0])
        out_w = _conv_len(width + self.extra[1], conv, 1, self.padding[1])
        return conv.in_channels * (height * width + copy) + conv.out_channels * out_h * out_w


class BandBlock(nn.Module):
    """A block of a plain CNN as the convolutions it chains (each conv -> BN -> activation, an InPlaceConv),
    with the block's input added to its output when `shortcut`. An inverted residual or depthwise-separable
    block computes a full-width band of rows as one fused step where the numba kernel applies (`fused`,
    ChunkedBottleneck.row_step): two GEMMs around one kernel call instead of its convolutions."""

    def __init__(
        self, convs: Sequence[InPlaceConv], shortcut: bool, fused: ChunkedBottleneck | None = None
    ) -> None:
        super().__init__()
        self.convs, self.shortcut, self.fused = nn.ModuleList(convs), shortcut, fused

    @classmethod
    def of(cls, block: nn.Module) -> BandBlock | None:
        """The BandBlock of a module of BANDED_KINDS; None for other modules."""
        if not isinstance(block, BANDED_KINDS):
            return None
        conv = InPlaceConv.of(block)
        if conv is not None:
            return cls([conv], shortcut=False)
        parts = bottleneck_parts(block)
        steps = [step for step in (parts["expand"], parts["depthwise"], parts["project"]) if step is not None]
        convs = [InPlaceConv(step) for step in steps]
        return cls(convs, shortcut=parts["shortcut"] == "add", fused=ChunkedBottleneck.row_step(parts))

    def fused_band(self, rows: Span, size: tuple[int, int]) -> tuple[Span, int] | None:
        """For output rows `rows` at full width on an input map of `size` (H, W): the input rows the fused
        step reads and the zero rows above them, or None where the fused step does not run."""
        if self.fused is None:
            return None
        inside, top, _ = rows.through_conv(rows_conv(self.convs), 0).clip(size[0])
        return inside, top

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        for layer in self.convs:
            size = _out_hw(size, layer.conv)
        return size

    def reads(self, rows: Span, cols: Span, size: tuple[int, int]) -> list[_Read]:
        """What each convolution (first to last) reads to compute rows x cols of the block's output (inside
        its bounds) from an input map of `size` (H, W)."""
        convs = list(self.convs)  # (a slice of the ModuleList would build a new one each call)
        sizes = [size]
        for layer in convs[:-1]:
            sizes.append(_out_hw(sizes[-1], layer.conv))
        reads = []
        for layer, size in zip(reversed(convs), reversed(sizes)):
            reads.append(_Read.of(layer.conv, rows, cols, size))
            rows, cols = reads[-1].rows, reads[-1].cols
        return reads[::-1]


class PatchedBlocks(nn.Module):
    """`blocks`, in order, computed patch (rows, columns) by patch of the last one's output: each patch
    computes only the regions of the blocks' maps it needs (recomputing what neighbouring patches share),
    so only one patch's regions and the output map are alive. `macs`: the convolution MACs that the last
    forward ran."""

    def __init__(self, blocks: Sequence[BandBlock], patch: tuple[int, int]) -> None:
        super().__init__()
        if len(patch) != 2 or min(patch) < 1:
            raise InvalidArgumentError(f"patch must be (rows, columns) >= 1, got {patch!r}")
        self.blocks, self.patch, self.macs = nn.ModuleList(blocks), tuple(patch), 0

    def sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """(H, W) of every block's input, and of the last block's output last."""
        sizes = [(height, width)]
        for block in self.blocks:
            sizes.append(block.output_size(sizes[-1]))
        return sizes

    def patch_bytes(self, patch: tuple[int, int], input_hw: tuple[int, int]) -> int:
        """fp32 bytes alive at most while the middle output patch of size `patch` is computed: those of one
        of its convolutions (_Read.floats), with the block input that a shortcut holds."""
        sizes = self.sizes(*input_hw)
        (height, width), (ph, pw) = sizes[-1], (min(patch[0], sizes[-1][0]), min(patch[1], sizes[-1][1]))
        rows = Span((height - ph) // 2, (height - ph) // 2 + ph)
        cols = Span((width - pw) // 2, (width - pw) // 2 + pw)
        floats = 0
        for block, size in zip(reversed(self.blocks), reversed(sizes[:-1])):
            band = block.fused_band(rows, size) if cols == Span(0, block.output_size(size)[1]) else None
            if band is not None:  # the input band, and what the fused step makes beside it
                made = block.fused.rows_bytes(rows.stop - rows.start, size[1]) // 4
                rows, cols = band[0], Span(0, size[1])
                floats = max(floats, block.convs[0].conv.in_channels * _area(rows, cols) + made)
                continue
            reads = block.reads(rows, cols, size)
            rows, cols = reads[0].rows, reads[0].cols
            held = block.convs[0].conv.in_channels * _area(rows, cols) if block.shortcut else 0
            floats = max(
                floats, held + max(read.floats(layer.conv) for layer, read in zip(block.convs, reads))
            )
        return 4 * floats

    def _conv(self, layer: InPlaceConv, x: torch.Tensor, read: _Read) -> torch.Tensor:
        """layer on the region x as `read` plans it: padded, convolved, the outputs not asked for dropped."""
        (extra_r, extra_c), (drop_r, drop_c), (keep_r, keep_c) = read.extra, read.drop, read.keep
        conv = layer.conv
        if conv.kernel_size == conv.stride == (1, 1) and conv.padding == (0, 0) and conv.groups == 1:
            # a pointwise conv of a small region (of one image) runs ~10x faster as a matrix product
            y = torch.mm(conv.weight.view(conv.out_channels, -1), x.reshape(x.shape[1], -1))
            y = layer.finish(y.view(1, -1, *x.shape[2:]))
        else:
            y = layer(pad_zeros(x, (0, extra_c, 0, extra_r)), padding=read.padding)
        self.macs += y.numel() * layer.conv.weight[0].numel()
        return y[:, :, drop_r : drop_r + keep_r, drop_c : drop_c + keep_c]

    def _region(
        self, x: torch.Tensor, depth: int, rows: Span, cols: Span, sizes: list[tuple[int, int]]
    ) -> torch.Tensor:
        """Output of the first `depth` blocks on rows x cols (inside that output's bounds)."""
        if depth == 0:
            return x[:, :, rows.start : rows.stop, cols.start : cols.stop]
        block = self.blocks[depth - 1]
        band = block.fused_band(rows, sizes[depth - 1]) if cols == Span(0, sizes[depth][1]) else None
        if band is not None:
            return self._fused_rows(x, depth, rows, band, sizes)
        reads = block.reads(rows, cols, sizes[depth - 1])
        y = self._region(x, depth - 1, reads[0].rows, reads[0].cols, sizes)
        top, left = rows.start - reads[0].rows.start, cols.start - reads[0].cols.start
        skip = y[:, :, top : top + rows.stop - rows.start, left : left + cols.stop - cols.start]
        skip = skip if block.shortcut else None  # holds the block's input
        for layer, read in zip(block.convs, reads):
            y = self._conv(layer, y, read)
        return y if skip is None else y.add_(skip)

    def _fused_rows(
        self, x: torch.Tensor, depth: int, rows: Span, band: tuple[Span, int], sizes: list[tuple[int, int]]
    ) -> torch.Tensor:
        """Rows `rows` (full width) of the first `depth` blocks' output, the last block's by its fused step
        from the input rows and top padding `band` (BandBlock.fused_band)."""
        block, (inside, top) = self.blocks[depth - 1], band
        y = self._region(x, depth - 1, inside, Span(0, sizes[depth - 1][1]), sizes)
        out = block.fused.rows(y, top, rows.stop - rows.start)
        convs = [layer.conv for layer in block.convs]
        if len(convs) == 3:  # the expansion of every input row of the band
            self.macs += convs[0].weight.numel() * y.shape[2] * y.shape[3]
        self.macs += (
            sum(conv.out_channels * conv.weight[0].numel() for conv in convs[-2:]) * out[0, 0].numel()
        )
        if block.shortcut:
            out.add_(y[:, :, rows.start - inside.start : rows.stop - inside.start])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = self.sizes(x.shape[2], x.shape[3])
        (height, width), (ph, pw) = sizes[-1], self.patch
        out = x.new_empty(x.shape[0], self.blocks[-1].convs[-1].conv.out_channels, height, width)
        self.macs = 0
        for n in range(x.shape[0]):
            for r0 in range(0, height, ph):
                for c0 in range(0, width, pw):
                    rows, cols = Span(r0, min(r0 + ph, height)), Span(c0, min(c0 + pw, width))
                    region = self._region(x[n : n + 1], len(self.blocks), rows, cols, sizes)
                    out[n : n + 1, :, rows.start : rows.stop, cols.start : cols.stop] = region
                    del region  # not alive while the next patch is computed
        return out


def fit_patch(blocks: PatchedBlocks, input_hw: tuple[int, int], budget: int) -> tuple[int, int]:
    """The largest patch whose patch_bytes fit `budget` (larger patches recompute less): full-width bands of
    as many rows as fit, else the largest square patches that fit, else 1x1."""
    height, width = blocks.sizes(*input_hw)[-1]
    bands = [(rows, width) for rows in range(height, 0, -1)]
    squares = [(side, side) for side in range(min(height, width - 1), 0, -1)]
    return next((p for p in bands + squares if blocks.patch_bytes(p, input_hw) <= budget), (1, 1))


def _eager_macs(call: ModuleCall) -> int:
    """MACs of one call of a Conv2d or a Linear as the eager model runs it; 0 for other modules."""
    module, shape = call.module, call.input_shape
    if isinstance(module, nn.Conv2d):
        height, width = _out_hw(shape[2:], module)
        return shape[0] * module.out_channels * height * width * module.weight[0].numel()
    if isinstance(module, nn.Linear):
        return math.prod(shape[:-1]) * module.in_features * module.out_features
    return 0


def _leading_blocks(calls: list[ModuleCall]) -> tuple[list[tuple[int, BandBlock]], ModuleCall | None]:
    """(index in `calls`, BandBlock) of the blocks that start the network and can run band by band (the
    outermost calls that are not plain nn.Sequential containers), and the call of the next block (None
    if the network ends with them)."""
    blocks = []
    for i, call in enumerate(calls):
        if not call.name or type(call.module) is nn.Sequential:
            continue
        if any(call.name.startswith(calls[j].name + ".") for j, _ in blocks):
            continue
        band = BandBlock.of(call.module)
        if band is None:
            return blocks, call
        blocks.append((i, band))
    return blocks, None


@dataclass
class _Split:
    """A plan for running the first `blocks` blocks patch by patch: the later calls that lean modules
    replace, the band_bytes of their groups, the RAM budget, the patch, and the peak it is estimated at."""

    blocks: int
    replaced: list[ModuleCall]
    band_bytes: int
    budget: int
    patch: tuple[int, int]
    peak: int


class PatchBasedModel(InferenceOnly):
    """An inference-only copy of a plain CNN whose first `split_blocks` blocks run patch by patch
    (PatchedBlocks) and whose later layers run as in StreamedModel; see the module docstring. Its forward
    equals the eval-mode model's.

    - split_blocks: how many leading blocks run patch by patch; None: the fewest whose estimated peak
      meets `budget_bytes` or, without a budget (or where none meets it), the fewest within PEAK_TOLERANCE
      of the least estimated peak: more blocks recompute more MACs for little RAM.
    - band_bytes: the least RAM one group of a later lean layer may take (default: a quarter of the K-th
      block's fp32 output, the first map kept whole).
    - budget_bytes: the peak RAM to fit, by choosing the patch and sizing the later groups. Default: the
      least the split reaches with full-width bands, the larger of the output map + a band of one row and
      the largest input + output of a later layer + band_bytes.
    - patch: (rows, columns) of the output patches (default: fit_patch to the budget).

    After construction: split_blocks, patch, budget_bytes, base_macs (the eager model's convolution and
    linear MACs, batch 1) and extra_macs (the MACs the recomputation adds to them).
    """

    def __init__(
        self,
        model: nn.Module,
        input_size: tuple[int, int, int],
        split_blocks: int | None = None,
        band_bytes: int | None = None,
        budget_bytes: int | None = None,
        patch: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        net, probe = eval_copy(model, input_size, band_bytes)
        if budget_bytes is not None and budget_bytes < 1:
            raise InvalidArgumentError(f"budget_bytes must be >= 1 (or None), got {budget_bytes}")
        if patch is not None and (len(patch) != 2 or min(patch) < 1):
            raise InvalidArgumentError(f"patch must be (rows, columns) >= 1 (or None), got {patch!r}")
        self.input_size = tuple(input_size)
        calls, _, expected = module_calls(net, probe)
        leading, stop = _leading_blocks(calls)
        if not leading or (split_blocks is not None and not 1 <= split_blocks <= len(leading)):
            kinds = ", ".join(kind.__name__ for kind in BANDED_KINDS)
            then = (
                "" if stop is None else f", then {stop.name} (a {type(stop.module).__name__}, which cannot)"
            )
            raise InvalidArgumentError(
                f"split_blocks must count leading blocks that can run patch by patch ({kinds}): "
                f"{type(model).__name__} starts with {len(leading)} of them{then}; got {split_blocks}"
            )
        input_hw = tuple(input_size[1:])
        candidates = range(1, len(leading) + 1) if split_blocks is None else [split_blocks]
        splits = [
            self._plan(calls, leading, k, input_hw, band_bytes, budget_bytes, patch) for k in candidates
        ]
        least = min(s.peak for s in splits)
        limit = least * PEAK_TOLERANCE if budget_bytes is None or budget_bytes < least else budget_bytes
        chosen = next(s for s in splits if s.peak <= limit)
        k = chosen.blocks
        patched = PatchedBlocks([band for _, band in leading[:k]], chosen.patch)
        names = [calls[i].name for i, _ in leading[:k]]
        set_module(net, names[0], patched)
        for name in names[1:]:
            set_module(net, name, nn.Identity())
        make_lean(net, chosen.replaced, chosen.band_bytes, chosen.budget)
        self.net = flatten_sequentials(net).requires_grad_(False)
        if not computes(self.net, probe, expected):
            raise InvalidArgumentError(
                f"{type(model).__name__} cannot run its first {k} blocks patch by patch: its forward is "
                "not a plain chain of them (a functional op between them, or a map read again later)"
            )
        inside = tuple(name + "." for name in names)
        eager = sum(_eager_macs(c) for c in calls if c.name in names or c.name.startswith(inside))
        self.split_blocks, self.patch, self.budget_bytes = k, chosen.patch, chosen.budget
        self.base_macs = sum(_eager_macs(c) for c in calls)
        self.extra_macs = patched.macs - eager  # counted by the probe forward above
        self.eval()

    @staticmethod
    def _plan(
        calls: list[ModuleCall],
        leading: list[tuple[int, BandBlock]],
        k: int,
        input_hw: tuple[int, int],
        band_bytes: int | None,
        budget_bytes: int | None,
        patch: tuple[int, int] | None,
    ) -> _Split:
        """The split of the first k leading blocks, and its estimated peak."""
        last = calls[leading[k - 1][0]]
        if band_bytes is None:
            band_bytes = max(1, last.output_bytes // 4)
        run, replaced = lean_calls(calls[leading[k - 1][0] + 1 :], [last], band_bytes)
        later = max((c.input_bytes + c.output_bytes for c in run if c.output_bytes), default=0) + band_bytes
        blocks = PatchedBlocks([band for _, band in leading[:k]], (1, 1))
        width = blocks.sizes(*input_hw)[-1][1]
        budget = budget_bytes
        if budget is None:  # the least that full-width bands reach
            budget = max(last.output_bytes + blocks.patch_bytes((1, width), input_hw), later)
        if patch is None:
            patch = fit_patch(blocks, input_hw, budget - last.output_bytes)
        peak = max(last.output_bytes + blocks.patch_bytes(patch, input_hw), later)
        return _Split(k, replaced, band_bytes, budget, tuple(patch), peak)
