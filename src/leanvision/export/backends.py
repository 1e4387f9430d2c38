"""Inference backends of one model, timed side by side on the same input (`leanvision bench --backend`).

- eager: the model as built, eval mode, under torch.inference_mode;
- deploy: `leanvision.deploy.fuse_for_inference` (BN folded, channels_last weights, small 1x1 convs as GEMMs);
- compile: torch.compile of the deploy model, inductor with freezing (weights folded into the graph as
  constants and prepacked for oneDNN); compiled during preparation;
- aot: the deploy model compiled ahead of time by AOTInductor (`deploy.aot_compile`: the same inductor
  code, with freezing, run without TorchDynamo's per-call guards) for the benchmark's input shape;
- ort / ort-int8: the model exported by `to_onnx` (int8: QDQ, `quantize_int8`) and run by ONNX Runtime's
  CPU provider, intra-op spinning off, as many threads as PyTorch;
- best: leanvision's fastest PyTorch path for this model: deploy, compile and aot are timed for a few
  interleaved rounds after their warm-up and the fastest runs (one that fails to compile drops out);
  its row names the path picked and, when that path is timed too, repeats its timings (one callable is
  timed once).

A detector is timed on its raw outputs (normalisation and heads, as it exports; `HeadOutputs`): decoding
and NMS are the same Python code whichever backend computed them. Every backend gets the same NCHW
float32 batch. Times are per call of the whole batch, over interleaved rounds (`bench.interleaved_ms`).
"""

from __future__ import annotations

import copy
import functools
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leanvision.bench import interleaved_ms, percentiles
from leanvision.errors import InvalidArgumentError, first_line
from leanvision.export.onnx import INPUT_NAME, exportable, ort_session, to_onnx

BACKENDS = ("eager", "deploy", "compile", "aot", "ort", "ort-int8", "best")
PYTORCH_PATHS = ("deploy", "compile", "aot")  # the candidates of "best"
WARMUP_CALLS = 3
PICK_ROUNDS = 10  # interleaved rounds that decide "best", after one more warm-up round


@dataclass
class Prepared:
    """One backend, ready to run the benchmark input: `call()` computes the outputs."""

    backend: str
    call: Callable[[], object]
    prepare_s: float
    detail: str = ""  # best: the path picked (and why); int8: the calibration


def check_backends(backends: Sequence[str]) -> list[str]:
    """The requested backends in order, once each; an unknown one raises, naming the known ones."""
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        got = ", ".join(map(repr, unknown)) if unknown else "none"
        raise InvalidArgumentError(f"backend must be one of {', '.join(BACKENDS)}; got {got}")
    return list(dict.fromkeys(backends))


