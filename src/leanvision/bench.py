"""Latency and throughput of a model's forward pass: warm-up, then timed runs, median and spread."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from leanvision.errors import InvalidArgumentError


@dataclass
class BenchResult:
    """One benchmark configuration and its timings (milliseconds per forward pass of a whole batch)."""

    model: str
    batch_size: int
    input_size: tuple[int, int, int]
    threads: int
    channels_last: bool
    compile: bool
    deploy: bool
    iterations: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    images_per_s: float
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(
    fn: Callable[[], Any],
    warmup: int = 10,
    min_iters: int = 20,
    min_seconds: float = 2.0,
    sync: Callable[[], None] | None = None,
) -> list[float]:
    """Call `fn` `warmup` times, then time calls until both `min_iters` and `min_seconds` are reached.

    Returns the per-call times in ms. `sync` (e.g. torch.cuda.synchronize) runs before each clock read, so
    asynchronous devices are timed to completion.
    """
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def interleaved_ms(
    calls: dict[Hashable, Callable[[], object]], min_rounds: int, seconds: float
) -> dict[Hashable, list[float]]:
    """Milliseconds per call of each candidate, over rounds that run every candidate once in a rotating
    order (so a noisy machine's slow spells hit all alike): at least `min_rounds` rounds and `seconds`."""
    names = list(calls)
    times: dict[Hashable, list[float]] = {name: [] for name in names}
    start, rounds = time.perf_counter(), 0
    while rounds < min_rounds or time.perf_counter() - start < seconds:
        for name in names[rounds % len(names) :] + names[: rounds % len(names)]:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return times


def percentiles(times_ms: list[float]) -> tuple[float, float, float]:
    """(p10, median, p90) of a list of times."""
    p10, median, p90 = np.percentile(times_ms, [10, 50, 90])
    return float(p10), float(median), float(p90)


def calibrate_batchnorm(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> nn.Module:
    """Set every BN's running statistics from one train-mode pass over random images; returns it in eval.

    For timing randomly initialised models: activations then have the unit scale of a trained network.
    At default init they shrink to ~1e-7 deep in the net, where denormal floats distort the timings.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.momentum = 1.0  # the running statistics become this batch's
    try:
        with torch.no_grad():  # a detector's raw head outputs: in train mode its forward wants targets
            forward = getattr(model.train(), "head_outputs", model)
            forward(torch.randn(8, *input_size, generator=torch.Generator().manual_seed(0)))
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
    return model.eval()


def _check(
    batch_size: int,
    input_size: tuple[int, ...],
    threads: int | None,
    warmup: int,
    min_iters: int,
    min_seconds: float,
    device: str,
) -> torch.device:
    """Raise a ValueError naming the first bad argument; returns the parsed device."""
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}")
    if threads is not None and threads < 1:
        raise InvalidArgumentError(f"threads must be >= 1 (or None for PyTorch's default), got {threads}")
    if len(input_size) != 3 or min(input_size) < 1:
        raise InvalidArgumentError(
            f"input_size must be (channels, height, width) of positive sizes, got {input_size}"
        )
    if warmup < 0 or min_iters < 1 or not 0 <= min_seconds < math.inf:
        raise InvalidArgumentError(
            f"need warmup >= 0, min_iters >= 1 and finite min_seconds >= 0, got {warmup}, {min_iters}, "
            f"{min_seconds}"
        )
    return check_device(device)


def check_device(device: str) -> torch.device:
    """The torch.device of 'cpu', 'cuda' or 'cuda:N'; anything else, or CUDA without a GPU, raises an
    InvalidArgumentError."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise InvalidArgumentError(
            f"device must be 'cpu' or 'cuda' (optionally 'cuda:<index>'), got {device!r}"
        )
    if kind == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device {device!r} was asked for but torch.cuda.is_available() is False")
    return torch.device(device)


def benchmark(
    model_or_name: nn.Module | str,
    batch_size: int = 1,
    input_size: tuple[int, int, int] = (3, 224, 224),
    threads: int | None = None,
    channels_last: bool = False,
    compile: bool = False,
    deploy: bool = False,
    warmup: int = 10,
    min_iters: int = 20,
    min_seconds: float = 2.0,
    device: str = "cpu",
    **model_kwargs: Any,
) -> BenchResult:
    """Time eval-mode forward passes of one fixed random batch under torch.inference_mode.

    A name is built with `leanvision.models.registry.create_model(name, **model_kwargs)`; without `pretrained`
    weights its BN statistics are calibrated on random images first (see `calibrate_batchnorm`, which
    keeps denormal floats out of the timings). A module is timed as it is and copied, so
    the caller's model keeps its mode, layout and device. `deploy=True` runs
    `leanvision.deploy.fuse_for_inference` (BN folded, channels_last); `channels_last=True` alone only
    changes the layout. The result's `channels_last` tells whether the input and weights were NHWC.
    `compile=True` wraps the model in torch.compile; compilation happens during warm-up (at least one
    call). `threads` sets torch.set_num_threads for this run only. On "cuda" each call is synchronised.
    """
    dev = _check(batch_size, tuple(input_size), threads, warmup, min_iters, min_seconds, device)
    if isinstance(model_or_name, str):
        from leanvision.models.registry import create_model

        name, model = model_or_name, create_model(model_or_name, **model_kwargs)
        if model_kwargs.get("pretrained") is None:
            calibrate_batchnorm(model, tuple(input_size))
    else:
        if model_kwargs:
            raise TypeError(f"model keyword arguments {sorted(model_kwargs)} need a model name, not a module")
        model = copy.deepcopy(model_or_name)
        name = getattr(getattr(model, "default_cfg", None), "name", type(model).__name__)
    model = model.eval().to(dev)
    channels_last = channels_last or deploy
    if deploy:
        from leanvision.deploy import fuse_for_inference

        model = fuse_for_inference(model, channels_last=True)
    elif channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch_size, *input_size, generator=torch.Generator().manual_seed(0)).to(dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model) if compile else model
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        used_threads = torch.get_num_threads()
        with torch.inference_mode():
            times = measure(
                lambda: forward(x), max(warmup, 1) if compile else warmup, min_iters, min_seconds, sync
            )
    finally:
        torch.set_num_threads(previous_threads)
    p10, median, p90 = percentiles(times)
    return BenchResult(
        model=name,
        batch_size=batch_size,
        input_size=tuple(input_size),
        threads=used_threads,
        channels_last=channels_last,
        compile=compile,
        deploy=deploy,
        iterations=len(times),
        median_ms=median,
        p10_ms=p10,
        p90_ms=p90,
        images_per_s=batch_size * 1e3 / median,
        device=dev.type,
    )
