"""RNNPool (Saha et al., NeurIPS 2020): pool a patch with two RNNs, and the strided layer built on it.

RNN1 summarises every row (left to right) and every column (top to bottom) of a patch; RNN2 then runs
over the row summaries and over the column summaries, forwards and backwards. The output is
[rows fwd, rows bwd, cols fwd, cols bwd], 4 * hidden2 values; all initial states are zero.

The fast path follows the speed notes of the reference analysis (shared/notes/rnnpool-reference.md):
- RNN1 runs once per row segment and column segment of the map, not once per patch: with stride <
  patch, overlapping patches share segments (k=8, s=4 halves RNN1's work);
- all row and column sweeps of RNN1 advance together, as do RNN2's four sweeps, so a k x k patch takes
  2k sequential steps, each one batched over every patch of a tile;
- the cells' `sweep` gathers the strided segments once into a batch (for FastGRNN feature-major, with
  a hand-written backward; see rnn_cells.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from leanvision.errors import InvalidArgumentError
from leanvision.layers import rnn_cells
from leanvision.layers.rnn_cells import (
    FastGRNNCell,
    RecurrentCell,
    create_cell,
    kernel_sweep,
    kernel_threads,
    pack_params,
    premultiplied,
)

PADDINGS = ("edgeml", "valid", "same")

# Patches pooled together in one tile, so that a tile's tensors stay in the CPU's cache. The torch sweeps
# run ~10 kernels per step, each streaming the tile's state: 2048 patches (about a MiB) is their best
# size. The fused numba sweep keeps each block's state in cache itself; there 8192 runs the paper's VWW
# layer forward+backward 1.3x faster than 2048 (fewer per-tile copies and autograd nodes), and the torch
# sweeps 2.8x slower.
TILE_PATCHES = 2048
FUSED_TILE_PATCHES = 8192
# Sequences per block of the in-place inference sweeps over a whole map: its scratch is small beside the
# map, and 128 runs RNNPool-Face-Quant's layer 15% faster than 32.
MAP_LANES = 128
# Sequences per block of the streaming kernel (PatchRowPool), whose scratch counts against streaming RAM:
# wider blocks run faster (a step of 64 sequences costs 15% more per sequence than one of 128 at C = 32,
# h = 16, of 32 50% more), and a block per thread from 32 sequences on (ResNet18-RNNPool's 5-patch groups,
# 64 sequences, run 1.2x faster on two threads than on one).
PATCH_LANES = 128
TASK_SEQUENCES = 32
IndexedSweep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [C, S], index [T, N]) -> [h, N]


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) or v < 1 for v in pair):
        raise InvalidArgumentError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair


def _sweep_together(cell: RecurrentCell, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
    """Final hidden vectors of `cell` over input sequences [T, ..., C]; those of one length T run together."""
    finals = {}
    for steps in dict.fromkeys(len(seq) for seq in sequences):
        group = [i for i, seq in enumerate(sequences) if len(seq) == steps]
        finals.update(zip(group, cell.sweep([sequences[i] for i in group])))
    return [finals[i] for i in range(len(sequences))]


def rnnpool_map(
    rnn1: RecurrentCell,
    rnn2: RecurrentCell,
    x: torch.Tensor,
    patch_size: tuple[int, int],
    stride: tuple[int, int],
) -> torch.Tensor:
    """RNNPool of every VALID patch of x [B, C, H, W] -> [B, oh, ow, 4 * h2].

    RNN1 runs once over every row segment x[b, :, y, j*sw : j*sw + kw] and every column segment
    x[b, :, i*sh : i*sh + kh, x] of the map: with stride < patch, overlapping patches share them. The
    row summaries of patch (i, j) are then those of rows i*sh .. i*sh + kh - 1 at segment j (an unfold
    of the summary map), likewise for columns. Maps of more patches than a tile are cut into tiles
    of whole images, then of output rows, so that each tile's per-step tensors stay in cache.
    """
    (kh, kw), (sh, sw) = patch_size, stride
    batch, oh, ow = x.shape[0], (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
    if batch > 0 and not torch.is_grad_enabled():  # inference: the sweeps read the map in place
        if torch.compiler.is_compiling() and rnn1.compiled_kernel(x) and rnn2.compiled_kernel(x):
            weights = rnn1.kernel_weights(), rnn2.kernel_weights()
            out = torch.ops.leanvision.rnnpool_in_place(x, *weights, list(patch_size), list(stride))
            return out.permute(0, 2, 3, 1)
        if not torch.compiler.is_compiling() and rnn1.fused_sweep(x) and rnn2.fused_sweep(x):
            sweeps = [functools.partial(cell.sweep_indexed, lanes=MAP_LANES) for cell in (rnn1, rnn2)]
            return _rnnpool_in_place(sweeps, x, patch_size, stride).permute(0, 2, 3, 1)
    if torch.compiler.is_compiling():  # compile / ONNX export: one graph over the map, for any batch size
        return _rnnpool_tile(rnn1, rnn2, x, patch_size, stride)
    if batch == 0:  # an empty batch, as torch's layers take it
        return x.new_zeros(0, max(oh, 0), max(ow, 0), 4 * rnn2.hidden_size)
    tile = FUSED_TILE_PATCHES if rnn1.fused_sweep(x) else TILE_PATCHES
    if batch > 1 and batch * oh * ow > tile:
        images = max(1, tile // (oh * ow))
        return torch.cat([rnnpool_map(rnn1, rnn2, part, patch_size, stride) for part in x.split(images)])
    rows_per_tile = max(1, tile // (batch * ow))
    if rows_per_tile < oh:  # bands of output rows, each computed on its own band of the input
        bands = [
            x[:, :, i * sh : (min(i + rows_per_tile, oh) - 1) * sh + kh] for i in range(0, oh, rows_per_tile)
        ]
        return torch.cat([rnnpool_map(rnn1, rnn2, band, patch_size, stride) for band in bands], dim=1)
    return _rnnpool_tile(rnn1, rnn2, x, patch_size, stride)


def _rnnpool_tile(
    rnn1: RecurrentCell,
    rnn2: RecurrentCell,
    x: torch.Tensor,
    patch_size: tuple[int, int],
    stride: tuple[int, int],
) -> torch.Tensor:
    """rnnpool_map of one tile, in one go."""
    (kh, kw), (sh, sw) = patch_size, stride
    oh, ow = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
    x = x[:, :, : (oh - 1) * sh + kh, : (ow - 1) * sw + kw]
    rows = x.unfold(3, kw, sw).permute(4, 0, 2, 3, 1)  # [kw, B, height, ow, C]: the row segments
    cols = x.unfold(2, kh, sh).permute(4, 0, 2, 3, 1)  # [kh, B, oh, width, C]
    rows, cols = _sweep_together(rnn1, [rows, cols])
    rows = rows.unfold(1, kh, sh).movedim(-1, 0)  # [kh, B, oh, ow, h1]: the row summaries of each patch
    cols = cols.unfold(2, kw, sw).movedim(-1, 0)  # [kw, B, oh, ow, h1]
    return torch.cat(_sweep_together(rnn2, [rows, rows.flip(0), cols, cols.flip(0)]), dim=-1)


@functools.lru_cache(maxsize=8)
def rnnpool_indices(
    batch: int, height: int, width: int, patch_size: tuple[int, int], stride: tuple[int, int]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Where rnnpool_map's sweeps read their steps (RecurrentCell.sweep_indexed) for x [B, C, H, W] seen
    as the columns of [C, B H W]: RNN1's row segments ([kw, B H ow]: step t of segment (b, y, j) is pixel
    (b, y, j sw + t)) then column segments ([kh, B oh W]); RNN2's row summaries of every patch forwards
    and backwards ([kh, B oh ow] each, columns of RNN1's output) then its column summaries ([kw, ...]).
    Sequences of one length are concatenated, so each list holds one index per length. int32, cached:
    the tables are as large as the map."""
    (kh, kw), (sh, sw) = patch_size, stride
    oh, ow = (height - kh) // sh + 1, (width - kw) // sw + 1
    b, i, j = (
        torch.arange(batch).view(-1, 1, 1),
        torch.arange(oh).view(1, -1, 1),
        torch.arange(ow).view(1, 1, -1),
    )
    t_row, t_col = torch.arange(kw).view(-1, 1), torch.arange(kh).view(-1, 1)
    row_starts = (b * height + torch.arange(height).view(1, -1, 1)) * width + j * sw
    col_starts = (b * height + i * sh) * width + torch.arange(width).view(1, 1, -1)
    rnn1 = [t_row + row_starts.view(1, -1), t_col * width + col_starts.view(1, -1)]
    rows = t_col * ow + ((b * height + i * sh) * ow + j).view(1, -1)  # RNN1's row outputs come first
    cols = batch * height * ow + t_row + ((b * oh + i) * width + j * sw).view(1, -1)
    rnn2 = [rows, rows.flip(0), cols, cols.flip(0)]

    def by_length(indices: list[torch.Tensor]) -> list[torch.Tensor]:
        if all(len(index) == len(indices[0]) for index in indices):
            return [torch.cat(indices, 1).int()]
        return [index.int() for index in indices]

    return by_length(rnn1), by_length(rnn2[:2]) + by_length(rnn2[2:])


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _rnnpool_in_place(
    sweeps: Sequence[IndexedSweep], x: torch.Tensor, patch_size: Sequence[int], stride: Sequence[int]
) -> torch.Tensor:
    """rnnpool_map for inference, as a contiguous [B, 4 h2, oh, ow]: RNN1's and RNN2's `sweeps` (each
    (x [C, S], index [T, N]) -> [h, N], see RecurrentCell.sweep_indexed) read their steps in place, over
    the whole map at once (no gathered copies of the segments)."""
    batch, channels, height, width = x.shape
    (kh, kw), (sh, sw) = patch_size, stride
    oh, ow = (height - kh) // sh + 1, (width - kw) // sw + 1
    rnn1_indices, rnn2_indices = rnnpool_indices(batch, height, width, tuple(patch_size), tuple(stride))
    pixels = x.transpose(0, 1).reshape(channels, -1)  # a view for one NCHW image
    summaries = _joined([sweeps[0](pixels, index) for index in rnn1_indices])
    pooled = _joined([sweeps[1](summaries, index) for index in rnn2_indices])
    h2 = len(pooled)  # pooled [h2, 4 B oh ow]: rows forwards, backwards, columns forwards, backwards
    return pooled.view(h2, 4, batch, oh, ow).permute(2, 1, 0, 3, 4).reshape(batch, 4 * h2, oh, ow)


