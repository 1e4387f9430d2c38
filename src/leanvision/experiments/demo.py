"""The main job (`leanvision demo`, `make demo`): a design study that needs no download.

Three networks scaled to small inputs (stride-1 stem, total stride 16) are trained on the same data with the
same recipe and budget, once per seed: a MobileNetV2 baseline, a ReXNet, and the ReXNet whose
high-resolution stages are replaced by one RNNPool. The data is a part of Fashion-MNIST where the Debian
package is installed (`make data`), else a generated task (DEMO_FALLBACK, named in the plan). Each network
is then measured: test accuracy per seed (mean and spread), parameters, MACs, peak activation RAM (layer
convention, RNNPool paper Appendix E.2: batch 1, fp32), the measured peak RAM (the bytes of tensors alive
during one batch-1 fp32 forward, `measure_peak`: of the streamed model, `stream`, for a network with an
RNNPoolLayer, of the eager model for the others) and batch-1 CPU latency, eager PyTorch and ONNX Runtime
int8. The report folder gets the table (JSON and Markdown, with which pairs of networks the seeds tell
apart), the plots accuracy-vs-MACs and accuracy-vs-peak-RAM, and each run's training folder (metrics.csv,
curves.png, last.pt).
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
DEMO_DATA = "fashion-mnist,train=8000,val=2000"
DEMO_FALLBACK = "synthetic:multilines,train=8000,val=2000"  # where Fashion-MNIST is not installed
CALIBRATION_IMAGES = 64  # training images that calibrate the int8 model's ranges


def default_data() -> str:
    """DEMO_DATA where Fashion-MNIST is installed (`make data`), else the generated DEMO_FALLBACK."""
    from leanvision.engine.data import fashion_mnist_installed

    return DEMO_DATA if fashion_mnist_installed() else DEMO_FALLBACK


@dataclass(frozen=True)
class DemoConfig:
    """What the demo trains, and how. `data` None: `default_data()`."""

    data: str | None = None
    models: tuple[str, ...] = DEMO_MODELS
    epochs: int = 2
    img_size: int | None = 28
    batch_size: int = 64
    lr: float = 2e-3
    seeds: tuple[int, ...] = (0, 1)
    out: str = "runs/demo"
    latency_seconds: float = 2.0  # timed seconds per model

    def data_spec(self) -> str:
        """The data spec the demo trains on: `data`, or `default_data()`."""
        return self.data or default_data()

    def check(self) -> None:
        """Raise a LeanvisionError naming the first bad setting, model name or data spec kind (before
        anything is printed or trained)."""
        from leanvision.engine.data import spec_kind
        from leanvision.models.registry import get_model_config

        if self.epochs < 1 or not self.models:
            raise InvalidArgumentError(
                f"need epochs >= 1 and at least one model, got {self.epochs} and {self.models}"
            )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise InvalidArgumentError(f"need at least one seed and distinct seeds, got {self.seeds}")
        if not self.latency_seconds > 0 or not self.lr > 0 or self.batch_size < 1:
            raise InvalidArgumentError(
                f"need latency_seconds > 0, lr > 0 and batch_size >= 1; got {self.latency_seconds}, "
                f"{self.lr} and {self.batch_size}"
            )
        if self.img_size is not None and self.img_size < 16:
            raise InvalidArgumentError(f"img_size must be >= 16, got {self.img_size}")
        for name in self.models:
            get_model_config(name)  # an unknown name fails now, not after the others have trained
        spec_kind(self.data_spec())

    def plan(self) -> str:
        """One paragraph saying what the demo is about to do (and why, where it falls back)."""
        from leanvision.engine.data import FASHION_MNIST_DIR

        spec = self.data_spec()
        fallback = (
            f" (generated: Fashion-MNIST is not installed in {FASHION_MNIST_DIR}; `make data` installs it)"
            if self.data is None and spec == DEMO_FALLBACK
            else ""
        )
        seeds = ", ".join(map(str, self.seeds))
        return (
            f"leanvision demo: train {len(self.models)} networks ({', '.join(self.models)}) on {spec}"
            f"{fallback} at {self.img_size or 'native'} px for {self.epochs} epochs each, once per seed "
            f"({seeds}; AdamW lr {self.lr:g}, cosine, batch {self.batch_size}); then measure test accuracy, "
            f"parameters, MACs, peak RAM (layer convention, batch 1, fp32), measured peak RAM (streamed for "
            f"RNNPool networks) and batch-1 CPU latency (eager PyTorch and ONNX Runtime int8), and write the "
            f"table and the plots accuracy-vs-MACs and accuracy-vs-peak-RAM to {self.out}/."
        )


def run_demo(config: DemoConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train every model of `config` once per seed, then measure each (its first seed's network); one row
    per model, also written to `config.out`."""
    import torch

    from leanvision.analysis.cost import profile
    from leanvision.analysis.memory import peak_memory
    from leanvision.engine.data import build_dataset
    from leanvision.engine.train import TrainConfig, train
    from leanvision.engine.train_state import empty_output_dir
    from leanvision.export.backends import time_models

    config.check()
    spec = config.data_spec()
    out = empty_output_dir(config.out)
    data = build_dataset(spec, config.img_size)
    input_size = (data.channels, data.image_size, data.image_size)
    accs: dict[str, list[float]] = {name: [] for name in config.models}
    seconds: dict[str, list[float]] = {name: [] for name in config.models}
    trained = {}
    for seed in config.seeds:  # every model of one seed before the next seed: a full comparison early
        for name in config.models:
            log(f"training {name}, seed {seed} ...")
            tic = time.perf_counter()
            result = train(
                TrainConfig(
                    name, spec, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, opt="adamw",
                    wd=0.05, img_size=config.img_size, seed=seed, out=str(out / name / f"seed{seed}"),
                    progress=False, channels_last=True,
                ),
                data=data,
                on_epoch_end=lambda row, name=name: log(
                    f"  {name} epoch {row['epoch']}/{config.epochs}: val acc {row['val_acc']:.2f}% "
                    f"({row['time_s']:.0f} s)"
                ),
            )  # fmt: skip
            result.raise_if_interrupted()  # an interrupted model has no place beside the trained ones
            accs[name].append(result.val["acc"])
            seconds[name].append(round(time.perf_counter() - tic, 1))
            trained.setdefault(name, result.model.eval())
            log(f"{name}, seed {seed}: {result.val['acc']:.2f}% test accuracy ({seconds[name][-1]:.0f} s)")
    rows = []
    for name, model in trained.items():
        model = model.to(memory_format=torch.contiguous_format)  # measured as built, like the others
        cost = profile(model, input_size=input_size)
        rows.append(
            dict(
                model=name,
                accs=accs[name],
                acc=sum(accs[name]) / len(accs[name]),
                acc_spread=max(accs[name]) - min(accs[name]),
                params=cost.params,
                macs=cost.macs,
                peak_ram_bytes=peak_memory(model, input_size).peak_bytes,
                **measured_peaks(model, input_size),
                train_s=seconds[name],
            )
        )
        trained[name] = model
    log("timing batch-1 CPU latency: eager PyTorch and ONNX Runtime int8 ...")
    calibration = torch.stack([data.train[i][0] for i in range(min(CALIBRATION_IMAGES, len(data.train)))])
    latency = time_models(
        trained, ["eager", "ort-int8"], input_size, min_seconds=config.latency_seconds,
        calibration=[calibration.numpy()],
    )  # fmt: skip
    for row in rows:
        eager, int8 = latency[row["model"]]
        row["latency_ms"], row["int8_latency_ms"] = eager["median_ms"], int8["median_ms"]
    write_report(rows, config, spec, input_size, out)
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


