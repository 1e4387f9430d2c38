"""Side-by-side comparison of models: measured params, MACs and CPU latency next to the papers' numbers."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from leanvision.errors import InvalidArgumentError

# ReXNet paper Table 5 widths, with the MobileNetV2 baselines the paper compares against.
TABLE5_MODELS = (
    "mobilenetv2_100",
    "mobilenetv2_140",
    "rexnet_090",
    "rexnet_100",
    "rexnet_130",
    "rexnet_150",
    "rexnet_200",
)


def interleaved_latency_ms(
    models: dict[str, nn.Module],
    input_size: tuple[int, int, int] | dict[str, tuple[int, int, int]],
    batch_size: int = 1,
    threads: int | None = None,
    min_seconds: float = 1.0,
    rounds: int = 3,
    on_model: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Median CPU latency (ms) of each model, timed in `rounds` interleaved rounds of
    `min_seconds / rounds` per model, so a slow spell of a noisy machine hits every model alike; the
    result is the median of the round medians. `input_size` is one size or one per model."""
    from leanvision.bench import benchmark

    if rounds < 1:
        raise InvalidArgumentError(f"rounds must be >= 1, got {rounds}")
    sizes = input_size if isinstance(input_size, dict) else dict.fromkeys(models, input_size)
    round_ms: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds):
        for name, model in models.items():
            if on_model is not None:
                on_model(f"timing {name} (round {r + 1}/{rounds})")
            result = benchmark(
                model,
                batch_size=batch_size,
                input_size=sizes[name],
                threads=threads,
                warmup=3,
                min_iters=5,
                min_seconds=min_seconds / rounds,
            )
            round_ms[name].append(result.median_ms)
    return {name: statistics.median(times) for name, times in round_ms.items()}


def compare(
    names: Sequence[str] = TABLE5_MODELS,
    batch_size: int = 1,
    threads: int | None = None,
    min_seconds: float = 1.0,
    rounds: int = 3,
    on_model: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per model: params, MACs at its default input size, latency and the paper's numbers.

    Models get random weights with calibrated BN statistics (see `calibrate_batchnorm`); latency is
    `interleaved_latency_ms`.
    """
    from leanvision.analysis.cost import profile
    from leanvision.bench import calibrate_batchnorm
    from leanvision.models.registry import create_model, get_model_config

    configs = {name: get_model_config(name) for name in names}
    models, rows = {}, []
    for name, config in configs.items():
        if on_model is not None:
            on_model(f"building {name}")
        models[name] = calibrate_batchnorm(create_model(name), config.input_size)
        cost = profile(models[name], input_size=config.input_size)
        rows.append(
            dict(
                model=name,
                params=cost.params,
                macs=cost.macs,
                batch_size=batch_size,
                paper_top1=config.paper.get("top1"),
                paper_params_m=config.paper.get("params_m"),
                paper_flops_b=config.paper.get("flops_b"),
            )
        )
    sizes = {name: config.input_size for name, config in configs.items()}
    latency = interleaved_latency_ms(models, sizes, batch_size, threads, min_seconds, rounds, on_model)
    for row in rows:
        row["latency_ms"] = latency[row["model"]]
    return rows
