"""The paper's comparison: four ways to use a pretrained ResNet on each Meta-Album dataset of a set.

| method | network | training |
|---|---|---|
| `linear_probe` | the full backbone | only the classifier (every other layer frozen, BN in eval mode) |
| `fine_tune` | the full backbone | every layer |
| `resnet1111` | ResNet 1 1 1 1, one branch | `fit_rrr`: frozen BN-warmed stem, the top trained |
| `rrrnet` | ResNet 1 1 1 1, `branches` branches | `fit_rrr`, every branch on its own loss |

All start from the same pretrained file, train with AdamW (lr 1e-3, wd 0.01, no schedule, batch 32) on
each dataset's training part and report accuracy on its test part (the 20/20 split of `metaalbum:DIR`).
Parameters, MACs (leanvision.analysis.cost) and batch-1 CPU latency (leanvision.bench, the network in
its inference form `FusedRRRNet`: BN folded, oneDNN calls with fused ReLU and add) are properties of each
method's network, measured once, for the first dataset's class count.

OUT/results.json is rewritten atomically after every (dataset, method): running again with the same
settings skips what is done. OUT/accuracy_vs_macs.png plots mean accuracy against MACs.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from leanvision.analysis.cost import profile
from leanvision.bench import benchmark, calibrate_batchnorm
from leanvision.deploy.fused_rrr import FusedRRRNet
from leanvision.engine.data import DataSplits, build_dataset, metaalbum_datasets
from leanvision.engine.train import seed_everything
from leanvision.errors import InvalidArgumentError
from leanvision.experiments.rrr.state import load_state, write_json_atomic
from leanvision.experiments.rrr.train import finetune, fit_rrr
from leanvision.models.rrrnet import RESNETS, STEM, RRRNet
from leanvision.models.weights import save_checkpoint

METHODS = ("linear_probe", "fine_tune", "resnet1111", "rrrnet")


@dataclass
class RunConfig:
    """One comparison: `data` is a Meta-Album dataset or set (metaalbum:DIR) or any other data spec."""

    data: str
    weights: str
    backbone: str = "resnet152"
    methods: tuple[str, ...] = METHODS
    epochs: int = 300
    img_size: int = 128
    branches: int = 8
    batch_size: int = 32
    lr: float = 1e-3
    wd: float = 0.01
    warm_epochs: int = 10
    seed: int = 0
    out: str = "runs/rrr-run"
    threads: int = 1
    latency_seconds: float = 2.0

    def check(self) -> None:
        """Raise a ValueError naming the first bad setting."""
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise InvalidArgumentError(
                f"unknown method(s) {unknown} in {list(self.methods)}; expected some of {METHODS}"
            )
        if self.backbone not in RESNETS:
            raise InvalidArgumentError(
                f"unknown backbone {self.backbone!r}; expected one of {sorted(RESNETS)}"
            )
        if self.epochs < 1 or self.branches < 1 or self.threads < 1:
            raise InvalidArgumentError(
                f"need epochs, branches and threads >= 1, got {self.epochs}, {self.branches}, {self.threads}"
            )


def method_label(method: str, config: RunConfig) -> str:
    """The method's name in tables and plots."""
    return {
        "linear_probe": "linear probe",
        "fine_tune": "fine-tune",
        "resnet1111": "ResNet 1111",
        "rrrnet": f"RRR-Net N={config.branches}",
    }[method]


def build_method(method: str, config: RunConfig, num_classes: int) -> RRRNet:
    """The method's network at its starting point (random weights; `load_pretrained` gives the start)."""
    full, branches = method in ("linear_probe", "fine_tune"), config.branches if method == "rrrnet" else 1
    blocks = RESNETS[config.backbone][1] if full else (1, 1, 1, 1)
    return RRRNet(config.backbone, blocks, branches, num_classes, seed=config.seed)