LATENCY_NOTE = (
    "ms: median batch-1 CPU latency, eager PyTorch and ONNX Runtime static int8 (QDQ, calibrated on "
    f"{CALIBRATION_IMAGES} training images; latency only), all models timed in interleaved rounds"
)


def acc_cell(row: dict[str, Any]) -> str:
    """'91.20 ± 0.35% (90.85, 91.55)': mean ± half the range over the seeds, then each seed's accuracy."""
    if len(row["accs"]) == 1:
        return f"{row['acc']:.2f}%"
    return f"{row['acc']:.2f} ± {row['acc_spread'] / 2:.2f}% ({', '.join(f'{a:.2f}' for a in row['accs'])})"


def separation(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per pair of models: the gap of their mean accuracies and whether the seeds tell them apart
    (every seed of one above every seed of the other, i.e. the gap exceeds the seeds' spread)."""
    lines = []
    for i, a in enumerate(rows):
        for b in rows[i + 1 :]:
            high, low = (a, b) if a["acc"] >= b["acc"] else (b, a)
            apart = min(high["accs"]) > max(low["accs"])
            verdict = "apart" if apart else "within seed noise"
            lines.append(
                f"{high['model']} - {low['model']}: {high['acc'] - low['acc']:+.2f} points "
                f"(seed spreads {high['acc_spread']:.2f} and {low['acc_spread']:.2f}): {verdict}"
            )
    return lines


def markdown_table(rows: Sequence[dict[str, Any]], seeds: Sequence[int]) -> str:
    """The demo's table as Markdown, the notes on its columns and the pairs the seeds tell apart."""
    lines = [
        f"| model | test acc (seeds {', '.join(map(str, seeds))}) | params | MACs | peak RAM | "
        "measured peak RAM | ms eager (b=1) | ms int8 ORT (b=1) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {acc_cell(r)} | {r['params'] / 1e6:.2f}M | {r['macs'] / 1e6:.1f}M | "
            f"{r['peak_ram_bytes'] / 1024:.1f} KiB | {measured_cell(r)} | {r['latency_ms']:.2f} | "
            f"{r['int8_latency_ms']:.2f} |"
        )
    notes = (
        "test acc: mean ± half the range over the seeds, then each seed's. peak RAM: layer convention "
        f"(RNNPool Appendix E.2); {MEASURED_NOTE}; {LATENCY_NOTE}."
    )
    pairs = "".join(f"- {line}\n" for line in separation(rows)) if len(seeds) > 1 else ""
    return "\n".join(lines) + "\n\n" + notes + "\n" + (f"\nSeeds:\n\n{pairs}" if pairs else "")


def write_report(
    rows: Sequence[dict[str, Any]], config: DemoConfig, spec: str, input_size: tuple[int, ...], out: Path
) -> None:
    """results.json, table.md, accuracy_vs_macs.png and accuracy_vs_peak_ram.png in the existing `out`."""
    from leanvision.plotting import new_figure, save_figure

    report = dict(
        data=spec,
        input_size=list(input_size),
        epochs=config.epochs,
        seeds=list(config.seeds),
        rows=list(rows),
    )
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "table.md").write_text(
        f"Data: {spec} at {input_size[1]}x{input_size[2]}, {config.epochs} epochs\n\n"
        + markdown_table(rows, config.seeds)
    )
    for key, scale, label, filename in (
        ("macs", 1e6, "MACs (millions)", "accuracy_vs_macs.png"),
        ("peak_ram_bytes", 1024, "peak RAM, layer convention (KiB)", "accuracy_vs_peak_ram.png"),
    ):
        fig, ax = new_figure(figsize=(6, 4))
        for r in rows:  # the mean, and a bar over the seeds' range
            ax.errorbar(r[key] / scale, r["acc"], yerr=r["acc_spread"] / 2, fmt="o", capsize=4)
            ax.annotate(
                r["model"], (r[key] / scale, r["acc"]), fontsize=8, xytext=(4, 4), textcoords="offset points"
            )
        ax.margins(x=0.3, y=0.15)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%), mean and range over seeds")
        ax.set_title(f"{spec}, {config.epochs} epochs")
        ax.grid(alpha=0.3)
        save_figure(fig, out / filename, dpi=100)
