"""Static int8 post-training quantisation of an exported model with onnxruntime.quantization.

`quantize_int8(fp32, out, calibration)`: ONNX Runtime's pre-processing (symbolic shape inference and
graph optimisation), then QDQ quantisation (QuantizeLinear / DequantizeLinear around every quantised
op: int8 weights, uint8 activations), calibrated on the given batches with MinMax, Entropy or
Percentile ranges, per tensor or (`per_channel`) per output channel of the weights.
`calibration_batches(spec, ...)` draws the images from any `--data` spec.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from leanvision.errors import InvalidArgumentError
from leanvision.export.onnx import INPUT_NAME

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


class _Batches:
    """onnxruntime's CalibrationDataReader over numpy batches."""

    def __init__(self, batches: Iterable[np.ndarray]) -> None:
        self.batches: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(
    fp32: str | Path,
    out: str | Path,
    calibration: Iterable[np.ndarray],
    method: str = "minmax",
    per_channel: bool = False,
) -> Path:
    """Write the QDQ int8 model of the ONNX file `fp32` to `out`, calibrated on `calibration` (float32
    batches [B, C, H, W] as the model takes them)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in methods:
        raise InvalidArgumentError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime.quantization warns on the root logger, once per node
    try:
        with tempfile.TemporaryDirectory() as folder:
            prepared = Path(folder) / "prepared.onnx"
            # ORT's symbolic shape inference fails on the dynamic batch's Splits; onnx's own suffices
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            with contextlib.redirect_stdout(io.StringIO()):  # the entropy calibrator prints its bins
                quantize_static(
                    str(prepared), str(out), _Batches(calibration), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
                    calibrate_method=methods[method],
                )  # fmt: skip
    finally:
        root.setLevel(level)
    return Path(out)


def calibration_batches(
    spec: str,
    input_size: tuple[int, int, int],
    images: int = 256,
    batch_size: int = 32,
    detector: bool = False,
    strict: bool = False,
) -> list[np.ndarray]:
    """The first `images` training images of data spec `spec` as the model takes them ([C, H, W] of
    `input_size`), in batches: a classifier's normalised dataset images, or a detector's 0-1 images
    (a detection spec) resized to its input. A channel count other than the model's raises."""
    channels, height, width = input_size
    if detector:
        from leanvision.detection.data import build_detection_data

        data = build_detection_data(spec, channels, strict=strict)
        split = data.val  # whole images (the training split gives augmented crops)
        take = [split[i][0] for i in range(min(images, len(split)))]
        resize = torch.nn.functional.interpolate
        pixels = [resize(im[None], size=(height, width), mode="bilinear", antialias=True)[0] for im in take]
    else:
        from leanvision.engine.data import build_dataset

        if height != width:
            raise InvalidArgumentError(f"classifier calibration images are square, got {height}x{width}")
        data = build_dataset(spec, height, strict=strict)
        if data.channels != channels:
            raise InvalidArgumentError(
                f"calibration data {spec!r} has {data.channels}-channel images, the model takes {channels}"
            )
        pixels = [data.train[i][0] for i in range(min(images, len(data.train)))]
    if not pixels:
        raise InvalidArgumentError(f"calibration data {spec!r} has no images")
    stacked = torch.stack(pixels).float().numpy()
    return [stacked[i : i + batch_size] for i in range(0, len(stacked), batch_size)]


def weight_bytes(path: str | Path) -> int:
    """Bytes of the initializers (weights, biases, quantisation scales) of an ONNX file."""
    import onnx
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)
