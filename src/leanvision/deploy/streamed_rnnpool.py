"""StreamedRNNPool: the layers before an RNNPoolLayer and the layer itself, patch group by patch group.

For each group of neighbouring patches of one patch row, the stem layers compute only the input region
those patches read (receptive fields, recomputing the overlap of neighbouring groups), RNN1 and RNN2 pool
it in place (the cells' inference_sweep), and the pooled values are written into the output map. No map of
the stem's resolution is ever whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from leanvision.deploy.lean_blocks import ConvStep, InPlaceConv
from leanvision.deploy.regions import Span, conv_out, pad_zeros
from leanvision.errors import InvalidArgumentError
from leanvision.layers import ImageNormalize, RNNPoolLayer
from leanvision.layers.rnn_cells import INDEXED_LANES

IndexedSweep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [C, S], index [T, N]) -> [h, N]

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.Tanh)
ELEMENTWISE = (
    *ACTIVATIONS,
    nn.Identity,
    nn.BatchNorm2d,
    ImageNormalize,
)  # the layers a prefix may hold besides convs


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


def _checked_group(patches_per_group: int) -> int:
    if patches_per_group < 1:
        raise InvalidArgumentError(f"patches_per_group must be >= 1, got {patches_per_group}")
    return patches_per_group


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
        self.prefix, self.pool = nn.ModuleList(_fused(prefix)), pool
        self.patches_per_group = _checked_group(patches_per_group)
        self._index_cache: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._sweeps = pool.pool.rnn1.inference_sweep(), pool.pool.rnn2.inference_sweep()

    def regroup(self, patches_per_group: int, x: torch.Tensor) -> None:
        """Run `patches_per_group` patches a group from now on, with the index tables of x's groups made
        here: they are state like the weights, so a meter of the next forward does not count them."""
        self.patches_per_group = _checked_group(patches_per_group)
        self._index_cache.clear()
        with torch.no_grad():
            self(x)

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
        with RNN1's summaries, RNN2's states and the per-thread scratch of the sweeps."""
        (kh, kw), (_, sw) = self.pool.patch_size, self.pool.stride
        rnn1, h1, h2 = self.pool.pool.rnn1, self.pool.pool.hidden1, self.pool.pool.hidden2
        rows, cols, channels = Span(0, kh), Span(0, (patches - 1) * sw + kw), rnn1.input_size
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

    def _region(self, x: torch.Tensor, depth: int, rows: Span, cols: Span, sizes) -> torch.Tensor:
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
        inner = pad_zeros(self._region(x, depth - 1, in_rows, in_cols, sizes), (left, right, top, bottom))
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
            rows = Span(i * sh - top, i * sh - top + kh)
            for j0 in range(0, valid_w, self.patches_per_group):
                j1 = min(j0 + self.patches_per_group, valid_w)
                cols = Span(j0 * sw - left, (j1 - 1) * sw - left + kw)
                (in_rows, pad_t, pad_b), (in_cols, pad_l, pad_r) = rows.clip(height), cols.clip(width)
                region = self._region(x, len(self.prefix), in_rows, in_cols, sizes)
                out[0, :, i, j0:j1] = self._pool_patches(pad_zeros(region, (pad_l, pad_r, pad_t, pad_b)))
                del region  # not alive while the next group's region is computed
        if extra:  # "edgeml": one replicated row at the bottom and column at the right
            out[:, :, :valid_h, valid_w] = out[:, :, :valid_h, valid_w - 1]
            out[:, :, valid_h] = out[:, :, valid_h - 1]
        return out


def patches_per_group(pool: StreamedRNNPool, valid_width: int, budget: int) -> int:
    """The most patches of one patch row (at most `valid_width`) whose group_bytes fit `budget`, or 1."""
    return max([n for n in range(1, valid_width + 1) if pool.group_bytes(n) <= budget], default=1)
