"""RRR-Net CPU speed: the fused inference path (FusedRRRNet) against the per-branch loop (RRRNet.forward).

Model: rrrnet_resnet152, blocks 1 1 1 1, 8 branches, 20 classes, 128x128 inputs (the paper's setting),
random weights with BN statistics calibrated on random images. Candidates, all in one process on the same
weights and input:
- loop: RRRNet eager, the stem then one branch after the other;
- fused: FusedRRRNet, the inference form (one wide 1x1 conv reads the stem, grouped convs after, one
  grouped classifier; every BN folded, channels_last; each conv with its ReLU and residual add as one
  oneDNN call on weights packed once);
- loop_deploy: the loop after leanvision.fuse_for_inference (every BN folded, channels_last, small 1x1
  convs as GEMMs), so fused / loop_deploy is the gain of FusedRRRNet over the generic deploy rewrite.
Passes are interleaved: each round times one forward of every candidate back to back (order rotating), so
drifts in machine speed hit them alike. A speed-up is the median over rounds of loop_ms / candidate_ms
within one round. Target (issue): fused >= 2x loop at batch 1 and 32. Outputs are checked against the loop.

    python benchmarks/rrr_speed.py [--threads N] [--batch-sizes 1,32] [--seconds S] [--branches 8]
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
from torch import nn

import leanvision
from leanvision.bench import calibrate_batchnorm, percentiles
from leanvision.deploy import FusedRRRNet, fuse_for_inference
from report import finish, interleaved_ms, paired_speedup

TARGET = 2.0
MAX_ABS_DIFF = 1e-4  # log-probabilities


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/rrr_speed.json"), help="JSON output path")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    parser.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per batch size")
    parser.add_argument("--min-rounds", type=int, default=10, help="interleaved rounds per batch size")
    parser.add_argument("--branches", type=int, default=8, help="number of branches")
    parser.add_argument("--input-size", type=int, default=128, help="square input resolution")
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if min(args.batch_sizes) < 1 or args.min_rounds < 1 or (args.threads or 1) < 1 or args.seconds < 0:
        parser.error("batch sizes, --min-rounds and --threads must be >= 1, --seconds >= 0")
    return args


def build_candidates(branches: int, input_size: int) -> dict[str, nn.Module]:
    model = leanvision.create_model("rrrnet_resnet152", branches=branches, num_classes=20)
    calibrate_batchnorm(model, (3, input_size, input_size))
    fused = FusedRRRNet(model)
    return {
        "loop": model.eval(),
        "fused": fused,
        "loop_deploy": fuse_for_inference(model),
    }


def run_batch(candidates: dict[str, nn.Module], batch_size: int, args: argparse.Namespace) -> dict:
    x = torch.randn(
        batch_size, 3, args.input_size, args.input_size, generator=torch.Generator().manual_seed(1)
    )
    names = list(candidates)
    with torch.inference_mode():
        outputs = {name: candidates[name](x) for name in names}  # also the first warm-up
        diff = {name: float((out - outputs["loop"]).abs().max()) for name, out in outputs.items()}
        for name in names:
            candidates[name](x)
        times = interleaved_ms(
            {name: (lambda name=name: candidates[name](x)) for name in names}, args.min_rounds, args.seconds
        )
    configs = {}
    for name in names:
        p10, median, p90 = percentiles(times[name])
        configs[name] = dict(
            median_ms=median, p10_ms=p10, p90_ms=p90, rounds=len(times[name]), max_abs_diff=diff[name]
        )
    speedups = {name: paired_speedup(times["loop"], times[name]) for name in names[1:]}
    speedups["fused_vs_loop_deploy"] = paired_speedup(times["loop_deploy"], times["fused"])
    return dict(
        batch_size=batch_size,
        configs=configs,
        speedup_vs_loop=speedups,
        outputs_match=max(diff.values()) <= MAX_ABS_DIFF,
        target_met=speedups["fused"] >= TARGET,
    )


def print_summary(results: list[dict]) -> None:
    print(
        f"{'batch':>5}  {'config':<14} {'median ms':>10} {'p10 ms':>9} {'p90 ms':>9} {'vs loop':>8} "
        f"{'diff':>8}"
    )
    for res in results:
        for name, c in res["configs"].items():
            speedup = res["speedup_vs_loop"].get(name, 1.0)
            print(
                f"{res['batch_size']:>5}  {name:<14} {c['median_ms']:>10.2f} {c['p10_ms']:>9.2f} "
                f"{c['p90_ms']:>9.2f} {speedup:>7.2f}x {c['max_abs_diff']:>8.1e}"
            )
        over_deploy = res["speedup_vs_loop"]["fused_vs_loop_deploy"]
        print(f"{'':>5}  fused vs loop_deploy: {over_deploy:.2f}x")
    met = ", ".join(f"batch {r['batch_size']}: {'met' if r['target_met'] else 'MISSED'}" for r in results)
    print(f"target fused >= {TARGET}x loop: {met}")


def main() -> int:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    candidates = build_candidates(args.branches, args.input_size)
    results = [run_batch(candidates, bs, args) for bs in args.batch_sizes]
    report = dict(
        model="rrrnet_resnet152",
        blocks=[1, 1, 1, 1],
        branches=args.branches,
        num_classes=20,
        input_size=[3, args.input_size, args.input_size],
        device="cpu",
        threads=torch.get_num_threads(),
        seconds_per_batch_size=args.seconds,
        weights="random, BN statistics calibrated",
        versions=dict(python=platform.python_version(), torch=torch.__version__),
        machine=platform.machine(),
        speedup="median over rounds of loop_ms / candidate_ms, one pass each, back to back in one round",
        target=f"fused >= {TARGET}x loop",
        results=results,
    )
    return finish(
        args.out,
        report,
        lambda: print_summary(results),
        all(r["outputs_match"] for r in results),
        f"an output differs from the loop's by more than {MAX_ABS_DIFF}",
    )


if __name__ == "__main__":
    sys.exit(main())
