"""Deployment files: ONNX export checked against ONNX Runtime, static int8 quantisation, and evaluation of
the exported files (`leanvision export`, `leanvision eval --backend ort|ort-int8`).

This layer sits above the engine and the detection package: int8 calibration and ORT evaluation read
`--data` specs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from leanvision.errors import InvalidArgumentError
from leanvision.export.int8 import CALIBRATION_METHODS, calibration_batches, quantize_int8, weight_bytes
from leanvision.export.onnx import INPUT_NAME, ExportReport, OrtModule, ort_session, to_onnx

__all__ = [
    "CALIBRATION_METHODS",
    "EVAL_BACKENDS",
    "ExportReport",
    "OrtModule",
    "calibration_batches",
    "evaluate_exported",
    "export_model",
    "ort_session",
    "quantize_int8",
    "to_onnx",
    "weight_bytes",
]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def export_model(
    model: Any,
    out: str | Path,
    input_size: tuple[int, int, int],
    int8: bool = False,
    calib: str | None = None,
    calib_images: int = 256,
    per_channel: bool = False,
    method: str = "minmax",
    strict: bool = False,
) -> dict[str, Any]:
    """Export `model` to `out` (fp32), or with `int8` its QDQ int8 model calibrated on the data spec
    `calib`; returns the summary `leanvision export` prints: file and weight bytes, the check against
    PyTorch, and for int8 the activation peak under the memory analysis at 1 byte per element and the
    cosine similarity of int8 and fp32 outputs on the calibration images."""
    from leanvision.analysis.memory import peak_memory

    if int8 and calib is None:
        raise InvalidArgumentError("--int8 needs calibration data: --calib DATA_SPEC")
    out = Path(out)
    detector = hasattr(model, "head_outputs")
    batches = (
        calibration_batches(calib, input_size, calib_images, detector=detector, strict=strict) if int8 else []
    )
    with tempfile.TemporaryDirectory() as folder:
        fp32_path = Path(folder) / "fp32.onnx" if int8 else out
        report = to_onnx(model, fp32_path, input_size)
        summary: dict[str, Any] = {
            "input_size": list(input_size),
            "outputs": report.outputs,
            "fp32_max_abs_diff_vs_torch": report.max_abs_diff,
            "fp32_weight_bytes": weight_bytes(fp32_path),
        }
        if not int8:
            return {"path": str(out), "format": "fp32", **summary, "file_bytes": report.file_bytes}
        quantize_int8(fp32_path, out, batches, method, per_channel)
        fp32_session, int8_session = ort_session(fp32_path), ort_session(out)
        sample = batches[0]
        reference = fp32_session.run(None, {INPUT_NAME: sample})
        quantized = int8_session.run(None, {INPUT_NAME: sample})
    peak = peak_memory(model, input_size, "layer", dtype_bytes=1).peak_bytes
    return {
        "path": str(out),
        "format": f"int8 QDQ ({method}, {'per channel' if per_channel else 'per tensor'})",
        **summary,
        "file_bytes": out.stat().st_size,
        "int8_weight_bytes": weight_bytes(out),
        "int8_activation_peak_bytes": peak,
        "calibration": {"spec": calib, "images": sum(len(b) for b in batches)},
        "cosine_int8_vs_fp32": min(cosine(a, b) for a, b in zip(quantized, reference) if a.size > 16),
    }


EVAL_BACKENDS = ("eager", "ort", "ort-int8")  # `eval --backend`; timing: export.backends


def evaluate_exported(
    model_name: str,
    checkpoint: str | Path,
    data_spec: str,
    backend: str,
    img_size: int | None = None,
    batch_size: int = 256,
    calib: str | None = None,
    calib_images: int = 256,
    strict: bool = False,
    method: str = "minmax",
    per_channel: bool = False,
) -> dict[str, Any]:
    """`leanvision eval --backend ort|ort-int8`: the checkpoint exported (int8: calibrated on `calib`,
    default the evaluated spec's training images, with `method` ranges, per tensor or `per_channel`) and
    evaluated with ONNX Runtime on the validation split, loss and accuracy as the eager evaluation
    computes them."""
    from leanvision.engine.train import evaluate, load_model_for_data

    if backend not in EVAL_BACKENDS[1:]:
        raise InvalidArgumentError(f"backend must be one of {EVAL_BACKENDS}, got {backend!r}")
    model, data = load_model_for_data(model_name, checkpoint, data_spec, img_size, strict)
    size = (data.channels, data.image_size, data.image_size)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        int8 = backend == "ort-int8"
        export_model(model, path, size, int8, calib or data_spec, calib_images, per_channel, method, strict)
        metrics = evaluate(OrtModule(path), data.val, data.multilabel, batch_size, "cpu")
    return {**metrics, "backend": backend}
