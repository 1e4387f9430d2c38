"""Training checkpoints: written atomically, readable with `torch.load(weights_only=True)`.

A checkpoint holds `model` (its state_dict, so `create_model(name, pretrained=FILE)` loads it),
`optimizer`, `scheduler`, `scaler`, `epoch` (epochs completed), `history` (one metrics row per epoch),
`config` (the TrainConfig as a dict) and `rng` (torch CPU/CUDA, numpy and Python generator states).
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from leanvision.errors import CheckpointError, InvalidArgumentError, MissingFileError, OutputError
from leanvision.models.weights import load_torch_file


def empty_output_dir(out: str | Path) -> Path:
    """Create `out` for an experiment's results; a folder that already holds files raises a ValueError."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InvalidArgumentError(f"{out} is not empty; pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def temporary_path(path: str | Path) -> Path:
    """Where `write_atomic` writes `path` before renaming it (a crash can leave it behind)."""
    return Path(path).with_name(f".{Path(path).name}.tmp")


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(file)` on a temporary file in the same folder, flush it to disk, then rename it over
    `path`: a process killed at any moment leaves `path` whole, old or new. A failed write (a full disk)
    removes the temporary file and raises an OutputError; `path` keeps its previous content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:  # Ctrl-C too: no temporary file is left behind
        tmp.unlink(missing_ok=True)
        if not isinstance(err, (OSError, RuntimeError)):  # torch.save reports a failed write as RuntimeError
            raise
        full = getattr(err, "errno", None) == errno.ENOSPC or "space" in str(err)
        kept = "it keeps its previous content" if path.exists() else "nothing was written"
        raise OutputError(f"cannot write {path} ({'the disk is full' if full else err}); {kept}") from err
    return path


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """torch.save `state` to `path` with `write_atomic`."""
    return write_atomic(path, lambda f: torch.save(state, f))


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Write `text` (UTF-8) to `path` with `write_atomic`."""
    return write_atomic(path, lambda f: f.write(text.encode()))


def rng_state() -> dict[str, Any]:
    """Every random generator a training step may draw from, in weights_only-loadable form."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            **numpy_state,
            "state": {
                **numpy_state["state"],
                "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            },
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by `rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    key = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state({**numpy_state, "state": {**numpy_state["state"], "key": key}})
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by the trainer; anything else raises a ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no checkpoint to resume from: {path} does not exist")
    state = load_torch_file(path)
    missing = {"model", "optimizer", "epoch", "config", "rng"} - set(state if isinstance(state, dict) else ())
    if missing:
        raise InvalidArgumentError(
            f"{path} is not a leanvision training checkpoint (missing {sorted(missing)})"
        )
    return state


def training_config_of(path: str | Path, model_name: str) -> dict[str, Any] | None:
    """read_training_config of a file that must hold `model_name`: a trainer checkpoint of another model
    raises an InvalidArgumentError naming both."""
    saved = read_training_config(path)
    if saved is not None and saved["model"] != model_name:
        raise InvalidArgumentError(f"{path} is a checkpoint of model {saved['model']!r}, not {model_name!r}")
    return saved


def read_training_config(path: str | Path) -> dict[str, Any] | None:
    """The TrainConfig dict of a trainer checkpoint, or None for any other weights file."""
    path = Path(path)
    if path.suffix == ".safetensors" or not path.is_file():
        return None
    try:
        state = load_torch_file(path)
    except CheckpointError:  # not ours: leave the error to the weights loader, which names the problem
        return None
    return state.get("config") if isinstance(state, dict) and isinstance(state.get("config"), dict) else None