def _torch_call(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def call() -> object:
        with torch.inference_mode():
            return module(x)

    return call


def _compiled(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """torch.compile with inductor freezing of `module`, compiled now (on `x`)."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(module)
    call = _torch_call(compiled, x)
    with inductor_config.patch(freezing=True):
        try:
            call()
        except Exception as err:  # inductor's errors have no common base class
            raise InvalidArgumentError(f"torch.compile failed: {first_line(err)}") from err
    return call


def _ort_call(path: Path, x: torch.Tensor) -> Callable[[], object]:
    session = ort_session(path, threads=torch.get_num_threads())
    feed = {INPUT_NAME: x.numpy()}
    return lambda: session.run(None, feed)


class PreparedBackends:
    """Builds each backend once for one model and input: deploy, compile and aot share one deploy copy,
    ort and ort-int8 one export (files in `folder`), best reuses the paths it picks from."""

    def __init__(self, model: nn.Module, x: torch.Tensor, folder: Path, calibration: list[np.ndarray]):
        self.module = exportable(copy.deepcopy(model).eval())[0]
        self.model, self.x, self.folder, self.calibration = model, x, folder, calibration
        self.ready: dict[str, Prepared] = {}

    def get(self, backend: str) -> Prepared:
        """The prepared `backend`, built and warmed up on first use."""
        if backend not in self.ready:
            start = time.perf_counter()
            call, detail = getattr(self, "_" + backend.replace("-", "_"))()
            for _ in range(WARMUP_CALLS):
                call()
            self.ready[backend] = Prepared(backend, call, time.perf_counter() - start, detail)
        return self.ready[backend]

    @functools.cached_property
    def deploy_module(self) -> nn.Module:
        from leanvision.deploy import fuse_for_inference

        return fuse_for_inference(self.module)

    def onnx_file(self, int8: bool = False) -> Path:
        """The model's ONNX file (int8: its QDQ model, calibrated on `calibration`), written on first use."""
        fp32, quantized = self.folder / "fp32.onnx", self.folder / "int8.onnx"
        if not fp32.exists():
            to_onnx(self.model, fp32, tuple(self.x.shape[1:]))
        if int8 and not quantized.exists():
            from leanvision.export.int8 import quantize_int8

            quantize_int8(fp32, quantized, self.calibration)
        return quantized if int8 else fp32

    def _eager(self) -> tuple[Callable[[], object], str]:
        return _torch_call(self.module, self.x), ""

    def _deploy(self) -> tuple[Callable[[], object], str]:
        return _torch_call(self.deploy_module, self.x), ""

    def _compile(self) -> tuple[Callable[[], object], str]:
        return _compiled(self.deploy_module, self.x), "inductor, freezing"

    def _aot(self) -> tuple[Callable[[], object], str]:
        from leanvision.deploy import aot_compile

        return _torch_call(aot_compile(self.deploy_module, self.x), self.x), "AOTInductor, freezing"

    def _ort(self) -> tuple[Callable[[], object], str]:
        return _ort_call(self.onnx_file(), self.x), ""

    def _ort_int8(self) -> tuple[Callable[[], object], str]:
        images = sum(len(b) for b in self.calibration)
        return _ort_call(
            self.onnx_file(int8=True), self.x
        ), f"QDQ minmax per tensor, calibrated on {images} images"

    def _best(self) -> tuple[Callable[[], object], str]:
        candidates, failed = {}, ""
        for path in PYTORCH_PATHS:
            try:
                candidates[path] = self.get(path).call
            except InvalidArgumentError as err:
                failed += f"; {path}: {err}"
        interleaved_ms(candidates, 1, 0.0)  # every candidate warm, one after another, as in the timing
        times = interleaved_ms(candidates, PICK_ROUNDS, 0.0)
        picked = min(candidates, key=lambda name: statistics.median(times[name]))
        return candidates[picked], picked + failed


def check_timing(threads: int | None, min_rounds: int, min_seconds: float) -> None:
    """Raise an InvalidArgumentError unless the loop of `time_models` can run with these settings."""
    if min_rounds < 1 or not 0 <= min_seconds < math.inf or (threads is not None and threads < 1):
        raise InvalidArgumentError(
            f"need min_rounds >= 1, finite min_seconds >= 0 and threads >= 1 (or None: PyTorch's default), "
            f"got {min_rounds}, {min_seconds}, {threads}"
        )


def time_models(
    models: dict[str, nn.Module],
    backends: Sequence[str],
    input_size: tuple[int, int, int] | dict[str, tuple[int, int, int]],
    batch_size: int = 1,
    threads: int | None = None,
    min_rounds: int = 10,
    min_seconds: float = 2.0,
    calibration: list[np.ndarray] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Rows {backend, median_ms, p10_ms, p90_ms, images_per_s, calls, prepare_s, detail, ...} per model and
    backend: each model on one random 0-1 batch [batch_size, *input_size] (one size, or one per model), and
    every (model, backend) pair timed in one interleaved loop of at least `min_rounds` rounds and
    `min_seconds` seconds, so a slow spell of a noisy machine hits all alike; `threads` threads (default:
    PyTorch's). ort-int8 is calibrated on `calibration` batches (default: the timed batch itself: the same
    speed as real images; its accuracy needs real ones, see `export_model`). `on_step` hears each step."""
    backends = check_backends(backends)
    sizes = input_size if isinstance(input_size, dict) else dict.fromkeys(models, input_size)
    bad = {name: size for name, size in sizes.items() if len(size) != 3 or min(size) < 1}
    if batch_size < 1 or bad:
        raise InvalidArgumentError(
            f"need batch_size >= 1 and input sizes (C, H, W) positive, got {batch_size} and {bad or sizes}"
        )
    check_timing(threads, min_rounds, min_seconds)
    report = on_step or (lambda step: None)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as folder:
            prepared: dict[tuple[str, str], Prepared] = {}
            for name, model in models.items():
                x = torch.rand(batch_size, *sizes[name], generator=torch.Generator().manual_seed(0))
                (Path(folder) / name).mkdir()
                ready = PreparedBackends(model, x, Path(folder) / name, calibration or [x.numpy()])
                for backend in backends:
                    report(f"preparing {name}: {backend}")
                    prepared[name, backend] = ready.get(backend)
            first = {}  # each distinct call once: best's is its pick's
            for key, p in prepared.items():
                first.setdefault(id(p.call), key)
            report(f"timing {len(first)} candidates in interleaved rounds")
            times = interleaved_ms(
                {key: prepared[key].call for key in first.values()}, min_rounds, min_seconds
            )
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
    for (name, backend), p in prepared.items():
        timed = times[first[id(p.call)]]
        p10, median, p90 = percentiles(timed)
        rows[name].append(
            dict(
                backend=backend, median_ms=median, p10_ms=p10, p90_ms=p90,
                images_per_s=batch_size * 1e3 / median, calls=len(timed),
                prepare_s=round(p.prepare_s, 2), detail=p.detail, batch_size=batch_size,
                input_size=list(sizes[name]), threads=used,
            )
        )  # fmt: skip
    return rows


def time_backends(
    model: nn.Module,
    backends: Sequence[str],
    input_size: tuple[int, int, int],
    batch_size: int = 1,
    threads: int | None = None,
    min_rounds: int = 10,
    min_seconds: float = 2.0,
    calibration: list[np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """`time_models` of one model: its row per backend."""
    rows = time_models({"model": model}, backends, input_size, batch_size, threads, min_rounds, min_seconds,
                       calibration)  # fmt: skip
    return rows["model"]
