"""The main job (`leanvision demo`, `make demo`): a design study on data that needs no download.

Three networks scaled to small inputs (stride-1 stem, total stride 16) are trained on the same data with the
same recipe and budget: a MobileNetV2 baseline, a ReXNet, and the ReXNet whose high-resolution stages are
replaced by one RNNPool. Each is then measured: test accuracy, parameters, MACs, peak activation RAM (layer
convention, RNNPool paper Appendix E.2: batch 1, fp32), the measured peak RAM (the bytes of tensors alive
during one batch-1 fp32 forward, `measure_peak`: of the streamed model, `stream`, for a network with an
RNNPoolLayer, of the eager model for the others) and batch-1 CPU latency. The report folder gets the
table (JSON and Markdown), the plots accuracy-vs-MACs and accuracy-vs-peak-RAM, and each run's training
folder (metrics.csv, curves.png, last.pt).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leanvision.errors import InvalidArgumentError

DEMO_MODELS = ("mobilenetv2_100_lowres", "rexnet_100_lowres", "rexnet_100_lowres_rnnpool")
DEMO_DATA = "synthetic:lines,train=4000,val=1000"


@dataclass(frozen=True)
class DemoConfig:
    """What the demo trains, and how."""

    data: str = DEMO_DATA
    models: tuple[str, ...] = DEMO_MODELS
    epochs: int = 3
    img_size: int | None = 32
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    out: str = "runs/demo"
    latency_seconds: float = 2.0  # timed seconds per model

    def check(self) -> None:
        """Raise an InvalidArgumentError naming the first bad setting (before anything trains)."""
        if self.epochs < 1 or not self.models:
            raise InvalidArgumentError(
                f"need epochs >= 1 and at least one model, got {self.epochs} and {self.models}"
            )
        if not self.latency_seconds > 0 or not self.lr > 0 or self.batch_size < 1:
            raise InvalidArgumentError(
                f"need latency_seconds > 0, lr > 0 and batch_size >= 1; got {self.latency_seconds}, "
                f"{self.lr} and {self.batch_size}"
            )
        if self.img_size is not None and self.img_size < 16:
            raise InvalidArgumentError(f"img_size must be >= 16, got {self.img_size}")

    def plan(self) -> str:
        """One paragraph saying what the demo is about to do."""
        return (
            f"leanvision demo: train {len(self.models)} networks ({', '.join(self.models)}) on {self.data} "
            f"at {self.img_size or 'native'} px for {self.epochs} epochs each (AdamW lr {self.lr:g}, cosine, "
            f"batch {self.batch_size}, seed {self.seed}); then measure test accuracy, parameters, MACs, "
            f"peak RAM (layer convention, batch 1, fp32), measured peak RAM (streamed for RNNPool networks) "
            f"and batch-1 CPU latency, and write the table and the plots accuracy-vs-MACs and "
            f"accuracy-vs-peak-RAM to {self.out}/."
        )


def run_demo(config: DemoConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train and measure every model of `config`; one row per model, also written to `config.out`."""
    from leanvision.analysis.cost import profile
    from leanvision.analysis.memory import peak_memory
    from leanvision.engine.data import build_dataset
    from leanvision.engine.train import TrainConfig, train
    from leanvision.engine.train_state import empty_output_dir
    from leanvision.export.backends import time_models
    from leanvision.models.registry import get_model_config

    config.check()
    for name in config.models:
        get_model_config(name)  # an unknown name fails now, not after the others have trained
    out = empty_output_dir(config.out)
    data = build_dataset(config.data, config.img_size)
    input_size = (data.channels, data.image_size, data.image_size)
    rows, trained = [], {}
    for name in config.models:
        log(f"training {name} ...")
        tic = time.perf_counter()
        result = train(
            TrainConfig(
                name, config.data, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                opt="adamw", wd=0.05, img_size=config.img_size, seed=config.seed, out=str(out / name),
                progress=False,
            ),
            data=data,
            on_epoch_end=lambda row, name=name: log(
                f"  {name} epoch {row['epoch']}/{config.epochs}: val acc {row['val_acc']:.2f}% "
                f"({row['time_s']:.0f} s)"
            ),
        )  # fmt: skip
        result.raise_if_interrupted()  # an interrupted model has no place beside the trained ones
        trained[name] = result.model.eval()
        cost = profile(result.model, input_size=input_size)
        rows.append(
            dict(
                model=name,
                acc=result.val["acc"],
                params=cost.params,
                macs=cost.macs,
                peak_ram_bytes=peak_memory(result.model, input_size).peak_bytes,
                **measured_peaks(result.model, input_size),
                train_s=round(time.perf_counter() - tic, 1),
            )
        )
        log(f"{name}: {result.val['acc']:.2f}% test accuracy ({rows[-1]['train_s']:.0f} s)")
    log("timing batch-1 CPU latency ...")
    latency = time_models(trained, ["eager"], input_size, min_seconds=config.latency_seconds)
    for row in rows:
        row["latency_ms"] = latency[row["model"]][0]["median_ms"]
    write_report(rows, config, data.spec, input_size, out)
    return rows


