"""Fashion-MNIST on CPU: a ReXNet reaches >= 93% test accuracy, and an RNNPool variant with at most a
quarter of its peak RAM stays within 1 point (Engine issue, part 5).

Models (registry names, 28x28 grey images as they come, no resize):
- rexnet_100_lowres: ReXNet x1.0 with a stride-1 stem (total stride 16);
- rexnet_100_lowres_rnnpool: the same network with its three high-resolution stages replaced by one RNNPool
  (patch 6, stride 4, h1 = h2 = 32).
Both train with the engine (`leanvision.engine.train`) on the same recipe: AdamW lr 2e-3, weight decay 0.05,
cosine schedule, batch 128, label smoothing 0.1, random crop (pad 3) and horizontal flip, channels_last.
Peak RAM is the layer convention (RNNPool paper Appendix E.2, batch 1, fp32, `leanvision memory`).
The public benchmark table of the dataset lists MobileNet 95.0%, ResNet18 94.9%, two conv layers + pooling +
BN 93.4%.

    python benchmarks/fashion_mnist.py [--epochs 12] [--data fashion-mnist] [--out results/fashion_mnist.json]

To use both cores for both trainings at once: `--only NAME --threads 1` for each model in parallel, then
the same command without `--only`, which resumes the finished runs and writes the report.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from leanvision.analysis.cost import profile
from leanvision.analysis.memory import format_bytes, peak_memory
from leanvision.engine.data import DataSplits, build_dataset
from leanvision.engine.train import TrainConfig, make_model, seed_everything, train
from report import finish

BASELINE, RNNPOOL_VARIANT = "rexnet_100_lowres", "rexnet_100_lowres_rnnpool"
TARGET_ACC, MAX_ACC_DROP, MAX_PEAK_RATIO = 93.0, 1.0, 0.25


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="fashion-mnist", help="data spec (default: the Debian package)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    parser.add_argument(
        "--only",
        choices=(BASELINE, RNNPOOL_VARIANT),
        help="train just this model (to train both side by side); a run without it resumes both and reports",
    )
    parser.add_argument(
        "--runs", type=Path, default=Path("runs/bench-fashion-mnist"), help="training folders"
    )
    parser.add_argument("--out", type=Path, default=Path("results/fashion_mnist.json"), help="JSON output")
    return parser.parse_args()


def run(name: str, data: DataSplits, args: argparse.Namespace) -> dict:
    input_size = (data.channels, data.image_size, data.image_size)
    seed_everything(0)
    model = make_model(name, data)
    cost = profile(model, input_size=input_size)
    peak = peak_memory(model, input_size)
    config = TrainConfig(
        name, args.data, epochs=args.epochs, batch_size=128, lr=2e-3, opt="adamw", wd=0.05,
        label_smoothing=0.1, channels_last=True, out=str(args.runs / name),
        resume=(args.runs / name / "last.pt").exists(),
    )  # fmt: skip
    result = train(config, model=model, data=data)
    return dict(
        model=name,
        test_acc=result.val["acc"],
        epochs=result.history[-1]["epoch"],
        wall_s=round(sum(row["time_s"] for row in result.history), 1),  # a resumed run counts every epoch
        epoch_s=[row["time_s"] for row in result.history],
        params=cost.params,
        macs=cost.macs,
        peak_ram_bytes=peak.peak_bytes,
        peak_at=peak.peak_layer,
        history=result.history,
    )


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = build_dataset(args.data)
    if args.only:
        row = run(args.only, data, args)
        print(f"{row['model']}: {row['test_acc']:.2f}%, {row['epochs']} epochs, {row['wall_s'] / 60:.1f} min")
        return 0
    base, variant = run(BASELINE, data, args), run(RNNPOOL_VARIANT, data, args)
    ratio = variant["peak_ram_bytes"] / base["peak_ram_bytes"]
    checks = {
        f"{BASELINE} >= {TARGET_ACC}%": base["test_acc"] >= TARGET_ACC,
        f"{RNNPOOL_VARIANT} within {MAX_ACC_DROP} point": variant["test_acc"]
        >= base["test_acc"] - MAX_ACC_DROP,
        f"peak RAM ratio <= {MAX_PEAK_RATIO}": ratio <= MAX_PEAK_RATIO,
    }
    report = dict(
        data=args.data,
        machine=dict(platform=platform.platform(), threads=torch.get_num_threads(), torch=torch.__version__),
        models=[base, variant],
        peak_ram_ratio=ratio,
        checks=checks,
    )

    def summary() -> None:
        for row in (base, variant):
            print(
                f"{row['model']}: {row['test_acc']:.2f}% after {row['epochs']} epochs in "
                f"{row['wall_s'] / 60:.1f} min; {row['params'] / 1e6:.2f}M params, "
                f"{row['macs'] / 1e6:.1f}M MACs, peak RAM "
                f"{format_bytes(row['peak_ram_bytes'])} at {row['peak_at']}"
            )
        print(f"peak RAM ratio {ratio:.3f}")
        for check, ok in checks.items():
            print(f"{'PASS' if ok else 'FAIL'}: {check}")

    return finish(args.out, report, summary, all(checks.values()), "a Fashion-MNIST target was missed")


if __name__ == "__main__":
    raise SystemExit(main())
