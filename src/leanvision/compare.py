"""Side-by-side comparison of models: measured params, MACs and CPU latency next to the papers' numbers."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

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


def compare(
    names: Sequence[str] = TABLE5_MODELS,
    batch_size: int = 1,
    threads: int | None = None,
    min_seconds: float = 1.0,
    rounds: int = 3,
    on_model: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per model: params, MACs at its default input size, latency and the paper's numbers.

    Models get random weights with calibrated BN statistics (see `calibrate_batchnorm`). Latency is timed
    in `rounds` interleaved rounds of `min_seconds / rounds` per model, so a slow spell of a noisy machine
    hits every model alike; `latency_ms` is the median of the round medians.
    """
    from leanvision.analysis.cost import profile
    from leanvision.bench import benchmark, calibrate_batchnorm
    from leanvision.registry import create_model, get_model_config

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    configs = [get_model_config(name) for name in names]
    models, rows = {}, []
    for config in configs:
        if on_model is not None:
            on_model(f"building {config.name}")
        models[config.name] = calibrate_batchnorm(create_model(config.name), config.input_size)
        cost = profile(models[config.name], input_size=config.input_size)
        rows.append(
            dict(
                model=config.name,
                params=cost.params,
                macs=cost.macs,
                batch_size=batch_size,
                latency_rounds_ms=[],
                paper_top1=config.paper.get("top1"),
                paper_params_m=config.paper.get("params_m"),
                paper_flops_b=config.paper.get("flops_b"),
            )
        )
    for r in range(rounds):
        for row, config in zip(rows, configs):
            if on_model is not None:
                on_model(f"timing {config.name} (round {r + 1}/{rounds})")
            result = benchmark(
                models[config.name],
                batch_size=batch_size,
                input_size=config.input_size,
                threads=threads,
                warmup=3,
                min_iters=5,
                min_seconds=min_seconds / rounds,
            )
            row["latency_rounds_ms"].append(result.median_ms)
    for row in rows:
        row["latency_ms"] = statistics.median(row["latency_rounds_ms"])
    return rows
