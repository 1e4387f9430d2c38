"""Maps computed as the rows of their input arrive, top to bottom, for streaming inference.

- ChainRun: a chain of convolutions fed its input's rows: each convolution computes the output rows the rows
  it holds allow and keeps only the halo rows its next ones read (BandedHead's branches are ChainRuns);
- PoolIntoBlocks: a StreamedRNNPool whose output rows are fed, as the pool makes them, to the residual
  blocks after it (RowBlock: ResNet BasicBlocks, inverted residuals; ResidualRun), each block's rows to
  the next: the pool's output and the maps between the blocks are never whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from leanvision.deploy.lean_blocks import (
    BandedBasicBlock,
    ChunkedBottleneck,
    InPlaceConv,
    _conv_rows,
    _Rows,
    bottleneck_parts,
    chain_rows,
    rows_conv,
)
from leanvision.deploy.regions import Span, conv_out
from leanvision.errors import InvalidArgumentError

if TYPE_CHECKING:
    from leanvision.deploy.streamed_rnnpool import StreamedRNNPool

# A ResidualRun computes once this many new input rows are held (or the last one), in bands of at most
# this many rows: a band of a wide convolution costs about a pass over its weights (~0.25 ms for ResNet's
# 256-channel 3x3 convs) however few its rows, and every row of a band is RAM.
BLOCK_STEP_ROWS = 2
# The same for an inverted residual's fused step, whose expanded channels run in groups that fit the band
# RAM: taller steps then hold only more input rows, for fewer calls (RNNPool-Face-Quant's first block:
# 2-row steps 2.13x eager; 4-row steps in 2 groups 1.97x at the same peak, 8-row steps 1.89x, 54 KiB more).
FUSED_STEP_ROWS = 4


def first_read(conv: nn.Conv2d, row: int) -> int:
    """The first input row that output row `row` of `conv` reads (negative in the zero padding)."""
    return Span(row, row + 1).through_conv(conv).start


def rows_from(rows: _Rows | None, first: int) -> _Rows | None:
    """The rows `rows` holds from row `first` of the map on, or None if none: a copy, so that the rows
    before them are freed."""
    if rows is None or first >= rows.start + rows.tensor.shape[2]:
        return None
    first = max(first, rows.start)
    return _Rows(rows.tensor[:, :, first - rows.start :].clone(), first, rows.height)


def extended(held: _Rows | None, new: _Rows) -> _Rows:
    """The rows of `held` above those of `new`, then `new`'s: rows of one map, no gap between them."""
    if held is None or held.start >= new.start:
        return new
    if held.start + held.tensor.shape[2] < new.start:
        raise AssertionError(f"rows {held.start + held.tensor.shape[2]}..{new.start} were never computed")
    above = held.tensor[:, :, : new.start - held.start]
    return _Rows(torch.cat([above, new.tensor], 2), held.start, new.height)