@torch.library.custom_op("leanvision::rnnpool_in_place", mutates_args=())
def _rnnpool_in_place_op(
    x: torch.Tensor,
    rnn1: list[torch.Tensor],
    rnn2: list[torch.Tensor],
    patch_size: list[int],
    stride: list[int],
) -> torch.Tensor:
    """The in-place inference path with the FastGRNN numba kernels (FastGRNNCell.kernel_weights of both
    cells) as one torch operator, which torch.compile calls as it is: dynamo cannot trace numba."""
    sweeps = [kernel_sweep(weights, MAP_LANES) for weights in (rnn1, rnn2)]
    return _rnnpool_in_place(sweeps, x, patch_size, stride)


@_rnnpool_in_place_op.register_fake
def _(x, rnn1, rnn2, patch_size, stride):
    (kh, kw), (sh, sw) = patch_size, stride
    oh, ow = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
    return x.new_empty(x.shape[0], 4 * rnn2[0].shape[1], oh, ow)


class RNNPool(nn.Module):
    """The RNNPool operator: patches [N, C, kh, kw] -> [N, 4 * hidden2].

    `cell` picks the RNN ('fastgrnn', 'gru' or 'lstm'). FastGRNN cells start with zeta=100, nu=-100 as in
    the reference RNNPool (so sigmoid(zeta) ~ 1 and sigmoid(nu) ~ 0); extra keyword arguments go to both
    cells (e.g. gate_nonlinearity='quantSigm').
    """

    def __init__(
        self, in_channels: int, hidden1: int, hidden2: int, cell: str = "fastgrnn", **cell_kwargs
    ) -> None:
        super().__init__()
        if cell == "fastgrnn":
            cell_kwargs = {"zeta_init": 100.0, "nu_init": -100.0, **cell_kwargs}
        self.in_channels, self.hidden1, self.hidden2, self.cell = in_channels, hidden1, hidden2, cell
        self.rnn1 = create_cell(cell, in_channels, hidden1, **cell_kwargs)
        self.rnn2 = create_cell(cell, hidden1, hidden2, **cell_kwargs)

    @property
    def out_channels(self) -> int:
        return 4 * self.hidden2

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if patches.ndim != 4 or patches.shape[1] != self.in_channels:
            raise InvalidArgumentError(
                f"RNNPool expects patches [N, {self.in_channels}, kh, kw], got {list(patches.shape)}"
            )
        size = (patches.shape[2], patches.shape[3])
        return rnnpool_map(self.rnn1, self.rnn2, patches, size, size).flatten(0, 2)

    @classmethod
    def from_edgeml(cls, state_dict: Mapping[str, torch.Tensor]) -> RNNPool:
        """Build a FastGRNN RNNPool from a state_dict saved by the EdgeML reference, sizes inferred.

        Uses the `cell_rnn.cell.*` and `cell_bidirrnn.cell.*` tensors (the reference also stores each
        cell under `unrollRNN` aliases, and DataParallel adds `module.`; both are ignored).
        """
        cells = {}
        for prefix in ("cell_rnn.cell.", "cell_bidirrnn.cell."):
            found = {
                k.removeprefix("module.")[len(prefix) :]: torch.as_tensor(v)
                for k, v in state_dict.items()
                if k.removeprefix("module.").startswith(prefix)
            }
            missing = {"W", "U", "bias_gate", "bias_update", "zeta", "nu"} - set(found)
            if missing:
                raise InvalidArgumentError(
                    f"not an EdgeML RNNPool state_dict: missing {sorted(prefix + m for m in missing)} "
                    f"(got keys {sorted(state_dict)[:6]} ...)"
                )
            cells[prefix] = found
        rnn1, rnn2 = cells["cell_rnn.cell."], cells["cell_bidirrnn.cell."]
        in_channels, hidden1 = rnn1["W"].shape
        hidden2 = rnn2["W"].shape[1]
        if rnn2["W"].shape[0] != hidden1:
            raise InvalidArgumentError(
                f"EdgeML state_dict: RNN2 input size {rnn2['W'].shape[0]} != RNN1 hidden size {hidden1}"
            )
        module = cls(int(in_channels), int(hidden1), int(hidden2))
        for cell, tensors in ((module.rnn1, rnn1), (module.rnn2, rnn2)):
            _load_fastgrnn(cell, tensors)
        return module


