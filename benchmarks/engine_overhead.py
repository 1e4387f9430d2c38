"""Training throughput of the engine (`leanvision.engine.train`) against a plain hand-written PyTorch loop
(Engine issue, part 5: the engine's overhead is below 5%).

Both train the same model (fresh, same seed) on the same data with the same recipe (AdamW, cosine schedule
per step, batch 64, shuffled DataLoader in the main process) and evaluate on the validation split after
every epoch. The engine also does what it is for: an atomic checkpoint and metrics.csv every epoch,
running metrics and a finite-loss check per step, and summary.json and curves.png at the end.

Epochs are paired: the engine's `on_epoch_end` hook runs one epoch of the plain loop, so every engine epoch
(training, evaluation, checkpoint) is timed right next to a plain one and a slow spell of a noisy machine
hits both alike. Single pairs still differ by up to +-20% on the 2-core machine, so the default takes 24
timed pairs (about 15 min; with 12 pairs, three runs gave +4.9%, +5.4% and, with 24, +1.6%). The first
pair is a warm-up. Throughput is training images per second over all timed epochs (training, evaluation,
checkpoint), and the overhead is plain / engine throughput - 1; the per-pair ratios are reported too. The
once-per-run cost of the engine's end (summary.json, curves.png) is reported beside it, with its share of
the run.

    python benchmarks/engine_overhead.py [--model rexnet_100_lowres] [--epochs 25] [--data SPEC]
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from leanvision.engine.data import DataSplits, build_dataset
from leanvision.engine.train import TrainConfig, make_model, seed_everything, train
from report import finish

MAX_OVERHEAD = 0.05


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="rexnet_100_lowres")
    parser.add_argument("--data", default="synthetic:lines,train=2000,val=500")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=25, help="epoch pairs, the first one a warm-up")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    parser.add_argument("--out", type=Path, default=Path("results/engine_overhead.json"), help="JSON output")
    return parser.parse_args()


def config_for(args: argparse.Namespace, out: str) -> TrainConfig:
    return TrainConfig(
        args.model, args.data, epochs=args.epochs, batch_size=64, lr=2e-3, opt="adamw", wd=0.0,
        img_size=args.img_size, out=out, progress=False,
    )  # fmt: skip


class PlainLoop:
    """The same training written as a bare PyTorch loop, one epoch per call."""

    def __init__(self, config: TrainConfig, data: DataSplits) -> None:
        seed_everything(config.seed)
        self.data, self.batch_size = data, config.batch_size
        self.model = make_model(config.model, data)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.wd)
        self.loader = DataLoader(data.train, config.batch_size, shuffle=True)
        total = config.epochs * len(self.loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total))
        )
        self.criterion = nn.CrossEntropyLoss()

    def epoch(self) -> float:
        """Seconds of one training epoch and the evaluation after it."""
        tic = time.perf_counter()
        self.model.train()
        for images, targets in self.loader:
            loss = self.criterion(self.model(images), targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
        self.model.eval()
        with torch.no_grad():
            val = DataLoader(self.data.val, self.batch_size)
            hits = sum((self.model(x).argmax(1) == y).sum().item() for x, y in val)
        seconds = time.perf_counter() - tic
        print(f"plain loop: val acc {100 * hits / len(self.data.val):.2f}% ({seconds:.1f} s)")
        return seconds


def paired_epochs(args: argparse.Namespace, data: DataSplits) -> tuple[list[float], list[float], float]:
    """(engine epoch seconds, plain epoch seconds, seconds of the engine's end of run)."""
    plain = PlainLoop(config_for(args, ""), data)
    engine_s: list[float] = []
    plain_s: list[float] = []
    resumed = time.perf_counter()  # the engine's clock: it runs whenever the plain loop does not

    def on_epoch_end(row: dict) -> None:
        nonlocal resumed
        engine_s.append(time.perf_counter() - resumed)
        plain_s.append(plain.epoch())
        print(f"epoch {row['epoch']}: engine {engine_s[-1]:.1f} s, plain {plain_s[-1]:.1f} s")
        resumed = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        train(config_for(args, out), data=data, on_epoch_end=on_epoch_end)
        end_s = time.perf_counter() - resumed
    return engine_s, plain_s, end_s


def main() -> int:
    args = parse_args()
    if args.epochs < 2:
        raise SystemExit("--epochs must be >= 2 (the first pair is a warm-up)")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = build_dataset(args.data, args.img_size)
    if data.multilabel:
        raise SystemExit(f"{args.data} is multi-label; use a single-label dataset")
    engine_s, plain_s, end_s = paired_epochs(args, data)
    engine_s, plain_s = engine_s[1:], plain_s[1:]  # the first pair is a warm-up (model build, first calls)
    images = len(data.train)
    per_pair = [e / p - 1 for e, p in zip(engine_s, plain_s)]
    overhead = sum(engine_s) / sum(plain_s) - 1  # = plain / engine throughput - 1
    report = dict(
        model=args.model,
        data=args.data,
        img_size=args.img_size,
        images_per_epoch=images,
        epoch_seconds={"engine": engine_s, "plain": plain_s},
        images_per_s={
            "engine": images * len(engine_s) / sum(engine_s),
            "plain": images * len(plain_s) / sum(plain_s),
        },
        overhead_per_pair=per_pair,
        median_overhead_per_pair=statistics.median(per_pair),
        overhead=overhead,
        end_of_run_s=end_s,
        end_of_run_share=end_s / (sum(engine_s) + end_s),
        machine=dict(platform=platform.platform(), threads=torch.get_num_threads(), torch=torch.__version__),
    )

    def summary() -> None:
        for name, times in report["epoch_seconds"].items():
            print(f"{name}: {report['images_per_s'][name]:.1f} images/s over {len(times)} epochs")
        pairs = ", ".join(f"{100 * o:+.1f}%" for o in per_pair)
        median = 100 * report["median_overhead_per_pair"]
        print(f"engine overhead {100 * overhead:+.1f}% (per pair: {pairs}; median {median:+.1f}%)")
        print(
            f"engine end of run (summary.json, curves.png): {end_s:.2f} s, "
            f"{100 * report['end_of_run_share']:.1f}% of this {len(engine_s)}-epoch run"
        )
        print(f"{'PASS' if overhead < MAX_OVERHEAD else 'FAIL'}: overhead below {100 * MAX_OVERHEAD:.0f}%")

    return finish(args.out, report, summary, overhead < MAX_OVERHEAD, "the engine's overhead is 5% or more")


if __name__ == "__main__":
    raise SystemExit(main())