def rows_allowed(conv: nn.Conv2d, rows: _Rows, out_height: int) -> int:
    """How many of conv's output rows (from the top) the input rows up to the last that `rows` holds
    allow: all of them once `rows` reaches the input's last row."""
    stop = rows.start + rows.tensor.shape[2]
    if stop >= rows.height:
        return out_height
    k, s, p, d = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]
    return min(max((stop + p - d * (k - 1) - 1) // s + 1, 0), out_height)


class ChainRun:
    """One forward of a chain of convolutions (InPlaceConvs) on a map `height` rows high, fed the map's
    rows top to bottom: the input rows each convolution after the first still holds and the next output
    row each computes."""

    def __init__(self, convs: Sequence[InPlaceConv], height: int) -> None:
        self.convs, self.heights = convs, [height]
        for layer in convs:
            self.heights.append(conv_out(self.heights[-1], layer.conv, 0))
        self.held: list[_Rows | None] = [None] * len(convs)
        self.done = [0] * len(convs)

    @property
    def first_needed(self) -> int:
        """The first input row that the next feed must still hold."""
        return first_read(self.convs[0].conv, self.done[0])

    def first_needed_after(self, rows: _Rows) -> int:
        """The first input row that the feed after feeding `rows` (without max_rows) must still hold."""
        conv = self.convs[0].conv
        return first_read(conv, max(self.done[0], rows_allowed(conv, rows, self.heights[1])))

    def feed(self, rows: _Rows | None, max_rows: int | None = None) -> _Rows | None:
        """The chain's output rows that the input rows up to the last one in `rows` newly allow (None if
        none); `rows` must hold every input row from `first_needed` on (None: no new input rows, the later
        convolutions compute from the rows they hold). With `max_rows`, each convolution computes at most
        that many rows: call again until `done` stays the same."""
        return self.take([rows], max_rows)

    def take(self, box: list[_Rows | None], max_rows: int | None = None) -> _Rows | None:
        """feed(box.pop()), where the box held the caller's only reference to the rows: they are freed
        once the first convolution has read them."""
        rows = box.pop()
        for level, layer in enumerate(self.convs):
            if level:  # the rows held before are not kept beside the extended ones
                held, self.held[level] = self.held[level], None
                rows = held if rows is None else extended(held, rows)
                del held
            if rows is None:
                continue
            start, stop = self.done[level], rows_allowed(layer.conv, rows, self.heights[level + 1])
            stop = stop if max_rows is None else min(stop, start + max_rows)
            if level:
                self.held[level] = rows_from(rows, first_read(layer.conv, max(start, stop)))
            if stop <= start:
                rows = None
                continue
            rows, self.done[level] = _conv_rows(layer, rows, Span(start, stop), self.heights[level + 1]), stop
        return rows


class RowBlock(nn.Module):
    """A residual block as a row run computes it: a chain of convolutions (InPlaceConvs), plus a shortcut
    (the block's input, a convolution of it, or none), then an activation.

    An inverted residual's chain (1x1 expand, depthwise, 1x1 project) runs as one step where the numba
    kernel computes it (`fused`, a ChunkedBottleneck.row_step: two GEMMs around one kernel call on a
    band of input rows per group of expanded channels, the expansion of the depthwise conv's halo rows
    recomputed, instead of three convolutions each keeping its halo rows: a row of 16-64 channels is too
    little work for the ~20 torch calls the chain takes). `step_rows`: the output rows a step computes."""

    def __init__(
        self,
        convs: Sequence[InPlaceConv],
        shortcut: InPlaceConv | None,
        identity: bool,
        act: nn.Module,
        fused: ChunkedBottleneck | None = None,
    ) -> None:
        super().__init__()
        self.convs, self.shortcut, self.identity, self.act = nn.ModuleList(convs), shortcut, identity, act
        self.fused, self.step_rows = fused, BLOCK_STEP_ROWS

    @classmethod
    def of(
        cls, module: nn.Module, width: int | None = None, band_bytes: int | None = None
    ) -> RowBlock | None:
        """For a torchvision BasicBlock (or its BandedBasicBlock) and an inverted residual / MBConv
        without squeeze-excite (lean_blocks.bottleneck_parts); None for other modules. A fused step
        computes BLOCK_STEP_ROWS rows in one group, or with `band_bytes` FUSED_STEP_ROWS rows in groups
        whose work on a map `width` wide fits it (ChunkedBottleneck.row_step)."""
        if isinstance(module, BasicBlock):
            module = BandedBasicBlock(module, 1)
        if isinstance(module, BandedBasicBlock):
            return cls(module.convs, module.downsample, module.downsample is None, nn.ReLU(inplace=True))
        parts = bottleneck_parts(module)
        if parts is None or parts.get("se") is not None or parts["shortcut"] == "partial":
            return None
        convs = [InPlaceConv(parts[step]) for step in ("expand", "depthwise", "project") if parts[step]]
        fused = ChunkedBottleneck.row_step(parts, FUSED_STEP_ROWS, width, band_bytes)
        block = cls(convs, None, parts["shortcut"] == "add", nn.Identity(), fused)
        if fused is not None and band_bytes is not None:
            block.step_rows = FUSED_STEP_ROWS
        return block

    @property
    def rows_conv(self) -> nn.Conv2d:
        """The convolution whose rows the fused step computes (lean_blocks.rows_conv)."""
        return rows_conv(self.convs)

    def step_bytes(self, height: int, width: int) -> tuple[int, int]:
        """fp32 bytes (held, work) of a run of the block on a map `height` x `width` computing `step_rows`
        output rows a step: held from step to step (the chain's: each convolution's rows with the halo the
        next one reads; the fused step's: its band of input rows) and alive during a step only (the fused
        step's expansion of the band, unless it reads the input rows themselves, and its depthwise and
        projected rows)."""
        step_rows = self.step_rows
        if self.fused is not None:
            conv = self.rows_conv
            rows = min(step_rows, conv_out(height, conv, 0))
            band = Span(0, rows).through_conv(conv).stop
            return 4 * self.convs[0].conv.in_channels * band * width, self.fused.rows_bytes(rows, width)
        sizes, rows = [(height, width)], step_rows
        for layer in self.convs:
            sizes.append(tuple(conv_out(size, layer.conv, axis) for axis, size in enumerate(sizes[-1])))
        total = 0
        for layer, (out_height, out_width) in zip(reversed(self.convs), reversed(sizes[1:])):
            total += layer.conv.out_channels * min(rows, out_height) * out_width
            rows = Span(0, rows).through_conv(layer.conv).stop
        return 4 * total, 0


class ResidualRun:
    """One forward of a RowBlock on a map `height` rows high (of one image), fed the map's rows top to
    bottom: its chain is a ChainRun (or, for a fused block, one step per band of rows, the ChainRun then
    only its geometry), its shortcut reads the rows it needs from those held. It holds the few input rows
    its next output rows read and its convolutions' halo rows; each feed returns the output rows it
    completes (once `step_rows` new rows are held, or the last one)."""

    def __init__(self, block: RowBlock, height: int, step_rows: int) -> None:
        self.block, self.main, self.step_rows = block, ChainRun(block.convs, height), step_rows
        self.held: _Rows | None = None  # the input rows the chain and the shortcut still read
        self.fed = self.computed = 0  # rows fed; rows fed when the block last computed

    @property
    def out_height(self) -> int:
        return self.main.heights[-1]

    def feed(self, rows: _Rows) -> list[_Rows]:
        """The output rows that the map's next rows (starting at the first row not fed yet) complete, in
        bands of at most `step_rows` rows (so that the last rows of the map are no larger a band)."""
        if rows.start != self.fed:
            raise AssertionError(f"row {self.fed} of the map is next, got rows from {rows.start}")
        held, self.held = extended(self.held, rows), None  # the rows held before are not kept beside
        self.fed = held.start + held.tensor.shape[2]
        if self.fed < min(self.computed + self.step_rows, held.height):
            self.held = held
            return []
        self.computed, block, bands = self.fed, self.block, []
        for y in self._fused_rows(held) if block.fused is not None else self._chain_rows(held):
            band = Span(y.start, y.start + y.tensor.shape[2])
            if block.identity:
                y.tensor.add_(held.tensor[:, :, band.start - held.start : band.stop - held.start])
            elif block.shortcut is not None:
                y.tensor.add_(chain_rows([block.shortcut], held, band))
            bands.append(_Rows(block.act(y.tensor), y.start, y.height))
        next_row = self.main.done[-1]  # the shortcut's first input row for the next output row
        needed = first_read(block.shortcut.conv, next_row) if block.shortcut is not None else next_row
        main = first_read(block.rows_conv, next_row) if block.fused is not None else self.main.first_needed
        self.held = rows_from(held, min(needed, main))
        return bands

    def _chain_rows(self, held: _Rows) -> Iterator[_Rows]:
        """The chain's output rows that `held` newly allows, in bands of at most step_rows rows."""
        while True:
            done = list(self.main.done)
            y = self.main.feed(held, self.step_rows)
            if y is not None:
                yield y
            if self.main.done == done:
                return

    def _fused_rows(self, held: _Rows) -> Iterator[_Rows]:
        """The fused step's output rows that `held` newly allows, in bands of at most step_rows rows (the
        chain's `done` kept as the step's, every level's the same)."""
        conv, done = self.block.rows_conv, self.main.done[-1]
        stop = rows_allowed(conv, held, self.out_height)
        for start in range(done, stop, self.step_rows):
            out = Span(start, min(start + self.step_rows, stop))
            inside, top, _ = out.through_conv(conv).clip(held.height)
            x = held.tensor[:, :, inside.start - held.start : inside.stop - held.start]
            self.main.done = [out.stop] * len(self.main.done)
            yield _Rows(self.block.fused.rows(x, top, out.stop - out.start), out.start, self.out_height)


class PoolIntoBlocks(nn.Module):
    """A StreamedRNNPool and the RowBlocks after it, as one: each output row of the pool is fed to the
    first block (ResidualRun) as the pool makes it, each block's output rows to the next as they are
    completed, and the last block's are written into its output: the maps between them are never whole
    (ResNet18-RNNPool's pool output and layer3's maps, RNNPool-Face-Quant's pool output). A pool with a
    head runs it as StreamedRNNPool does, leaving its outputs in the pool's handoff."""

    def __init__(self, pool: StreamedRNNPool, blocks: Sequence[RowBlock]) -> None:
        super().__init__()
        if not blocks:
            raise InvalidArgumentError("PoolIntoBlocks needs some blocks to feed")
        self.pool, self.blocks = pool, nn.ModuleList(blocks)

    def _one(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        head = None if self.pool.head is None else self.pool.head.start(x, *self.pool.prefix_size(x))
        runs, out = [], None
        for row in self.pool.output_rows(x, head):
            if not runs:
                for block in self.blocks:  # each in steps of its step_rows rows: fewer, larger calls
                    runs.append(
                        ResidualRun(block, runs[-1].out_height if runs else row.height, block.step_rows)
                    )
            bands = [row]
            for run in runs:
                bands = [y for rows in bands for y in run.feed(rows)]
            for rows in bands:
                if out is None:
                    out = x.new_empty(*rows.tensor.shape[:2], rows.height, rows.tensor.shape[3])
                out[:, :, rows.start : rows.start + rows.tensor.shape[2]] = rows.tensor
            del row, bands
        return out, None if head is None else head.outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, self.pool.handoff.outputs = per_image(self._one, x)
        return out


def per_image(
    one: Callable[[torch.Tensor], tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]], x: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """one(x) of a batch-1 executor (an output and a head's outputs or None) for a batch x: image by image
    where it holds more than one, the outputs concatenated."""
    if x.shape[0] == 1:
        return one(x)
    parts = [one(image[None]) for image in x]
    heads = [head for _, head in parts]
    return torch.cat([out for out, _ in parts]), None if heads[0] is None else tuple(
        map(torch.cat, zip(*heads))
    )
