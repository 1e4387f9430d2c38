"""Load and save weights from local files, in our layout and in foreign ones.

Layouts:
- ours = timm's for ReXNet (stem / features.i.conv_exp ... / head.fc) and torchvision's for MobileNetV2:
  loaded by name;
- clovaai (the official NAVER ReXNet and ReXNet-lite code): `features.N...` / `output.N...`, loaded by
  position. Both codes register tensors in forward order, so the i-th tensor of one is the i-th of the
  other; each pair must agree in kind (weight, bias, running_mean, ...) and shape, and 1x1-conv
  classifiers become Linear weights. `num_batches_tracked` counters are not paired (they do not change
  inference and older checkpoints lack them).
- EdgeML (the RNNPool reference's Visual Wake Words example, `{"model": state_dict, "acc", "epoch"}`):
  `features_init` / `rnn_model` / `features.N` / `rnn_model_end` / `classifier`, renamed to our
  MobileNetV2 keys. The reference stores each RNN cell under several aliases; only `*.cell.*` is kept.

Files are read with `torch.load(weights_only=True)` or safetensors: nothing is ever unpickled.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanvision.errors import CheckpointError, MissingFileError, OutputError, first_line

WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "model_state_dict", "net")


def load_torch_file(path: str | Path) -> Any:
    """`torch.load(weights_only=True)` of a local file. Any failure is a CheckpointError naming the file;
    torch's own message is not passed on, since it suggests weights_only=False (unpickling arbitrary code),
    which leanvision never does."""
    try:
        with warnings.catch_warnings():  # torch's note on a pickle protocol it then refuses
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found:
            raise CheckpointError(
                f"{path} is not a weights-only checkpoint: it holds objects other than tensors and plain "
                f"containers ({found.group(1)}); leanvision never unpickles objects. Re-save it as a "
                "state_dict"
            ) from None
        reason = first_line(err.__context__) if err.__context__ is not None else "refused"
        raise CheckpointError(
            f"{path} is not a weights-only checkpoint (a state_dict saved by torch.save): torch's "
            f"weights-only loader stops at {reason!r}, so the file is damaged, not a checkpoint, or pickles "
            "objects"
        ) from None
    except Exception as err:  # a file torch cannot parse is bad input, whatever its parser raises
        detail = f": {first_line(err).split('. ')[0]}" if isinstance(err, RuntimeError) else ""
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or not one; expected a state_dict saved "
            f"by torch.save, or safetensors in a .safetensors file){detail}"
        ) from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local checkpoint file, unwrapped from common containers, `module.` prefixes removed."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; expected a checkpoint file (.pt, .pth or .safetensors)")
    if not path.is_file():
        raise MissingFileError(
            f"checkpoint file not found: {path} (leanvision loads weights from local files only)"
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None
    else:
        state = load_torch_file(path)
    while isinstance(state, Mapping) and not _is_tensor_dict(state):
        inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            raise CheckpointError(f"{path} has no state_dict: top-level keys are {sorted(state)[:10]}")
        state = inner
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, expected a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _is_tensor_dict(state: Mapping) -> bool:
    return len(state) > 0 and all(isinstance(v, torch.Tensor) for v in state.values())


def is_clovaai_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """True for the official NAVER ReXNet key scheme (`features.0.weight` stem conv, `output.N` head)."""
    return "features.0.weight" in state and any(k.startswith("output.") for k in state)


# EdgeML VWW key prefixes -> ours (MobileNetV2 with the RNNPool downsample at features.1).
EDGEML_VWW_PREFIXES = (
    ("features_init.", "features.0."),
    ("rnn_model.cell_rnn.cell.", "features.1.pool.rnn1."),
    ("rnn_model.cell_bidirrnn.cell.", "features.1.pool.rnn2."),
    ("rnn_model_end.cell_rnn.cell.", "global_pool.rnn1."),
    ("rnn_model_end.cell_bidirrnn.cell.", "global_pool.rnn2."),
    ("classifier.1.", "classifier.1."),
    ("classifier.0.", "classifier.1."),  # the two-RNNPool variant has no Dropout before its Linear
)


def is_edgeml_vww_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """True for the EdgeML Visual Wake Words MobileNetV2-RNNPool key scheme."""
    return "features_init.0.weight" in state and "rnn_model.cell_rnn.cell.W" in state


def convert_edgeml_vww(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an EdgeML VWW state_dict to our keys; the reference's RNN cell aliases are dropped.

    The reference's FastGRNN has no sparsity masks (it zeroes weights instead): ours get all-ones masks.
    """
    converted = {}
    for key, value in state.items():
        if key.startswith("features."):  # inverted residuals: ours sit after the stem and the RNNPool
            index, rest = key.removeprefix("features.").split(".", 1)
            converted[f"features.{int(index) + 2}.{rest}"] = value
            continue
        for old, new in EDGEML_VWW_PREFIXES:
            if key.startswith(old):
                converted[new + key.removeprefix(old)] = value
                if key.endswith(".cell.W") or key.endswith(".cell.U"):
                    converted[f"{new}{key[-1].lower()}_mask"] = torch.ones_like(value)
                break
    return converted


def convert_positional(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map a state_dict onto `model`'s keys by position (see the module docstring for the checks)."""
    target = model.state_dict()
    src = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in target.items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise CheckpointError(
            f"it has {len(src)} tensors, {type(model).__name__} expects {len(dst)} "
            "(a checkpoint of another model family or depth?)"
        )
    converted = {}
    for (src_key, value), (dst_key, expected) in zip(src, dst):
        if src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise CheckpointError(f"tensor {src_key!r} does not line up with {dst_key!r}")
        if value.shape != expected.shape and value.squeeze().shape == expected.squeeze().shape:
            value = value.reshape(expected.shape)  # 1x1-conv classifier <-> Linear
        _check_shape(src_key, value, expected, dst_key)
        converted[dst_key] = value
    return converted


def _check_shape(key: str, value: torch.Tensor, expected: torch.Tensor, model_key: str | None = None) -> None:
    if value.shape != expected.shape:
        where = f" (model tensor {model_key!r})" if model_key and model_key != key else ""
        raise CheckpointError(
            f"tensor {key!r}{where} has shape {list(value.shape)}, the model expects "
            f"{list(expected.shape)}: the checkpoint was made for another width, class count or model"
        )


def load_checkpoint(model: nn.Module, path: str | Path, strict: bool = True, context: str = "") -> nn.Module:
    """Load a local checkpoint (ours, timm, torchvision, clovaai or EdgeML layout) into `model` in place;
    a checkpoint that does not fit raises a CheckpointError naming the file and the first misfit, followed
    by `context` (what the model was built for)."""
    state = read_state_dict(path)
    try:
        _load_state(model, state, strict)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint {path}: {err}{context}") from None
    return model


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], strict: bool) -> None:
    if is_clovaai_layout(state) and not set(state) <= set(model.state_dict()):
        state = convert_positional(state, model)
    elif is_edgeml_vww_layout(state):
        state = convert_edgeml_vww(state)
    target = model.state_dict()
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"it does not fit {type(model).__name__}: "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for key, value in state.items():
        if key in target:
            _check_shape(key, value, target[key])
    model.load_state_dict(state, strict=False)


def save_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """Write the model's state_dict (our layout; timm loads it as is); `.safetensors` picks that format."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(path))
        else:
            torch.save(state, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
        raise OutputError(f"cannot write the checkpoint {path}: {first_line(err)}") from None
    return path
