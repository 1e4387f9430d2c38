"""StreamedRNNPool: the layers before an RNNPoolLayer and the layer itself, patch group by patch group.

For each group of neighbouring patches of one patch row, the stem layers compute only the input region
those patches read (receptive fields, recomputing the overlap of neighbouring groups), RNN1 and RNN2 pool
it in place in one call of the fused numba kernel (PatchRowPool; the cells' sweep_indexed where it does not
apply), and the pooled values are written into the output map. Where a whole patch row fits the RAM, its
stem rows are computed once instead, band by band (the rows each patch row adds), and the kernel carries
RNN1's states from band to band. No map of the stem's resolution is ever whole.

A detection head that also reads the stem's output (RNNPool-Face-Quant's first head) runs inside the same
loop (BandedHead, RNNPool Appendix E.2.3): each patch row's stem rows are computed once at full width, the
patch groups read theirs from them, and the head computes the rows of its maps those rows allow, keeping
only the few halo rows its next rows need; its outputs are handed to the HeadOutputs that stands in for it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from leanvision.deploy.lean_blocks import ConvStep, InPlaceConv, NormalizedConv, _Rows, conv_zero_padded
from leanvision.deploy.regions import Span, conv_out, pad_zeros
from leanvision.deploy.row_runs import ChainRun, extended, per_image, rows_from
from leanvision.errors import InvalidArgumentError
from leanvision.layers import ImageNormalize, RNNPoolLayer
from leanvision.layers.conv import stack_convs
from leanvision.layers.rnnpool import IndexedSweep, PatchRowPool, rnnpool_indices
from leanvision.models.face.nets import DetectionHead, L2Norm

# A BandedHead computes once this many new rows are held (or the last row): fewer, larger calls of its small
# convolutions, whose per-call cost dominates when they run a few rows at a time, but every row held is RAM
# (RNNPool-Face-Quant with 16-row stem chunks, its pool phase's peak and its latency over eager's: 8 rows
# 1110 KiB, 2.3x; 16 rows 1160 KiB, 1.9x; 24 rows 1315 KiB, 1.8x; its target 1170 KiB).
HEAD_STEP_ROWS = 16

_Read = tuple[Span, int, int]  # a span inside a map and the zero padding before and after it
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.Tanh)
ELEMENTWISE = (
    *ACTIVATIONS,
    nn.Identity,
    nn.BatchNorm2d,
    ImageNormalize,
)  # the layers a prefix may hold besides convs


def _fused(prefix: Sequence[nn.Module]) -> list[nn.Module]:
    """The prefix with every [ImageNormalize ->] convolution [-> BatchNorm] [-> activation] as one
    InPlaceConv (NormalizedConv; so that its output is the only map it makes), other layers as they are."""
    layers, i = [], 0
    while i < len(prefix):
        layer, i = prefix[i], i + 1
        normalize = None
        if isinstance(layer, ImageNormalize) and i < len(prefix) and isinstance(prefix[i], nn.Conv2d):
            normalize, layer, i = layer, prefix[i], i + 1
        if not isinstance(layer, nn.Conv2d):
            layers.append(layer)
            continue
        bn = prefix[i] if i < len(prefix) and isinstance(prefix[i], nn.BatchNorm2d) else None
        i += bn is not None
        act = prefix[i] if i < len(prefix) and isinstance(prefix[i], ACTIVATIONS) else nn.Identity()
        i += not isinstance(act, nn.Identity)
        step = ConvStep(layer, bn, act)
        layers.append(InPlaceConv(step) if normalize is None else NormalizedConv(normalize, step))
    return layers


def _sweep_indexed(sweep: IndexedSweep, x: torch.Tensor, indices: list[torch.Tensor]) -> torch.Tensor:
    """A cell's inference_sweep over the sequences of every index [T, n] side by side -> [hidden, sum of
    n], one sweep per index."""
    if len(indices) == 1:
        return sweep(x, indices[0])
    return torch.cat([sweep(x, index) for index in indices], 1)


def _by_length(indices: list[torch.Tensor]) -> list[torch.Tensor]:
    """`indices` [T, n] with those of one length T side by side, in order: one sweep per length (each
    sweep costs tens of microseconds however few its sequences)."""
    joined = [indices[0]]
    for index in indices[1:]:
        if len(index) == len(joined[-1]):
            joined[-1] = torch.cat([joined[-1], index], 1)
        else:
            joined.append(index)
    return joined


def _checked_group(patches_per_group: int) -> int:
    if patches_per_group < 1:
        raise InvalidArgumentError(f"patches_per_group must be >= 1, got {patches_per_group}")
    return patches_per_group


class _BranchRun:
    """One forward of a branch of a BandedHead: its convolutions as a ChainRun, whose last rows' channels go
    into the head's output maps: `parts` (channels, maxout, map). With maxout > 1 the first maxout channels
    of a part are background logits whose max is written (DetectionHead's max-out background)."""

    def __init__(self, chain: ChainRun, parts: list[tuple[slice, int, torch.Tensor]]) -> None:
        self.chain, self.parts = chain, parts

    def take(self, box: list[_Rows]) -> None:
        """Compute what the input rows held so far (box.pop(): up to the last one fed, the box the only
        reference to them, ChainRun.take) allow."""
        y = self.chain.take(box)
        if y is not None:
            written = slice(y.start, y.start + y.tensor.shape[2])
            for channels, maxout, out in self.parts:
                part = y.tensor[:, channels]
                if maxout > 1:
                    out[:, :1, written] = part[:, :maxout].amax(1, keepdim=True)
                    out[:, 1:, written] = part[:, maxout:]
                else:
                    out[:, :, written] = part


class _HeadRun:
    """One forward of a BandedHead on a map `height` x `width`: feed it the map's rows from the top; the
    outputs are complete once every row has been fed."""

    def __init__(self, head: BandedHead, like: torch.Tensor, height: int, width: int) -> None:
        self.l2norm, self.step_rows, self.height = head.l2norm, head.step_rows, height
        self.fed = self.computed = 0  # rows fed; rows fed when the branches last computed
        self.held: _Rows | None = None  # the L2-normalised rows the branches still read
        self.outputs: tuple[torch.Tensor, ...] = ()  # loc [1, 4, h, w] and conf [1, 2, h, w]
        self.branches = []
        for convs, parts in zip(head.branches, head.parts):
            chain, out_width = ChainRun(convs, height), width
            for layer in convs:
                out_width = conv_out(out_width, layer.conv, 1)
            maps = [
                like.new_empty(1, c.stop - c.start - m + 1, chain.heights[-1], out_width) for c, m in parts
            ]
            self.outputs += tuple(maps)
            self.branches.append(_BranchRun(chain, [(c, m, out) for (c, m), out in zip(parts, maps)]))

    def feed(self, rows: _Rows) -> None:
        """Take rows of the map that start at or above the first row not fed yet."""
        if rows.start > self.fed:
            raise AssertionError(f"rows {self.fed}..{rows.start} of the map were skipped")
        skip = self.fed - rows.start
        if skip >= rows.tensor.shape[2]:
            return
        new = _Rows(self.l2norm(rows.tensor[:, :, skip:]), self.fed, self.height)
        held, self.held = extended(self.held, new), None  # the rows held before are not kept beside
        del new  # nor the new rows apart from the extended ones
        self.fed = held.start + held.tensor.shape[2]
        if self.fed < min(self.computed + self.step_rows, self.height):
            self.held = held
            return
        self.computed = self.fed
        self.held = rows_from(held, min(branch.chain.first_needed_after(held) for branch in self.branches))
        box = [held]
        del held  # the box's reference is the last branch's to drop: the rows are freed as it computes
        for branch in self.branches:
            branch.take(box if branch is self.branches[-1] else [box[0]])


def _stacked(layers: Sequence[InPlaceConv], split_input: bool) -> InPlaceConv | None:
    """One InPlaceConv with the output channels of `layers` side by side (layers.conv.stack_convs: with
    `split_input` each reads its own run of the input channels), or None where stack_convs cannot or the
    activations differ."""
    convs = [copy.deepcopy(layer.conv) for layer in layers]
    for conv in convs:  # the affines hold the biases: stacked as they are
        conv.bias = nn.Parameter(conv.weight.new_zeros(conv.out_channels))
    conv = stack_convs(convs, split_input)
    if conv is None or any(type(layer.act) is not type(layers[0].act) for layer in layers):
        return None
    stacked = InPlaceConv(ConvStep(conv, None, layers[0].act))
    if all(layer.affine[1] is None for layer in layers):  # no BN: the biases alone
        stacked.affine = (torch.cat([layer.affine[0] for layer in layers], 1), None, None)
    else:  # a layer without a BN scales by one and shifts by zero
        affines = [
            (offset, torch.ones_like(offset), torch.zeros_like(offset))
            if scale is None
            else (offset, scale, shift)
            for offset, scale, shift in (layer.affine for layer in layers)
        ]
        stacked.affine = tuple(torch.cat(parts, 1) for parts in zip(*affines))
    return stacked


class BandedHead(nn.Module):
    """A DetectionHead on the prefix map (L2Norm, then loc and conf branches of convolutions), computed
    from the map's rows fed top to bottom: the L2Norm of each new row, then each convolution computes the
    rows of its output that the rows it holds allow (once `step_rows` new rows are held) and keeps only
    the halo rows its next ones read; the branches' last rows go into preallocated loc and conf maps.
    Neither the prefix map nor a branch's intermediate maps are ever whole. The branches run as one chain
    where their convolutions stack (as DetectionHead.fuse_for_inference_: fewer, larger calls), the
    L2Norm's scales folded into the first convolutions."""

    def __init__(self, head: DetectionHead, step_rows: int = HEAD_STEP_ROWS) -> None:
        super().__init__()
        if head.merged is not None:
            raise InvalidArgumentError("stream a detector before fuse_for_inference, not after")
        branches = [_fused([m for m in b.modules() if not list(m.children())]) for b in (head.loc, head.conf)]
        if not all(isinstance(layer, InPlaceConv) for branch in branches for layer in branch):
            raise InvalidArgumentError(
                "a streamed head's branches must be chains of convolutions [-> BatchNorm] [-> activation]"
            )
        if step_rows < 1:
            raise InvalidArgumentError(f"step_rows must be >= 1, got {step_rows}")
        self.l2norm, self.step_rows = copy.deepcopy(head.l2norm), step_rows
        if isinstance(self.l2norm, L2Norm) and self.l2norm.weight is not None:  # a scale per input channel
            for branch in branches:
                branch[0].conv = copy.deepcopy(branch[0].conv)
                with torch.no_grad():
                    branch[0].conv.weight.mul_(self.l2norm.weight.view(1, -1, 1, 1))
            self.l2norm.weight = None
        loc, conf = (branch[-1].conv.out_channels for branch in branches)
        stacked = [_stacked(level, i > 0) for i, level in enumerate(zip(*branches))]
        if len(branches[0]) == len(branches[1]) and all(stacked):
            branches = [stacked]
            self.parts = [[(slice(0, loc), 1), (slice(loc, loc + conf), head.background_maxout)]]
        else:
            self.parts = [[(slice(0, loc), 1)], [(slice(0, conf), head.background_maxout)]]
        self.branches = nn.ModuleList(nn.ModuleList(branch) for branch in branches)

    def start(self, like: torch.Tensor, height: int, width: int) -> _HeadRun:
        """A run on a map `height` x `width` (of one image), its outputs allocated like `like`."""
        return _HeadRun(self, like, height, width)


class HeadHandoff:
    """Where a StreamedRNNPool leaves its head's outputs for the HeadOutputs that stands in for the head."""

    def __init__(self) -> None:
        self.outputs: tuple[torch.Tensor, ...] | None = None


class HeadOutputs(nn.Module):
    """Stands in for a head on the map before the RNNPoolLayer, which no longer exists (its input is
    the network's input, passed on by Identity layers): returns the outputs its StreamedRNNPool computed."""

    def __init__(self, handoff: HeadHandoff) -> None:
        super().__init__()
        self.handoff = handoff

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs, self.handoff.outputs = self.handoff.outputs, None  # not kept past the network's forward
        if outputs is None:
            raise InvalidArgumentError("HeadOutputs has no outputs: its StreamedRNNPool must run first")
        return outputs


class _StemRows:
    """The stem rows of a whole patch row's bands in one forward of a StreamedRNNPool (`_bands`), from the
    top, each computed once, `chunk` rows at a time: as the kernel reads them (PatchRowPool.inputs, at the
    patches' `columns`), kept until a band reads past them; or, for chunks shorter than a band (where the
    kernel reads W x), each chunk's W x written into the band's. A head's `run` is fed each chunk (at the
    columns `col_reads`, the map's whole width for a head)."""

    def __init__(
        self,
        pool: StreamedRNNPool,
        x: torch.Tensor,
        kernel: PatchRowPool,
        col_reads: list[_Read],
        columns: int,
        run: _HeadRun | None,
    ) -> None:
        self.pool, self.x, self.kernel, self.col_reads, self.columns, self.run = (
            pool, x, kernel, col_reads, columns, run,
        )  # fmt: skip
        self.sizes = pool._sizes(x.shape[2], x.shape[3])
        self.height, self.chunk = self.sizes[-1][0], pool.banded[2]
        self.kept: _Rows | None = None  # the kernel's inputs of the last chunk

    def _region(self, rows: Span) -> torch.Tensor:
        """The prefix output's `rows` at the patches' columns, once fed to the head's run (a step's rows at
        a time: the run's maps of a step, not of the chunk)."""
        region = self.pool._region(self.x, self.pool._reads(rows, 0, self.sizes), self.col_reads)
        if self.run is not None:
            for start in range(0, region.shape[2], self.run.step_rows):
                self.run.feed(
                    _Rows(region[:, :, start : start + self.run.step_rows], rows.start + start, self.height)
                )
        return region[:, :, :, : self.columns]

    def inputs(self, rows: Span) -> torch.Tensor:
        """The kernel's inputs of the prefix output's `rows` (a band, below those asked for before)."""
        kernel, kept = self.kernel, self.kept
        if self.chunk >= rows.stop - rows.start:
            if kept is None or rows.stop > kept.start + kept.tensor.shape[2]:
                self.kept = kept = None  # freed before the next chunk is made
                chunk = Span(rows.start, min(rows.start + self.chunk, self.height))
                self.kept = kept = _Rows(kernel.inputs(self._region(chunk)), chunk.start, self.height)
            return kept.tensor[:, :, rows.start - kept.start : rows.stop - kept.start]
        out = None
        for r0 in range(rows.start, rows.stop, self.chunk):
            chunk = Span(r0, min(r0 + self.chunk, rows.stop))
            region = self._region(chunk)
            if out is None:
                out = region.new_empty(1, len(kernel.weight), rows.stop - rows.start, region.shape[3])
            kernel.inputs(region, out[:, :, chunk.start - rows.start : chunk.stop - rows.start])
            del region
        return out


class StreamedRNNPool(nn.Module):
    """`prefix` (convolutions and elementwise layers, in order) followed by `pool`, computed patch group by
    patch group so that only one group's input region of the prefix output is alive at a time.

    With `head`, a DetectionHead that also reads the prefix output, each patch row's rows of the prefix
    output are computed once at full width (with the rows below the last patch row the head needs), the
    groups read theirs from them and the head (BandedHead) computes its rows from them; its outputs are
    left in `handoff` for the HeadOutputs that replaces the head in the network."""

    def __init__(
        self,
        prefix: Sequence[nn.Module],
        pool: RNNPoolLayer,
        patches_per_group: int,
        head: DetectionHead | None = None,
    ) -> None:
        super().__init__()
        for layer in prefix:
            if not isinstance(layer, (nn.Conv2d, *ELEMENTWISE)):
                raise InvalidArgumentError(
                    f"streaming supports convolutions and elementwise layers before the RNNPoolLayer, "
                    f"got {type(layer).__name__}"
                )
        self.prefix, self.pool = nn.ModuleList(_fused(prefix)), pool
        self.patches_per_group = _checked_group(patches_per_group)
        self._index_cache: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._kernel: PatchRowPool | None = None
        # (patches per group, rows per band, stem rows per chunk): groups of that many patches are whole
        # patch rows whose stem rows run in bands (see patches_per_group), each computed once, in chunks
        # whose W x the band gathers (where the kernel reads W x); None: each group's patch rows
        # recompute their regions
        self.banded: tuple[int, int, int] | None = None
        self.head, self.handoff = None if head is None else BandedHead(head), HeadHandoff()

    def regroup(self, patches_per_group: int, x: torch.Tensor) -> None:
        """Run `patches_per_group` patches a group from now on, with what a forward on x caches (the fused
        kernel's packed parameters, the reference path's index tables) made here: it is state like the
        weights, so a meter of the next forward does not count it."""
        self.patches_per_group = _checked_group(patches_per_group)
        self._index_cache.clear()
        with torch.no_grad():
            self(x)

    def prefix_size(self, x: torch.Tensor) -> tuple[int, int]:
        """(H, W) of the prefix's output (the pool's input) for an input x [B, C, H, W]."""
        return self._sizes(x.shape[2], x.shape[3])[-1]

    def _sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """(H, W) of the input of every prefix layer, and of the pool's input last."""
        sizes = [(height, width)]
        for layer in self.prefix:
            if isinstance(layer, InPlaceConv):
                height, width = conv_out(height, layer.conv, 0), conv_out(width, layer.conv, 1)
            sizes.append((height, width))
        return sizes

    def group_bytes(self, patches: int) -> int:
        """fp32 bytes alive while a group of `patches` neighbouring patches runs (its input region is
        computed, then pooled): the largest input + output region of a prefix layer, or the pool's region
        with what RNN1 keeps for RNN2 and the fused kernel's scratch (PatchRowPool.held_shape, .plan; where
        the kernel reads RNN1's W x, the region beside it while it is made, then W x in its place). A
        whole patch row in bands (`banded`) holds RNN1's states throughout, beside a band of rows at a time
        instead of the patch row's region."""
        (kh, kw), (sh, sw) = self.pool.patch_size, self.pool.stride
        banded = self.banded is not None and patches == self.banded[0]
        height, stem = self.banded[1:] if banded else (kh, kh)
        held = math.prod(PatchRowPool.held_shape(self.pool, patches, -(-kh // sh) if banded else 1))
        scratch = PatchRowPool.plan(self.pool, patches, rows=height if banded else None)[2]
        convs = [layer.conv for layer in self.prefix if isinstance(layer, InPlaceConv)]
        # the outputs beyond a region's that conv_zero_padded keeps alive (at the map's edges)
        kept = [(0, 0)] + [
            (conv.padding[0] // conv.stride[0], conv.padding[1] // conv.stride[1]) for conv in convs
        ]
        inner = max(height, stem) * ((patches - 1) * sw + kw)  # the kernel's inputs held
        area = (stem + kept[-1][0]) * ((patches - 1) * sw + kw + kept[-1][1])
        channels, inputs = self.pool.in_channels, PatchRowPool.input_channels(self.pool)
        # the kernel's inputs made from the region (then freed), and the kernel's run on them
        floats = max(
            channels * area + inputs * inner if inputs < channels else 0,
            (inputs * inner if inputs < channels else channels * area) + scratch + (0 if banded else held),
        )
        rows, cols = Span(0, stem), Span(0, (patches - 1) * sw + kw)
        for conv, (out_rows, out_cols), (in_rows, in_cols) in zip(reversed(convs), kept[:0:-1], kept[-2::-1]):
            out_area = (rows.stop - rows.start + out_rows) * (cols.stop - cols.start + out_cols)
            rows, cols = rows.through_conv(conv, 0), cols.through_conv(conv, 1)
            in_area = (rows.stop - rows.start + in_rows) * (cols.stop - cols.start + in_cols)
            if conv is getattr(self.prefix[0], "conv", None):  # it reads the network's input: a view
                in_area = 0
            floats = max(floats, conv.in_channels * in_area + conv.out_channels * out_area)
        return 4 * (floats + (held if banded else 0))

    def _reads(self, span: Span, axis: int, sizes: list[tuple[int, int]]) -> list[_Read]:
        """What the prefix layers read to make `span` of the pool's input along `axis` (0 rows, 1 columns):
        the span (inside the map) at each layer's input, first to last, with the zero padding the layer
        adds around it, then `span` itself."""
        reads = [(span, 0, 0)]
        for layer, size in zip(reversed(self.prefix), reversed(sizes[:-1])):
            if isinstance(layer, InPlaceConv):
                span, before, after = span.through_conv(layer.conv, axis).clip(size[axis])
                reads.append((span, before, after))
            else:
                reads.append((span, 0, 0))
        return reads[::-1]

    def _region(self, x: torch.Tensor, rows: list[_Read], cols: list[_Read]) -> torch.Tensor:
        """Output of the prefix layers on the span that `rows` and `cols` (_reads) end with."""
        (first_rows, _, _), (first_cols, _, _) = rows[0], cols[0]
        region = x[:, :, first_rows.start : first_rows.stop, first_cols.start : first_cols.stop]
        for layer, (_, top, bottom), (_, left, right) in zip(self.prefix, rows, cols):
            if isinstance(layer, InPlaceConv):
                region = conv_zero_padded(layer, region, (left, right, top, bottom))
            else:
                region = layer(region)
        return region

    def _bands(
        self,
        stem: _StemRows,
        kernel: PatchRowPool,
        out: torch.Tensor,
        rows: Span,
        patch_rows: tuple[int, int],
        padding: tuple[int, int],
        held: torch.Tensor,
    ) -> None:
        """Patch row patch_rows[0] of a whole-row group into out [4 h2, n] from its stem rows `rows` (of the
        zero-padded map; those before are pooled), band by band (PatchRowPool.band), the columns of the
        patch rows up to patch_rows[1] advanced with them; `padding` (top, left) is the pool's own."""
        sh, band_rows, height = self.pool.stride[0], self.banded[1], stem.height
        for y0 in range(rows.start, rows.stop, band_rows):
            y1 = min(y0 + band_rows, rows.stop)
            in_rows, pad_t, _ = Span(y0 - padding[0], y1 - padding[0]).clip(height)
            if in_rows.stop > in_rows.start:
                region = stem.inputs(in_rows)
            else:  # all in the pool's zero padding
                region = out.new_empty(1, PatchRowPool.input_channels(self.pool), 0, 0)
            last = min((y1 - 1) // sh, patch_rows[1])
            kernel.band(region, out, pad_t, padding[1], (y0, y1), (patch_rows[0], last), held)
            del region

    def _fused(self, x: torch.Tensor) -> PatchRowPool | None:
        """The fused kernel for x, started (None where it does not apply); its parameters are packed once
        per dtype, state like the weights."""
        if not PatchRowPool.applies(self.pool, x):
            return None
        if self._kernel is None or self._kernel.dtype != x.dtype:
            self._kernel = PatchRowPool(self.pool)
        self._kernel.start()
        return self._kernel

    def _indices(self, width: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Where the sweeps of one patch row's region [C, kh, width] read their steps (rnnpool_indices of
        a map kh high): RNN1's row segments and columns, RNN2's row summaries forwards and backwards and
        column summaries, as columns of RNN1's outputs [h1, kh n + width]; one index per sweep. Cached per
        width."""
        if width not in self._index_cache:
            pool = self.pool
            rnn1, rnn2 = rnnpool_indices(1, pool.patch_size[0], width, pool.patch_size, pool.stride)
            self._index_cache[width] = _by_length(rnn1), _by_length(rnn2)
        return self._index_cache[width]

    def _pool_patches(self, region: torch.Tensor, out: torch.Tensor) -> None:
        """RNNPool of the patches side by side in one patch row's region [1, C, kh, width], written into
        `out` [4 h2, n], with the cells' sweep_indexed: the reference path, where PatchRowPool does not
        apply.

        As rnnpool_map, RNN1 runs once over every row segment and every column of the region; the sweeps
        read their inputs in place, so nothing but the region and the states is alive."""
        rnn1, rnn2, h2 = (
            self.pool.pool.rnn1.sweep_indexed,
            self.pool.pool.rnn2.sweep_indexed,
            self.pool.pool.hidden2,
        )
        rnn1_index, rnn2_index = self._indices(region.shape[3])
        summaries = _sweep_indexed(rnn1, region.reshape(region.shape[1], -1), rnn1_index)
        pooled = _sweep_indexed(rnn2, summaries, rnn2_index)  # [h2, 4 n]: rows fwd, bwd, cols fwd, bwd
        out.view(4, h2, -1).copy_(pooled.view(h2, 4, -1).transpose(0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pool's output; with a head, the head's outputs are left in `handoff`."""
        out, self.handoff.outputs = per_image(self._one, x)
        return out

    def _one(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The pool's output and the head's outputs (None without a head) of one image [1, C, H, W]."""
        height, width = self._sizes(x.shape[2], x.shape[3])[-1]
        run = None if self.head is None else self.head.start(x, height, width)
        out = x.new_empty(1, self.pool.out_channels, *self.pool.output_size(height, width))
        for _ in self.output_rows(x, run, out):
            pass
        return out, None if run is None else run.outputs

    def output_rows(
        self, x: torch.Tensor, head_run: _HeadRun | None = None, out: torch.Tensor | None = None
    ) -> Iterator[_Rows]:
        """The pool's output rows of one image [1, C, H, W], top to bottom, one row [1, C', 1, W'] at a
        time, so that a consumer may use each as it comes and the output is never whole (or, with `out`,
        the pool's output to write into, views of it). With the `head_run` of this pool's head, the run
        is fed the prefix rows as they are computed: its outputs are complete once the last row has been
        taken."""
        pool, (kh, kw), (sh, sw) = self.pool, self.pool.patch_size, self.pool.stride
        sizes = self._sizes(x.shape[2], x.shape[3])
        height, width = sizes[-1]
        oh, ow = pool.output_size(height, width)
        extra = 1 if pool.padding == "edgeml" else 0
        top = left = 0
        if pool.padding == "same":  # the zero padding RNNPoolLayer adds: evenly, extra at the bottom/right
            top, left = max((oh - 1) * sh + kh - height, 0) // 2, max((ow - 1) * sw + kw - width, 0) // 2
        valid_h, valid_w = oh - extra, ow - extra
        run, row = head_run, None
        kernel = self._fused(x)
        groups = []  # each group's patches, columns and their padding, and what the prefix reads for them
        for j0 in range(0, valid_w, self.patches_per_group):
            j1 = min(j0 + self.patches_per_group, valid_w)
            in_cols, pad_l, pad_r = Span(j0 * sw - left, (j1 - 1) * sw - left + kw).clip(width)
            groups.append((j0, j1, in_cols, pad_l, pad_r, self._reads(in_cols, 1, sizes)))
        whole_width = self._reads(Span(0, width), 1, sizes)
        banded = (
            kernel is not None
            and self.banded is not None
            and self.banded[0] == self.patches_per_group >= valid_w
        )
        if banded:  # RNN1's states, kept from band to band
            held = x.new_empty(PatchRowPool.held_shape(pool, valid_w, -(-kh // sh)))
            done = 0  # the rows (of the zero-padded map) pooled so far
            col_reads = groups[0][5] if run is None else whole_width  # a head reads every column
            stem = _StemRows(self, x, kernel, col_reads, groups[0][2].stop, run)
        for i in range(valid_h):
            row = x.new_empty(1, pool.out_channels, 1, ow) if out is None else out[:, :, i : i + 1]
            pooled = row[0, :, 0]  # [C', W'], each group's patches written into its columns
            if banded:
                rows = Span(max(done, i * sh), i * sh + kh)
                self._bands(stem, kernel, pooled[:, :valid_w], rows, (i, valid_h - 1), (top, left), held)
                done = rows.stop
            else:
                self._groups(x, kernel, pooled, i, run, groups, whole_width, (top, left), sizes)
            if extra:  # "edgeml": one replicated column at the right
                row[:, :, :, valid_w] = row[:, :, :, valid_w - 1]
            yield _Rows(row, i, oh)
        if run is not None and run.fed < height:  # the rows below the last patch row that the head reads
            rest = Span(run.fed, height)
            run.feed(_Rows(self._region(x, self._reads(rest, 0, sizes), whole_width), rest.start, height))
        if extra:  # and one replicated row at the bottom
            last = row.clone() if out is None else out[:, :, valid_h : valid_h + 1].copy_(row)
            yield _Rows(last, valid_h, oh)

    def _groups(
        self,
        x: torch.Tensor,
        kernel: PatchRowPool | None,
        out: torch.Tensor,
        i: int,
        run: _HeadRun | None,
        groups: list[tuple],
        whole_width: list[_Read],
        padding: tuple[int, int],
        sizes: list[tuple[int, int]],
    ) -> None:
        """Patch row i into out [4 h2, W'], group by group, each from its region of the patch row's stem rows
        (computed for it, or, with the head's `run`, cut from the rows computed at full width for both, which
        the run is then fed); `padding` (top, left) is the pool's own."""
        (kh, _), (sh, _), height = self.pool.patch_size, self.pool.stride, sizes[-1][0]
        in_rows, pad_t, pad_b = Span(i * sh - padding[0], i * sh - padding[0] + kh).clip(height)
        row_reads = self._reads(in_rows, 0, sizes)
        if run is not None:  # the patch row's rows at full width, from the first one the head lacks
            band_rows = Span(min(in_rows.start, run.fed), in_rows.stop)
            band_reads = self._reads(band_rows, 0, sizes)
            band = _Rows(self._region(x, band_reads, whole_width), band_rows.start, height)
        for j0, j1, in_cols, pad_l, pad_r, col_reads in groups:
            if run is None:
                region = self._region(x, row_reads, col_reads)
            else:
                first = in_rows.start - band.start
                region = band.tensor[
                    :, :, first : first + in_rows.stop - in_rows.start, in_cols.start : in_cols.stop
                ]
            if kernel is not None:  # it reads the zero padding without a padded copy
                region = kernel.inputs(region)
                kernel(region, out[:, j0:j1], pad_t, pad_l)
            else:
                region = pad_zeros(region, (pad_l, pad_r, pad_t, pad_b))  # the unpadded one freed
                self._pool_patches(region, out[:, j0:j1])
            del region  # not alive while the next group's region is computed
        if run is not None:
            run.feed(band)


def patches_per_group(pool: StreamedRNNPool, valid_width: int, budget: int) -> int:
    """Patches per group for `budget`: a whole patch row (of `valid_width` patches) whose stem rows run in
    bands (set as pool.banded: each stem row computed once), as tall as fit (banded_rows), where that
    fits, else as few groups per patch row as fit, as even as they can be (no more patches than those
    groups need: less RAM and balanced work for the same calls)."""
    pool.banded = banded_rows(pool, valid_width, budget)
    if pool.banded is not None:
        return valid_width
    most = max([n for n in range(1, valid_width + 1) if pool.group_bytes(n) <= budget], default=1)
    return -(-valid_width // -(-valid_width // most))


def banded_rows(pool: StreamedRNNPool, valid_width: int, budget: int) -> tuple[int, int, int] | None:
    """(valid_width, rows per band, stem rows per chunk) for a whole patch row of `valid_width` patches
    in bands within `budget`: the tallest bands that fit (fewer kernel calls), then the tallest chunks
    of stem rows (fewer convolution calls: up to a patch's rows, kept until the bands pass them; chunks
    shorter than the band only where the kernel reads W x, which a chunk writes into the band's); None if
    even one row does not fit. A band's rows divide the rows each patch row adds (min(kh, sh)): 3-row
    bands of 4 new rows would take as many calls as 2-row bands, in more RAM."""
    (kh, _), (sh, _) = pool.pool.patch_size, pool.pool.stride
    new = min(kh, sh)
    premultiplied = PatchRowPool.input_channels(pool.pool) < pool.pool.in_channels
    candidates = [
        (valid_width, rows, stem)
        for rows in range(new, 0, -1)
        if new % rows == 0
        for stem in range(max(2 * kh, rows), 0, -1)
        if (stem % rows == 0 if stem >= rows else rows % stem == 0 and premultiplied)
    ]
    banded, fits = pool.banded, None
    for candidate in candidates:
        pool.banded = candidate
        if pool.group_bytes(valid_width) <= budget:
            fits = candidate
            break
    pool.banded = banded
    return fits
