"""ReNet layer (Visin et al. 2015) as a downsampling operator: the RNNPool paper's Table 2/3 baseline.

The map is cut into non-overlapping patch_size x patch_size patches, each flattened into one vector. A
bidirectional pair of RNNs sweeps every column of that patch grid (top-down and bottom-up), the two
hidden sequences are concatenated, and a second bidirectional pair sweeps every row of the result
(left-right and right-left). The output at each position is the concatenation of the last pair's hidden
states there: 2 * hidden channels. The RNNPool paper sizes hidden = 2 * h2, so ReNet's output has the
4 * h2 channels of the RNNPool layer it stands in for, and uses GRUs (rebuttal, rnnpool-reviews.md).
"""

from __future__ import annotations

import torch
from torch import nn

from leanvision.errors import InvalidArgumentError
from leanvision.layers.rnn_cells import RecurrentCell, create_cell


def sweep_sequence(cell: RecurrentCell, seq: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """All hidden states of `cell` run along dim -2 of seq [..., T, input] (backwards if `reverse`)."""
    projected = cell.project(seq)  # one GEMM for every step
    steps = range(seq.shape[-2] - 1, -1, -1) if reverse else range(seq.shape[-2])
    state = cell.initial_state(tuple(seq.shape[:-2]), seq)
    hidden = [None] * seq.shape[-2]
    for t in steps:
        state = cell.step(projected[..., t, :], state)
        hidden[t] = cell.output(state)
    return torch.stack(hidden, dim=-2)


class ReNetLayer(nn.Module):
    """[B, C, H, W] -> [B, 2 * hidden, H // patch, W // patch] with four RNNs (2 vertical, 2 horizontal)."""

    def __init__(self, in_channels: int, hidden: int, patch_size: int, cell: str = "gru") -> None:
        super().__init__()
        if not isinstance(patch_size, int) or patch_size < 1:
            raise InvalidArgumentError(f"patch_size must be a positive int, got {patch_size!r}")
        self.in_channels, self.hidden, self.patch_size = in_channels, hidden, patch_size
        flat = in_channels * patch_size * patch_size
        self.down, self.up = create_cell(cell, flat, hidden), create_cell(cell, flat, hidden)
        self.right, self.left = create_cell(cell, 2 * hidden, hidden), create_cell(cell, 2 * hidden, hidden)

    @property
    def out_channels(self) -> int:
        return 2 * self.hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise InvalidArgumentError(
                f"ReNetLayer expects input [B, {self.in_channels}, H, W], got {list(x.shape)}"
            )
        if x.shape[2] < p or x.shape[3] < p:
            raise InvalidArgumentError(f"patch {p}x{p} is larger than the {x.shape[2]}x{x.shape[3]} input")
        # [B, C, H', W', p, p] -> [B, W', H', C*p*p]: patch vectors, columns of the grid as sequences
        grid = x.unfold(2, p, p).unfold(3, p, p).permute(0, 3, 2, 1, 4, 5).flatten(3)
        vertical = torch.cat(
            [sweep_sequence(self.down, grid), sweep_sequence(self.up, grid, reverse=True)], -1
        )
        rows = vertical.transpose(1, 2)  # [B, H', W', 2h]: rows of the grid as sequences
        out = torch.cat([sweep_sequence(self.right, rows), sweep_sequence(self.left, rows, reverse=True)], -1)
        return out.permute(0, 3, 1, 2)
