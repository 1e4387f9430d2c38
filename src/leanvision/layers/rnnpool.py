"""RNNPool (Saha et al., NeurIPS 2020): pool a patch with two RNNs, and the strided layer built on it.

RNN1 summarises every row (left to right) and every column (top to bottom) of a patch; RNN2 then runs
over the row summaries and over the column summaries, forwards and backwards. The output is
[rows fwd, rows bwd, cols fwd, cols bwd], 4 * hidden2 values; all initial states are zero.

The fast path follows the speed notes of the reference analysis (shared/notes/rnnpool-reference.md):
- RNN1's input projection runs once per pixel (one GEMM over the map), before any patch is formed;
- the inputs of each step are strided views of that projection, never the whole unfolded map;
- the row and column sweeps of RNN1 advance together, as do RNN2's four sweeps, so a k x k patch takes
  2k sequential steps, each one batched over every patch of the map.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from leanvision.layers.rnn_cells import FastGRNNCell, RecurrentCell, create_cell

PADDINGS = ("edgeml", "valid", "same")

# Patches pooled together in one band: a band's per-step tensors (a few hundred KiB) stay in the CPU's
# cache through the ~10 elementwise kernels of a recurrent step, instead of streaming from memory.
TILE_PATCHES = 2048


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair


def _sweep(cell: RecurrentCell, inputs: Callable[[int], torch.Tensor], steps: int) -> torch.Tensor:
    """Run `cell` for `steps` steps over projected inputs `inputs(t)`; returns the final hidden vectors."""
    first = inputs(0)
    state = cell.step(first, cell.initial_state(tuple(first.shape[:-1]), first))
    for t in range(1, steps):
        state = cell.step(inputs(t), state)
    return cell.output(state)


def _bidirectional(cell: RecurrentCell, seq: torch.Tensor) -> torch.Tensor:
    """Forward and backward sweeps over projected seq [..., T, G] together: returns [2, ..., hidden]."""
    steps = seq.shape[-2]
    return _sweep(cell, lambda t: torch.stack((seq[..., t, :], seq[..., steps - 1 - t, :])), steps)


def rnnpool_projected(
    rnn1: RecurrentCell,
    rnn2: RecurrentCell,
    projected: torch.Tensor,
    patch_size: tuple[int, int],
    stride: tuple[int, int],
) -> torch.Tensor:
    """RNNPool of every VALID patch of a map of RNN1 input projections [B, H, W, G1] -> [B, oh, ow, 4 * h2].

    Large maps are cut into bands of output rows of about TILE_PATCHES patches. The step-t inputs of all
    patches of a band are strided views of `projected`: for the row sweeps, the pixels at
    column offset t of every patch (a column subsampling, then an unfold along the height); for the column
    sweeps, the pixels at row offset t. Nothing the size of the unfolded map is built, in either pass.
    """
    (kh, kw), (sh, sw) = patch_size, stride
    oh, ow = (projected.shape[1] - kh) // sh + 1, (projected.shape[2] - kw) // sw + 1
    rows_per_tile = max(1, TILE_PATCHES // (projected.shape[0] * ow))
    if rows_per_tile < oh:  # bands of output rows, each computed on its own band of the input
        bands = [
            projected[:, i * sh : (min(i + rows_per_tile, oh) - 1) * sh + kh]
            for i in range(0, oh, rows_per_tile)
        ]
        return torch.cat([rnnpool_projected(rnn1, rnn2, band, patch_size, stride) for band in bands], dim=1)
    height, width = (oh - 1) * sh + kh, (ow - 1) * sw + kw

    def row_inputs(t: int) -> torch.Tensor:  # [B, oh, ow, kh, G]: row r of every patch, its pixel t
        return projected[:, :height, t : t + (ow - 1) * sw + 1 : sw].unfold(1, kh, sh).movedim(-1, -2)

    def col_inputs(t: int) -> torch.Tensor:  # [B, oh, ow, kw, G]: column c of every patch, its pixel t
        return projected[:, t : t + (oh - 1) * sh + 1 : sh, :width].unfold(2, kw, sw).movedim(-1, -2)

    if kh == kw:  # rows and columns advance in one batch, and so do RNN2's four sweeps
        both = _sweep(rnn1, lambda t: torch.stack((row_inputs(t), col_inputs(t))), kw)
        swept = _bidirectional(rnn2, rnn2.project(both))  # [direction, rows/cols, B, oh, ow, h2]
        rows, cols = swept[:, 0], swept[:, 1]
    else:
        rows = _bidirectional(rnn2, rnn2.project(_sweep(rnn1, row_inputs, kw)))
        cols = _bidirectional(rnn2, rnn2.project(_sweep(rnn1, col_inputs, kh)))
    return torch.cat((rows[0], rows[1], cols[0], cols[1]), dim=-1)


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
            raise ValueError(
                f"RNNPool expects patches [N, {self.in_channels}, kh, kw], got {list(patches.shape)}"
            )
        size = (patches.shape[2], patches.shape[3])
        projected = self.rnn1.project(patches.permute(0, 2, 3, 1))
        return rnnpool_projected(self.rnn1, self.rnn2, projected, size, size).flatten(0, 2)

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
                raise ValueError(
                    f"not an EdgeML RNNPool state_dict: missing {sorted(prefix + m for m in missing)} "
                    f"(got keys {sorted(state_dict)[:6]} ...)"
                )
            cells[prefix] = found
        rnn1, rnn2 = cells["cell_rnn.cell."], cells["cell_bidirrnn.cell."]
        in_channels, hidden1 = rnn1["W"].shape
        hidden2 = rnn2["W"].shape[1]
        if rnn2["W"].shape[0] != hidden1:
            raise ValueError(
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
                raise ValueError(
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
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
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
            raise ValueError(
                f"patch {kh}x{kw} is larger than the {height}x{width} input (padding={self.padding!r})"
            )
        extra = 1 if self.padding == "edgeml" else 0
        return (height - kh) // sh + 1 + extra, (width - kw) // sw + 1 + extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"RNNPoolLayer expects input [B, {self.in_channels}, H, W], got {list(x.shape)}")
        (kh, kw), (sh, sw) = self.patch_size, self.stride
        oh, ow = self.output_size(x.shape[2], x.shape[3])
        projected = self.pool.rnn1.project(x.permute(0, 2, 3, 1))  # [B, H, W, G1], once per pixel
        if self.padding == "same":
            pad_h, pad_w = max((oh - 1) * sh + kh - x.shape[2], 0), max((ow - 1) * sw + kw - x.shape[3], 0)
            # zero input pixels project to zero (FastGRNN has no input bias) or to the input bias (GRU/LSTM)
            zero = self.pool.rnn1.project(x.new_zeros(1, 1, 1, x.shape[1]))
            projected = _pad_with(projected, pad_h, pad_w, zero)
        out = rnnpool_projected(self.pool.rnn1, self.pool.rnn2, projected, self.patch_size, self.stride)
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


def _pad_with(projected: torch.Tensor, pad_h: int, pad_w: int, value: torch.Tensor) -> torch.Tensor:
    """Pad [B, H, W, G] evenly (extra at the bottom/right) with the projection of a zero pixel."""
    top, left = pad_h // 2, pad_w // 2
    b, h, w, g = projected.shape
    canvas = value.expand(b, h + pad_h, w + pad_w, g).clone()
    canvas[:, top : top + h, left : left + w] = projected
    return canvas
