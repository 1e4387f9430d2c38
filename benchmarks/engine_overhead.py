"""Training throughput of the engine (`leanvision.engine.train`) against a plain hand-written PyTorch loop
(Engine issue, part 5: the engine's overhead is below 5%).

Both train the same model (fresh, same seed) on the same data with the same recipe (AdamW, cosine schedule
per step, batch 64, shuffled DataLoader in the main process) and evaluate on the validation split after
every epoch. The engine also does what it is for: an atomic checkpoint and metrics.csv every epoch,
running metrics, a finite-loss check per step, and summary.json and curves.png at the end. Runs alternate
(engine, plain, plain, engine, ...) in one process, so a slow spell of a noisy machine hits both alike;
throughput is training images per second of wall time over the whole run, and the overhead is the median
over rounds of plain / engine throughput - 1.

    python benchmarks/engine_overhead.py [--model rexnet_100_lowres] [--rounds 3] [--epochs 2]
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
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="pairs of runs (engine and plain)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    parser.add_argument("--out", type=Path, default=Path("results/engine_overhead.json"), help="JSON output")
    return parser.parse_args()


def config_for(args: argparse.Namespace, out: str) -> TrainConfig:
    return TrainConfig(
        args.model, args.data, epochs=args.epochs, batch_size=64, lr=2e-3, opt="adamw", wd=0.0,
        img_size=args.img_size, out=out, progress=False,
    )  # fmt: skip


def engine_run(args: argparse.Namespace, data: DataSplits) -> float:
    """Seconds of one `train` call (model built inside, as `leanvision train` does)."""
    with tempfile.TemporaryDirectory() as out:
        tic = time.perf_counter()
        train(config_for(args, out), data=data)
        return time.perf_counter() - tic


def plain_run(args: argparse.Namespace, data: DataSplits) -> float:
    """Seconds of the same training written as a bare PyTorch loop."""
    config = config_for(args, "")
    tic = time.perf_counter()
    seed_everything(config.seed)
    model = make_model(config.model, data)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.wd)
    loader = DataLoader(data.train, config.batch_size, shuffle=True)
    total = config.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total))
    )
    criterion = nn.CrossEntropyLoss()
    for _ in range(config.epochs):
        model.train()
        for images, targets in loader:
            loss = criterion(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        with torch.no_grad():
            hits = sum(
                (model(x).argmax(1) == y).sum().item() for x, y in DataLoader(data.val, config.batch_size)
            )
        print(f"plain loop: val acc {100 * hits / len(data.val):.2f}%")
    return time.perf_counter() - tic


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = build_dataset(args.data, args.img_size)
    if data.multilabel:
        raise SystemExit(f"{args.data} is multi-label; use a single-label dataset")
    images = args.epochs * len(data.train)
    runs = {"engine": engine_run, "plain": plain_run}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    engine_run(args, data)  # warm-up: first-call costs (allocator, oneDNN primitives, imports)
    for r in range(args.rounds):
        order = ["engine", "plain"] if r % 2 == 0 else ["plain", "engine"]
        for name in order:
            seconds[name].append(runs[name](args, data))
            print(f"round {r + 1}: {name} {seconds[name][-1]:.1f} s")
    overheads = [e / p - 1 for e, p in zip(seconds["engine"], seconds["plain"])]
    overhead = statistics.median(overheads)
    report = dict(
        model=args.model,
        data=args.data,
        img_size=args.img_size,
        epochs=args.epochs,
        images_per_run=images,
        seconds=seconds,
        images_per_s={name: [images / s for s in times] for name, times in seconds.items()},
        overhead_per_round=overheads,
        overhead=overhead,
        machine=dict(platform=platform.platform(), threads=torch.get_num_threads(), torch=torch.__version__),
    )

    def summary() -> None:
        for name, times in seconds.items():
            print(f"{name}: median {images / statistics.median(times):.1f} images/s over {len(times)} runs")
        rounds = ", ".join(f"{100 * o:+.1f}%" for o in overheads)
        print(f"engine overhead {100 * overhead:+.1f}% (rounds: {rounds})")
        print(f"{'PASS' if overhead < MAX_OVERHEAD else 'FAIL'}: overhead below {100 * MAX_OVERHEAD:.0f}%")

    return finish(args.out, report, summary, overhead < MAX_OVERHEAD, "the engine's overhead is 5% or more")


if __name__ == "__main__":
    raise SystemExit(main())
