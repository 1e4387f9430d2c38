"""Slow, literal RNNPool (paper Algorithm 1, zero initial states as the reference code) for the tests.

One patch at a time, one pixel at a time, through the cells' plain one-step `forward`.
"""

from __future__ import annotations

import torch
from torch import nn


def run_rnn(cell: nn.Module, sequence: list[torch.Tensor]) -> torch.Tensor:
    """Algorithm 1 lines 1-9: run the cell over a list of input vectors from a zero state."""
    state = None
    for x in sequence:
        state = cell(x[None], state)  # a batch of one vector
    return cell.output(state)[0]


def rnnpool_patch(rnn1: nn.Module, rnn2: nn.Module, patch: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 lines 11-18 for one patch [C, r, c] -> [4 * h2]."""
    _, r, c = patch.shape
    p_rows = [run_rnn(rnn1, [patch[:, i, j] for j in range(c)]) for i in range(r)]  # line 12
    q_r1 = run_rnn(rnn2, p_rows)  # line 13
    q_r2 = run_rnn(rnn2, p_rows[::-1])  # line 14
    p_cols = [run_rnn(rnn1, [patch[:, i, j] for i in range(r)]) for j in range(c)]  # line 15
    q_c1 = run_rnn(rnn2, p_cols)  # line 16
    q_c2 = run_rnn(rnn2, p_cols[::-1])  # line 17
    return torch.cat([q_r1, q_r2, q_c1, q_c2])  # line 18


def rnnpool_operator(pool: nn.Module, patches: torch.Tensor) -> torch.Tensor:
    """[N, C, kh, kw] -> [N, 4 * h2], one patch after another."""
    return torch.stack([rnnpool_patch(pool.rnn1, pool.rnn2, p) for p in patches])


def rnnpool_layer(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 4 * h2, oh, ow]: every output position cut out and pooled on its own."""
    (kh, kw), (sh, sw) = layer.patch_size, layer.stride
    if layer.padding == "same":
        oh, ow = -(-x.shape[2] // sh), -(-x.shape[3] // sw)
        pad_h, pad_w = max((oh - 1) * sh + kh - x.shape[2], 0), max((ow - 1) * sw + kw - x.shape[3], 0)
        x = nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    oh, ow = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
    out = torch.zeros(x.shape[0], layer.out_channels, oh, ow)
    for b in range(x.shape[0]):
        for i in range(oh):
            for j in range(ow):
                patch = x[b, :, i * sh : i * sh + kh, j * sw : j * sw + kw]
                out[b, :, i, j] = rnnpool_patch(layer.pool.rnn1, layer.pool.rnn2, patch)
    if layer.padding == "edgeml":  # replicate the last row and column
        out = torch.cat([out, out[:, :, -1:]], dim=2)
        out = torch.cat([out, out[:, :, :, -1:]], dim=3)
    return out
