"""Checkpoints of the RNNPool-Face detectors: ours, and those EdgeML's train.py saves.

EdgeML's layout (examples/pytorch/vision/Face_Detection, `module.` prefixed by DataParallel) -> ours:

- `conv_top.i.*` (Quant) / `conv.*` (QVGA-mono, M4) -> `stem.i.*` / `stem.0.*`;
- `rnn_model.cell_rnn.cell.*` / `rnn_model.cell_bidirrnn.cell.*` -> `rnnpool.pool.rnn1.*` / `rnn2.*` (the
  `unrollRNN` aliases of the same tensors are dropped; EdgeML zeroes pruned weights itself, so the
  sparsity masks become all ones);
- `mob.i.*` -> `features.i.*`;
- `L2Norm3_3` / `L2Norm4_3` / `L2Norm5_3` -> the l2norm of the first, second and third normalised head;
- `loc.j.*` / `conf.j.*`: EdgeML's flat lists of head convs, in order, onto our heads' convs (RNNPool-Face-
  Quant's first head holds two: its strided ConvBNReLU and the predicting conv).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from leanvision.errors import CheckpointError
from leanvision.models.base import model_name
from leanvision.models.weights import read_state_dict

if TYPE_CHECKING:
    from leanvision.models.face.nets import RNNPoolFace

L2NORM_KEYS = ("L2Norm3_3.weight", "L2Norm4_3.weight", "L2Norm5_3.weight")
RNN_PREFIXES = {
    "rnn_model.cell_rnn.cell.": "rnnpool.pool.rnn1.",
    "rnn_model.cell_bidirrnn.cell.": "rnnpool.pool.rnn2.",
}


def is_edgeml_face_layout(state: dict[str, torch.Tensor]) -> bool:
    """True for the key scheme of EdgeML's RPool_Face_* models (after `module.` is removed)."""
    return "rnn_model.cell_rnn.cell.W" in state and any(k.startswith("mob.") for k in state)


def _head_convs(model: RNNPoolFace, branch: str) -> list[str]:
    """Our module paths of EdgeML's flat `loc` or `conf` list, in order."""
    paths = []
    for i, head in enumerate(model.heads):
        module = getattr(head, branch)
        names = (
            [f"{branch}.{j}" for j in range(len(module))] if isinstance(module, nn.Sequential) else [branch]
        )
        paths += [f"heads.{i}.{name}" for name in names]
    return paths


def convert_edgeml_face(state: dict[str, torch.Tensor], model: RNNPoolFace) -> dict[str, torch.Tensor]:
    """Rename an EdgeML RPool_Face_* state_dict to `model`'s keys; keys of no known part are kept as they
    are, so that loading names them."""
    normalised = [
        f"heads.{i}.l2norm.weight" for i, h in enumerate(model.heads) if hasattr(h.l2norm, "weight")
    ]
    heads = {"loc": _head_convs(model, "loc"), "conf": _head_convs(model, "conf")}
    converted = {}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        if key.startswith("rnn_model."):
            prefix = next((p for p in RNN_PREFIXES if key.startswith(p)), None)
            if prefix is None:
                continue  # an unrollRNN alias of a cell tensor
            new = RNN_PREFIXES[prefix] + key.removeprefix(prefix)
            if new.endswith((".W", ".U")):
                converted[new[:-1] + f"{new[-1].lower()}_mask"] = torch.ones_like(value)
        elif part == "conv_top":
            new = f"stem.{rest}"
        elif part == "conv":
            new = f"stem.0.{rest}"
        elif part == "mob":
            new = f"features.{rest}"
        elif key in L2NORM_KEYS and L2NORM_KEYS.index(key) < len(normalised):
            new = normalised[L2NORM_KEYS.index(key)]
        elif part in heads:
            index, _, tail = rest.partition(".")
            paths = heads[part]
            new = f"{paths[int(index)]}.{tail}" if index.isdigit() and int(index) < len(paths) else key
        else:
            new = key
        converted[new] = value
    return converted


def describe(state: dict[str, torch.Tensor]) -> str:
    """A detector's structure as read from a state_dict in our layout: input channels, RNNPool size,
    blocks and heads (what tells one RNNPool-Face model from another)."""
    rnn_w = state.get("rnnpool.pool.rnn1.W")
    if rnn_w is None:
        return f"no RNNPool (keys {sorted(state)[:4]} ...)"
    stem = sorted({k.split(".")[1] for k in state if k.startswith("stem.")})
    in_chans = state["stem.0.0.weight"].shape[1] if stem else rnn_w.shape[0]
    blocks = len({k.split(".")[1] for k in state if k.startswith("features.")})
    heads = len({k.split(".")[1] for k in state if k.startswith("heads.")})
    return (
        f"{in_chans} input channels, {len(stem)} stem convs, RNNPool {rnn_w.shape[0]}->{4 * rnn_w.shape[1]} "
        f"channels, {blocks} blocks, {heads} heads"
    )


def load_face_checkpoint(model: RNNPoolFace, path: str | Path) -> RNNPoolFace:
    """Load our state_dict or an EdgeML train.py checkpoint into `model` in place; a checkpoint of another
    detector raises CheckpointError naming what the file holds and what the model expects."""
    state = read_state_dict(path)
    source = "EdgeML"
    if is_edgeml_face_layout(state):
        state = convert_edgeml_face(state, model)
    else:
        source = "leanvision"
    target = model.state_dict()
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    mismatched = [k for k in state if k in target and state[k].shape != target[k].shape]
    if missing or unexpected or mismatched:
        first = (
            f"tensor {mismatched[0]!r} is {list(state[mismatched[0]].shape)}, expected "
            f"{list(target[mismatched[0]].shape)}"
            if mismatched
            else f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
        raise CheckpointError(
            f"{path} ({source} layout) is not a {model_name(model)} checkpoint: it has {describe(state)}; "
            f"{model_name(model)} expects {describe(target)} ({first})"
        )
    model.load_state_dict(state, strict=False)
    return model
