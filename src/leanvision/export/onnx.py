"""ONNX export of any leanvision model, checked by running the file with ONNX Runtime.

`to_onnx(model, path, input_size)` exports with torch.onnx's dynamo exporter (torch.export, then ONNX
opset 18) with a dynamic batch axis. RNNPool runs as explicit ops (its numba sweep and its size-dependent
tiling are off under export), so quantisers see its matrix products. A detector (a model with
`head_outputs`) exports its raw outputs, loc [B, P, 4], conf [B, P, 2] and priors [P, 4], with its image
normalisation in the graph: decoding and NMS stay in Python (models.face.postprocess.detect). The file is
checked with onnx.checker and run once with ONNX Runtime on a batch of another size than the export's;
outputs that differ from PyTorch's by more than `rtol` of their largest magnitude fail the export, unless
PyTorch's own float32 result is that far from float64 too (a deep network amplifies rounding) and ONNX
Runtime's is within twice PyTorch's distance from float64.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from leanvision.errors import InvalidArgumentError, OutputError

OPSET = 18
RTOL = 1e-4
INPUT_NAME = "images"


class HeadOutputs(nn.Module):
    """A detector as a plain graph: 0-1 images [B, C, H, W] -> its raw outputs (`head_output_names`)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.detector.head_outputs(self.detector.normalize(images))


def exportable(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The module that is exported for `model` and the names of its outputs."""
    if hasattr(model, "head_outputs"):
        return HeadOutputs(model).eval(), list(model.head_output_names)
    return model, ["logits"]


@dataclass
class ExportReport:
    """What `to_onnx` wrote and checked."""

    path: str
    input_size: tuple[int, int, int]
    outputs: list[str]
    max_abs_diff: float  # ONNX Runtime against PyTorch, on the check batch
    max_abs_output: float
    file_bytes: int


def _outputs(result) -> list[np.ndarray]:
    items = result if isinstance(result, (tuple, list)) else [result]
    return [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in items]


def to_onnx(
    model: nn.Module,
    path: str | Path,
    input_size: tuple[int, int, int],
    rtol: float = RTOL,
    check_batch: int = 3,
) -> ExportReport:
    """Export eval-mode `model` for inputs [B, *input_size] (B dynamic) to `path` and check the file."""
    import onnx

    if len(input_size) != 3 or min(input_size) < 1:
        raise InvalidArgumentError(f"input_size must be (C, H, W) positive, got {tuple(input_size)}")
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"cannot write {path}: {path.parent} is not a folder")
    module, names = exportable(model.eval())
    example = torch.rand(2, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        module(example)  # a model that cannot take this input fails here, with its own message
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter's progress and deprecation chatter
        torch.onnx.export(
            module, (example,), str(path), input_names=[INPUT_NAME], output_names=names,
            dynamic_shapes=({0: batch},), opset_version=OPSET, dynamo=True, external_data=False,
        )  # fmt: skip
    onnx.checker.check_model(str(path))
    probe = torch.rand(check_batch, *input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _outputs(module(probe))
    got = ort_session(path).run(None, {INPUT_NAME: probe.numpy()})
    scale = max(float(np.abs(e).max()) if e.size else 0.0 for e in expected)
    diff = _max_diff(got, expected)
    if not diff <= rtol * max(scale, 1e-6):
        # A deep network can amplify float32 rounding beyond rtol by itself: then the file passes when ONNX
        # Runtime is as close to the float64 result as PyTorch's float32 forward is (within 2x).
        with torch.no_grad():
            exact = _outputs(copy.deepcopy(module).double()(probe.double()))
        torch_error, ort_error = _max_diff(expected, exact), _max_diff(got, exact)
        if not ort_error <= max(2 * torch_error, rtol * scale):
            raise InvalidArgumentError(
                f"the exported {path.name} differs from PyTorch by {diff:.3g} (largest output {scale:.3g}, "
                f"tolerance {rtol:g} of it; from float64 {ort_error:.3g}, PyTorch float32's "
                f"{torch_error:.3g}): an op ONNX Runtime computes differently"
            )
    return ExportReport(str(path), tuple(input_size), names, diff, scale, path.stat().st_size)


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) if y.size else 0.0 for x, y in zip(a, b))


def ort_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session with intra-op spinning off: its spinning threads would otherwise slow
    whatever runs next on the same cores (several-fold, measured against PyTorch)."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise InvalidArgumentError(
            "ONNX Runtime is not installed: pip install onnxruntime (or leanvision's 'deploy' extra)"
        ) from err
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OrtModule(nn.Module):
    """An ONNX file behind a module's call: [B, C, H, W] float tensor -> the first output (a classifier's
    logits), or all outputs as a tuple when there are several."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        self.path, self.session = str(path), ort_session(path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor):
        outputs = self.session.run(None, {self.input_name: x.detach().float().cpu().contiguous().numpy()})
        tensors = tuple(torch.from_numpy(o) for o in outputs)
        return tensors[0] if len(tensors) == 1 else tensors