MEASURED_NOTE = (
    "measured peak RAM: bytes of the tensors alive during one batch-1 fp32 forward (leanvision.measure_peak; "
    "input and weights not counted), of the streamed model (leanvision.stream) for a network with an "
    "RNNPoolLayer, of the eager model for the others"
)


def measured_peaks(model: Any, input_size: tuple[int, int, int]) -> dict[str, Any]:
    """The measured peaks of one batch-1 forward of eval-mode `model`: measured_eager_bytes, and for a
    network with an RNNPoolLayer measured_streamed_bytes; measured_peak_bytes is the streamed one where
    there is one (measured_peak_of says which). One measured forward each: cheap at the demo's sizes."""
    import torch

    from leanvision.analysis.measured import measure_peak
    from leanvision.deploy.streaming import stream
    from leanvision.layers import RNNPoolLayer

    model.eval()
    x = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        row = dict(measured_eager_bytes=measure_peak(model, x).peak_bytes)
        if any(isinstance(m, RNNPoolLayer) for m in model.modules()):
            row["measured_streamed_bytes"] = measure_peak(stream(model, input_size), x).peak_bytes
    kind = "streamed" if "measured_streamed_bytes" in row else "eager"
    return dict(row, measured_peak_bytes=row[f"measured_{kind}_bytes"], measured_peak_of=kind)


def measured_cell(row: dict[str, Any]) -> str:
    """'12.3 KiB (streamed)': the measured peak and whose it is."""
    return f"{row['measured_peak_bytes'] / 1024:.1f} KiB ({row['measured_peak_of']})"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The demo's table as Markdown, and the note on the measured column."""
    lines = [
        "| model | test acc | params | MACs | peak RAM | measured peak RAM | latency (b=1) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['acc']:.2f}% | {r['params'] / 1e6:.2f}M | {r['macs'] / 1e6:.1f}M | "
            f"{r['peak_ram_bytes'] / 1024:.1f} KiB | {measured_cell(r)} | {r['latency_ms']:.2f} ms |"
        )
    return (
        "\n".join(lines) + "\n\npeak RAM: layer convention (RNNPool Appendix E.2); " + MEASURED_NOTE + ".\n"
    )


def write_report(
    rows: Sequence[dict[str, Any]], config: DemoConfig, spec: str, input_size: tuple[int, ...], out: Path
) -> None:
    """results.json, table.md, accuracy_vs_macs.png and accuracy_vs_peak_ram.png in the existing `out`."""
    from leanvision.plotting import new_figure, save_figure

    report = dict(
        data=spec, input_size=list(input_size), epochs=config.epochs, seed=config.seed, rows=list(rows)
    )
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "table.md").write_text(
        f"Data: {spec} at {input_size[1]}x{input_size[2]}\n\n" + markdown_table(rows)
    )
    for key, scale, label, filename in (
        ("macs", 1e6, "MACs (millions)", "accuracy_vs_macs.png"),
        ("peak_ram_bytes", 1024, "peak RAM, layer convention (KiB)", "accuracy_vs_peak_ram.png"),
    ):
        fig, ax = new_figure(figsize=(6, 4))
        for r in rows:
            ax.scatter(r[key] / scale, r["acc"], s=40)
            ax.annotate(
                r["model"], (r[key] / scale, r["acc"]), fontsize=8, xytext=(4, 4), textcoords="offset points"
            )
        ax.margins(x=0.3, y=0.15)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{spec}, {config.epochs} epochs")
        ax.grid(alpha=0.3)
        save_figure(fig, out / filename, dpi=100)