def train_method(method: str, config: RunConfig, data: DataSplits, out: Path) -> float:
    """Train one method on one dataset from the pretrained weights; its test accuracy (%)."""
    seed_everything(config.seed)
    model = build_method(method, config, data.num_classes).load_pretrained(config.weights)
    model.to("cuda" if torch.cuda.is_available() else "cpu")  # where `train` would put it
    if method in ("resnet1111", "rrrnet"):
        result = fit_rrr(
            model,
            data,
            config.epochs,
            config.batch_size,
            config.lr,
            config.wd,
            config.warm_epochs,
            config.seed,
        )
        save_checkpoint(model, out / "model.pth")
        return result.val["acc"]
    if method == "linear_probe":
        model.freeze([*STEM, "branches.0.layer3", "branches.0.layer4"])
    return finetune(model, data, out, config.epochs, config.batch_size, config.lr, config.wd, config.seed)[
        "acc"
    ]


def method_costs(method: str, config: RunConfig, num_classes: int) -> dict[str, Any]:
    """Parameters and MACs of the method's network, and its median batch-1 CPU latency (inference form)."""
    model = calibrate_batchnorm(
        build_method(method, config, num_classes), (3, config.img_size, config.img_size)
    )
    report = profile(model, config.img_size)
    timing = benchmark(
        FusedRRRNet(model),
        input_size=(3, config.img_size, config.img_size),
        threads=config.threads,
        min_seconds=config.latency_seconds,
    )
    return {
        "blocks": list(model.blocks),
        "branches": len(model.branches),
        "num_classes": num_classes,
        "params": report.params,
        "macs": report.macs,
        "latency_ms": timing.median_ms,
    }


def dataset_specs(spec: str) -> list[str]:
    """Every dataset a spec names: the datasets of a Meta-Album set, else the spec itself."""
    return metaalbum_datasets(spec) if spec.startswith("metaalbum:") else [spec]


def dataset_name(spec: str) -> str:
    """A dataset's folder name (its Meta-Album code), or the spec for other data."""
    kind, _, arg = spec.partition(":")
    return Path(arg.partition(",")[0]).name if kind == "metaalbum" else spec.replace("/", "_")


def run_methods(
    config: RunConfig, on_result: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Train and evaluate every method on every dataset, then measure each method's costs.

    Returns (and writes to OUT/results.json) `results`: one {dataset, spec, method, acc} per pair, and
    `methods`: per method its label, mean_acc over datasets, blocks, branches, params, macs, latency_ms.
    `on_result(entry)` gets every result trained in this call.
    """
    config.check()
    out = Path(config.out)
    path = out / "results.json"
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items() if k != "out"}
    results = load_state(path, settings, {"results": [], "methods": {}})
    done = {(r["spec"], r["method"]) for r in results["results"]}
    specs = dataset_specs(config.data)
    for spec in specs:
        data = None
        for method in config.methods:
            if (spec, method) in done:
                continue
            data = data or build_dataset(spec, config.img_size)
            name = dataset_name(spec)
            acc = train_method(method, config, data, out / name / method)
            entry = {
                "dataset": name,
                "spec": spec,
                "method": method,
                "acc": acc,
                "num_classes": data.num_classes,
            }
            results["results"].append(entry)
            write_json_atomic(results, path)
            if on_result is not None:
                on_result(entry)
    num_classes = next(r["num_classes"] for r in results["results"] if r["spec"] == specs[0])
    for method in config.methods:
        if method not in results["methods"]:
            results["methods"][method] = method_costs(method, config, num_classes)
        accs = [r["acc"] for r in results["results"] if r["method"] == method]
        results["methods"][method].update(label=method_label(method, config), mean_acc=statistics.mean(accs))
        write_json_atomic(results, path)
    plot_accuracy_vs_macs(results["methods"], out / "accuracy_vs_macs.png")
    return results


def plot_accuracy_vs_macs(methods: dict[str, dict[str, Any]], path: Path) -> None:
    """Mean accuracy against MACs, one point per method."""
    from leanvision.plotting import new_figure, save_figure

    fig, ax = new_figure(figsize=(7, 4))
    for entry in methods.values():
        ax.plot(entry["macs"] / 1e9, entry["mean_acc"], marker="o", linestyle="none", label=entry["label"])
    ax.set_xscale("log")
    ax.set_xlabel("GMACs per image (log scale)")
    ax.set_ylabel("mean test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path, dpi=100)
