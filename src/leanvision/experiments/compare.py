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
    min_rounds: int = 10,
    backends: Sequence[str] = ("eager",),
    on_model: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per model: params, MACs at its default input size, latency and the paper's numbers.

    Models get random weights with calibrated BN statistics (see `calibrate_batchnorm`). Every model on
    every backend is timed in one interleaved loop (`export.backends.time_models`): `latency_ms` is the
    first backend's median, `backends` maps each backend to its row.
    """
    from leanvision.analysis.cost import profile
    from leanvision.bench import calibrate_batchnorm
    from leanvision.export.backends import check_backends, check_timing, time_models
    from leanvision.models.registry import create_model, get_model_config

    backends = check_backends(backends)
    check_timing(threads, min_rounds, min_seconds)  # before the models are built
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
    timed = time_models(
        models, backends, sizes, batch_size, threads, min_rounds, min_seconds, on_step=on_model
    )
    for row in rows:
        row["backends"] = {r["backend"]: r for r in timed[row["model"]]}
        row["latency_ms"] = row["backends"][backends[0]]["median_ms"]
    return rows
