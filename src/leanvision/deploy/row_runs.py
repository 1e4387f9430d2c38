"""Maps computed as the rows of their input arrive, top to bottom, for streaming inference.

- ChainRun: a chain of convolutions fed its input's rows: each convolution computes the output rows the rows
  it holds allow and keeps only the halo rows its next ones read (BandedHead's branches are ChainRuns);
- PoolIntoBlocks: a StreamedRNNPool whose output rows are fed, as the pool makes them, to the ResNet
  BasicBlocks after it (BasicBlockRun), each block's rows to the next: the pool's output and the maps
  between the blocks are never whole (ResNet18-RNNPool's largest maps).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from leanvision.deploy.lean_blocks import BandedBasicBlock, InPlaceConv, _conv_rows, _Rows, chain_rows
from leanvision.deploy.regions import Span, conv_out
from leanvision.errors import InvalidArgumentError

if TYPE_CHECKING:
    from leanvision.deploy.streamed_rnnpool import StreamedRNNPool

# A BasicBlockRun computes once this many new input rows are held (or the last one), in bands of at most
# this many rows: a band of a wide convolution costs about a pass over its weights (~0.25 ms for ResNet's
# 256-channel 3x3 convs) however few its rows, and every row of a band is RAM.
BLOCK_STEP_ROWS = 2


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

    def feed(self, rows: _Rows | None, max_rows: int | None = None) -> _Rows | None:
        """The chain's output rows that the input rows up to the last one in `rows` newly allow (None if
        none); `rows` must hold every input row from `first_needed` on (None: no new input rows, the later
        convolutions compute from the rows they hold). With `max_rows`, each convolution computes at most
        that many rows: call again until `done` stays the same."""
        for level, layer in enumerate(self.convs):
            if level:
                rows = self.held[level] if rows is None else extended(self.held[level], rows)
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


class BasicBlockRun:
    """One forward of a BandedBasicBlock on a map `height` rows high (of one image), fed the map's rows top
    to bottom: its main path is a ChainRun, its shortcut reads the rows it needs from those held. It holds
    the few input rows its next output rows read and the first convolution's halo rows; each feed
    returns the output rows it completes (once `step_rows` new rows are held, or the last one)."""

    def __init__(self, block: BandedBasicBlock, height: int, step_rows: int) -> None:
        self.block, self.main, self.step_rows = block, ChainRun(block.convs, height), step_rows
        self.held: _Rows | None = None  # the input rows the main path and the shortcut still read
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
        self.computed, shortcut, bands = self.fed, self.block.downsample, []
        while True:
            done = list(self.main.done)
            y = self.main.feed(held, self.step_rows)
            if y is not None:
                band = Span(y.start, y.start + y.tensor.shape[2])
                if shortcut is None:
                    y.tensor.add_(held.tensor[:, :, band.start - held.start : band.stop - held.start])
                else:
                    y.tensor.add_(chain_rows([shortcut], held, band))
                bands.append(_Rows(y.tensor.relu_(), y.start, y.height))
            if self.main.done == done:
                break
        next_row = self.main.done[-1]  # the shortcut's first input row for the next output row
        needed = next_row if shortcut is None else first_read(shortcut.conv, next_row)
        self.held = rows_from(held, min(self.main.first_needed, needed))
        return bands


class PoolIntoBlocks(nn.Module):
    """A StreamedRNNPool and the BandedBasicBlocks after it, as one: each output row of the pool is fed
    to the first block (BasicBlockRun) as the pool makes it, each block's output rows to the next as they
    are completed, and the last block's are written into its output: the maps between them are never
    whole (ResNet18-RNNPool's pool output and layer3's maps)."""

    def __init__(
        self, pool: StreamedRNNPool, blocks: Sequence[BandedBasicBlock], step_rows: int = BLOCK_STEP_ROWS
    ) -> None:
        super().__init__()
        if pool.head is not None or not blocks:
            raise InvalidArgumentError(
                "PoolIntoBlocks takes a StreamedRNNPool without a head and some blocks"
            )
        if step_rows < 1:
            raise InvalidArgumentError(f"step_rows must be >= 1, got {step_rows}")
        self.pool, self.blocks, self.step_rows = pool, nn.ModuleList(blocks), step_rows

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        runs, out = [], None
        for row in self.pool.output_rows(x):
            if not runs:
                for block in self.blocks:  # a later block takes its rows in the earlier one's steps
                    height, step = (runs[-1].out_height, 1) if runs else (row.height, self.step_rows)
                    runs.append(BasicBlockRun(block, height, step))
            bands = [row]
            for run in runs:
                bands = [y for rows in bands for y in run.feed(rows)]
            for rows in bands:
                if out is None:
                    out = x.new_empty(*rows.tensor.shape[:2], rows.height, rows.tensor.shape[3])
                out[:, :, rows.start : rows.start + rows.tensor.shape[2]] = rows.tensor
            del row, bands
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return self._one(x)
        return torch.cat([self._one(image[None]) for image in x])
