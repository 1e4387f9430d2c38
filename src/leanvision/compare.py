"""Side-by-side comparison of models: measured params, MACs and CPU latency next to the papers' numbers."""

from __future__ import annotations

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
    on_model: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per model: params, MACs at its default input size, latency (median, ms) and paper numbers."""
    from leanvision.analysis.cost import profile
    from leanvision.bench import benchmark
    from leanvision.registry import create_model, get_model_config

    rows = []
    for name in names:
        if on_model is not None:
            on_model(name)
        config = get_model_config(name)
        model = create_model(name)
        cost = profile(model, input_size=config.input_size)
        speed = benchmark(
            model,
            batch_size=batch_size,
            input_size=config.input_size,
            threads=threads,
            min_seconds=min_seconds,
        )
        rows.append(
            dict(
                model=name,
                params=cost.params,
                macs=cost.macs,
                latency_ms=speed.median_ms,
                latency_p10_ms=speed.p10_ms,
                latency_p90_ms=speed.p90_ms,
                batch_size=batch_size,
                paper_top1=config.paper.get("top1"),
                paper_params_m=config.paper.get("params_m"),
                paper_flops_b=config.paper.get("flops_b"),
            )
        )
    return rows