def _load_fastgrnn(cell: FastGRNNCell, tensors: Mapping[str, torch.Tensor]) -> None:
    own = {name: getattr(cell, name) for name in ("W", "U", "bias_gate", "bias_update", "zeta", "nu")}
    with torch.no_grad():
        for name, param in own.items():
            value = tensors[name]
            if value.shape != param.shape:
                raise InvalidArgumentError(
                    f"EdgeML tensor {name!r} has shape {list(value.shape)}, expected {list(param.shape)}"
                )
            param.copy_(value)


class RNNPoolLayer(nn.Module):
    """One RNNPool operator strided over a map: [B, C, H, W] -> [B, 4 * hidden2, oh, ow].

    padding:
    - "edgeml": VALID patches, oh = (H - kh) // sh + 1, then one replicate-padded row at the bottom and
      column at the right, as the reference models do (112 -> 27 -> 28 for k=6, s=4);
    - "valid": VALID patches only;
    - "same": the input is zero-padded (evenly, extra at the bottom/right) so that oh = ceil(H / sh).
    """

    def __init__(
        self,
        in_channels: int,
        hidden1: int,
        hidden2: int,
        patch_size: int | tuple[int, int],
        stride: int | tuple[int, int],
        padding: str = "edgeml",
        cell: str = "fastgrnn",
        **cell_kwargs,
    ) -> None:
        super().__init__()
        if padding not in PADDINGS:
            raise InvalidArgumentError(f"padding must be one of {PADDINGS}, got {padding!r}")
        self.patch_size, self.stride, self.padding = (
            _pair(patch_size, "patch_size"),
            _pair(stride, "stride"),
            padding,
        )
        self.pool = RNNPool(in_channels, hidden1, hidden2, cell, **cell_kwargs)

    @property
    def in_channels(self) -> int:
        return self.pool.in_channels

    @property
    def out_channels(self) -> int:
        return self.pool.out_channels

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Output (oh, ow) for an input of height x width (raises if a patch does not fit)."""
        (kh, kw), (sh, sw) = self.patch_size, self.stride
        if self.padding == "same":
            return -(-height // sh), -(-width // sw)
        if height < kh or width < kw:
            raise InvalidArgumentError(
                f"patch {kh}x{kw} is larger than the {height}x{width} input (padding={self.padding!r})"
            )
        extra = 1 if self.padding == "edgeml" else 0
        return (height - kh) // sh + 1 + extra, (width - kw) // sw + 1 + extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise InvalidArgumentError(
                f"RNNPoolLayer expects input [B, {self.in_channels}, H, W], got {list(x.shape)}"
            )
        (kh, kw), (sh, sw) = self.patch_size, self.stride
        oh, ow = self.output_size(x.shape[2], x.shape[3])
        if self.padding == "same":  # zeros, evenly, extra at the bottom/right
            pad_h, pad_w = max((oh - 1) * sh + kh - x.shape[2], 0), max((ow - 1) * sw + kw - x.shape[3], 0)
            x = nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        out = rnnpool_map(self.pool.rnn1, self.pool.rnn2, x, self.patch_size, self.stride)
        out = out.permute(0, 3, 1, 2)
        if self.padding == "edgeml":
            out = nn.functional.pad(out, (0, 1, 0, 1), mode="replicate")
        return out

    @classmethod
    def from_edgeml(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        patch_size: int | tuple[int, int],
        stride: int | tuple[int, int],
    ) -> RNNPoolLayer:
        """Build the layer from an EdgeML RNNPool state_dict (see RNNPool.from_edgeml), padding 'edgeml'."""
        pool = RNNPool.from_edgeml(state_dict)
        layer = cls(pool.in_channels, pool.hidden1, pool.hidden2, patch_size, stride)
        layer.pool = pool
        return layer


class PatchRowPool:
    """RNNPool of patches side by side in a patch row, for inference: RNN1 and RNN2 (both FastGRNN with
    sigmoid and tanh) in one call of the fused numba kernel (fastgrnn_kernels.rnnpool_rows) that reads the
    stem rows in place, either one patch row's region at a time (`__call__`) or a whole patch row's stem
    rows band by band, each computed once, RNN1's states kept between them (`band`). Both read a region
    through `inputs` (RNN1's W x where that has fewer channels), which the caller makes so that it may free
    the region first. The cells' parameters are packed when it is made, in their dtype (frozen weights:
    make it once); `start` sets numba's threads to torch's before a forward."""

    def __init__(self, layer: RNNPoolLayer) -> None:
        self.layer, self.dtype, self.threads = layer, layer.pool.rnn1.bias_gate.dtype, 1
        (self.kh, self.kw), (self.sh, self.sw) = layer.patch_size, layer.stride
        self.plans: dict[tuple, tuple] = {}  # plan() and held_shape() by (patches, rows), for self.threads
        with torch.no_grad():
            self.params = [
                pack_params(cell.kernel_weights()).numpy() for cell in (layer.pool.rnn1, layer.pool.rnn2)
            ]
        # RNN1's W x: once per input pixel by `inputs` (one GEMM) rather than once per sequence that reads
        # it (each pixel of overlapping patches is read by a row and a column of every patch it is in)
        self.weight: torch.Tensor | None = None
        if self.input_channels(layer) < layer.in_channels:
            weight, self.params[0] = premultiplied(self.params[0])
            self.weight = torch.from_numpy(weight)

    @staticmethod
    def input_channels(layer: RNNPoolLayer) -> int:
        """Channels of the regions the kernel reads: RNN1's W x (hidden1) where that is fewer than the
        pool's input's."""
        return min(layer.in_channels, layer.pool.hidden1)

    def inputs(self, region: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """What the kernel reads of a region [1, C, r, w] of the pool's input: the region, or RNN1's W x
        [1, h1, r, w] (see input_channels), written into `out` if given."""
        if self.weight is None:
            return region
        c, r, w = region.shape[1:]
        out = region.new_empty(1, len(self.weight), r, w) if out is None else out
        if region.stride(3) == 1 and region.stride(2) == w:  # its rows side by side: one GEMM
            torch.mm(self.weight, region[0].view(c, r * w), out=out[0].view(-1, r * w))
        else:  # a region cut from wider rows: a GEMM per row, not a contiguous copy of it
            for y in range(r):
                torch.mm(self.weight, region[0, :, y], out=out[0, :, y])
        return out

    def start(self) -> None:
        """Run on torch's threads from now on (numba's set to as many)."""
        threads = rnn_cells._numba_kernels().set_threads(torch.get_num_threads())
        if threads != self.threads:
            self.threads, self.plans = threads, {}

    @staticmethod
    def applies(layer: RNNPoolLayer, x: torch.Tensor) -> bool:
        """Whether the kernel can pool regions of x (FastGRNN cells, see FastGRNNCell.fused_sweep)."""
        return layer.pool.rnn1.fused_sweep(x) and layer.pool.rnn2.fused_sweep(x)

    @staticmethod
    def plan(
        layer: RNNPoolLayer, patches: int, threads: int | None = None, rows: int | None = None
    ) -> tuple[int, int, int]:
        """(lanes, tasks, scratch floats) of a call on `patches` patches with up to `threads` threads
        (default kernel_threads()), on a patch row's kh rows or, with `rows`, on a band of that many: a
        task per thread with 64 sequences or more each, blocks of at most `lanes` (a multiple of 8)."""
        threads = kernel_threads() if threads is None else threads
        (kh, kw), sw, pool = layer.patch_size, layer.stride[1], layer.pool
        width = (patches - 1) * sw + kw
        if rows is None:  # the row segments and columns run in one sweep
            sequences = max(kh * patches + width, 4 * patches)
        else:  # a band's row segments apart from each patch row's columns
            sequences = max(rows * patches, width, 4 * patches)
        tasks = max(1, min(threads, sequences // TASK_SEQUENCES))
        lanes = min(PATCH_LANES, -(-sequences // (8 * tasks)) * 8)  # whole vectors (the kernel pads blocks)
        per_lane = (
            max(PatchRowPool.input_channels(layer) + 2 * pool.hidden1, pool.hidden1 + 2 * pool.hidden2) + 2
        )
        return lanes, tasks, tasks * lanes * per_lane

    @staticmethod
    def held_shape(layer: RNNPoolLayer, patches: int, slots: int = 1) -> tuple[int, int]:
        """Shape of what RNN1 keeps for RNN2 of `patches` patches, [h1, kh n + slots W]: kh rows of row
        summaries, and `slots` patch rows' column states (one for a region; for bands ceil(kh / sh), the
        patch rows that a row belongs to)."""
        (kh, kw), sw = layer.patch_size, layer.stride[1]
        return layer.pool.hidden1, kh * patches + slots * ((patches - 1) * sw + kw)

    def __call__(self, region: torch.Tensor, out: torch.Tensor, top: int = 0, left: int = 0) -> None:
        """Pool the patches of one patch row's region into out [4 h2, n]; `region` is inputs() of the region
        [1, C, kh, W], holding its rows from `top` and its columns from `left` on, the others are its zero
        padding."""
        self._run(region, out, (0, self.kh, top, left, 0, 0, 1), None, None)

    def band(
        self,
        region: torch.Tensor,
        out: torch.Tensor,
        top: int,
        left: int,
        rows: tuple[int, int],
        patch_rows: tuple[int, int],
        held: torch.Tensor,
    ) -> None:
        """RNN1 over the band of a whole patch row's stem rows rows[0] .. rows[1] - 1 (of the zero-padded
        map; `region`, inputs() of [1, C, r, W], holds them from its row `top` and column `left` on) and
        the columns of patch rows patch_rows[0] .. patch_rows[1] (those with rows in the band, the first
        not ended yet), then, if the band ends patch row patch_rows[0], RNN2 of its patches into out
        [4 h2, n]. `held` (held_shape with ceil(kh / sh) slots) carries RNN1's states from band to band."""
        slots = -(-self.kh // self.sh)
        self._run(region, out, (*rows, top, left, *patch_rows, slots), held.numpy(), rows[1] - rows[0])

    def _run(self, region, out, band: tuple[int, ...], held: np.ndarray | None, rows: int | None) -> None:
        """The kernel on a band (y0, y1, top, left, first, last, slots), with a region's own `held` (None)
        allocated beside the scratch, in one tensor."""
        patches = out.shape[1]
        if (patches, rows) not in self.plans:
            shape = self.held_shape(self.layer, patches)
            self.plans[patches, rows] = *self.plan(self.layer, patches, self.threads, rows), shape
        lanes, tasks, floats, shape = self.plans[patches, rows]
        if held is None:
            work = region.new_empty(floats + shape[0] * shape[1]).numpy()
            scratch, held = work[:floats], work[floats:].reshape(shape)
        else:
            scratch = region.new_empty(floats).numpy()
        kernels = rnn_cells._numba_kernels()
        kernel = kernels.rnnpool_rows if tasks > 1 else kernels.rnnpool_rows_serial
        y0, y1, top, left, first, last, slots = band
        geometry = (self.kh, self.kw, self.sh, self.sw, patches, y0, y1, top, left, first, last, slots)
        kernel(region[0].numpy(), out.numpy(), *self.params, geometry, held, lanes, tasks, scratch)
