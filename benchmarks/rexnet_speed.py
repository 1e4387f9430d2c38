"""ReXNet-1.0 CPU speed: our eager model and our deploy path (leanvision.fuse_for_inference) against timm.

All candidates run in one process on the same weights and the same input, interleaved: each round times
one forward pass of every candidate back to back (the order rotating between rounds), so drifts in
machine speed hit them alike; rounds repeat for --seconds per batch size (at least --min-rounds). A
candidate's median/p10/p90 pool its passes; its speed-up is the median over rounds of timm_ms / ours_ms,
each ratio taken within one round. Outputs are checked against timm's.

Issue targets: our eager >= 1.0x timm and our deploy >= 1.5x timm, at batch 1 and 32. The deploy model is
timed as it is (eager) and wrapped in torch.compile (inductor; --no-compile skips it, the first compile of
each batch size takes about a minute on 2 cores).

    python benchmarks/rexnet_speed.py [--threads N] [--batch-sizes 1,32] [--seconds S] [--no-compile]
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import timm
import torch
from torch import nn

import leanvision
from leanvision.bench import calibrate_batchnorm, percentiles
from leanvision.deploy import fuse_for_inference
from report import finish, interleaved_ms, paired_speedup

TARGETS = {"ours_eager": 1.0, "ours_deploy": 1.5, "ours_deploy_compile": 1.5}
MAX_REL_DIFF = 1e-4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("results/rexnet_speed.json"), help="JSON output path"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    parser.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--seconds", type=float, default=60.0, help="timed seconds per batch size")
    parser.add_argument(
        "--min-rounds", type=int, default=10, help="interleaved rounds per batch size, at least"
    )
    parser.add_argument("--checkpoint", default=None, help="weights for our rexnet_100 (default: random)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time torch.compile of the deploy model",
    )
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if min(args.batch_sizes) < 1 or args.min_rounds < 1 or (args.threads or 1) < 1 or args.seconds < 0:
        parser.error("batch sizes, --min-rounds and --threads must be >= 1, --seconds >= 0")
    return args


def build_candidates(checkpoint: str | None, compile: bool) -> dict[str, tuple[nn.Module, bool]]:
    """name -> (eval-mode model, whether it takes a channels_last input); timm first, same weights."""
    ours = leanvision.create_model("rexnet_100", pretrained=checkpoint)
    if checkpoint is None:
        calibrate_batchnorm(ours)
    ours.eval()
    reference = timm.create_model("rexnet_100").eval()
    reference.load_state_dict(ours.state_dict())
    deploy = fuse_for_inference(ours)
    candidates = {
        "timm_eager": (reference, False),
        "ours_eager": (ours, False),
        "ours_deploy": (deploy, True),
    }
    if compile:
        candidates["ours_deploy_compile"] = (torch.compile(deploy, dynamic=False), True)
    return candidates


def run_batch(
    candidates: dict[str, tuple[nn.Module, bool]], batch_size: int, args: argparse.Namespace
) -> dict:
    x = torch.randn(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    inputs = {
        name: x.contiguous(memory_format=torch.channels_last) if cl else x
        for name, (_, cl) in candidates.items()
    }
    names = list(candidates)
    with torch.inference_mode():
        outputs = {name: candidates[name][0](inputs[name]) for name in names}  # also the first warm-up
        reference = outputs["timm_eager"]
        rel_diff = {
            name: float((out - reference).abs().max() / reference.abs().max())
            for name, out in outputs.items()
        }
        for name in names:  # second warm-up call each
            candidates[name][0](inputs[name])
        calls = {name: (lambda name=name: candidates[name][0](inputs[name])) for name in names}
        times = interleaved_ms(calls, args.min_rounds, args.seconds)
    configs = {}
    for name in names:
        p10, median, p90 = percentiles(times[name])
        configs[name] = dict(
            median_ms=median,
            p10_ms=p10,
            p90_ms=p90,
            rounds=len(times[name]),
            max_rel_diff_vs_timm=rel_diff[name],
        )
    speedups = {name: paired_speedup(times["timm_eager"], times[name]) for name in names[1:]}
    return dict(
        batch_size=batch_size,
        configs=configs,
        speedup_vs_timm=speedups,
        outputs_match=max(rel_diff.values()) <= MAX_REL_DIFF,
        targets_met={name: speedups[name] >= TARGETS[name] for name in names[1:]},
    )


def print_summary(results: list[dict]) -> None:
    print(
        f"{'batch':>5}  {'config':<20} {'median ms':>10} {'p10 ms':>9} {'p90 ms':>9} {'vs timm':>8} "
        f"{'max rel diff':>12}"
    )
    for res in results:
        for name, c in res["configs"].items():
            speedup = res["speedup_vs_timm"].get(name, 1.0)
            print(
                f"{res['batch_size']:>5}  {name:<20} {c['median_ms']:>10.2f} {c['p10_ms']:>9.2f} "
                f"{c['p90_ms']:>9.2f} {speedup:>7.2f}x {c['max_rel_diff_vs_timm']:>12.1e}"
            )
    for name in results[0]["targets_met"]:
        met = ", ".join(
            f"batch {r['batch_size']}: {'met' if r['targets_met'][name] else 'MISSED'}" for r in results
        )
        print(f"target {name} >= {TARGETS[name]}x timm: {met}")


def main() -> int:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    candidates = build_candidates(args.checkpoint, args.compile)
    results = [run_batch(candidates, bs, args) for bs in args.batch_sizes]
    report = dict(
        model="rexnet_100",
        input_size=[3, 224, 224],
        device="cpu",
        threads=torch.get_num_threads(),
        seconds_per_batch_size=args.seconds,
        min_rounds=args.min_rounds,
        weights=args.checkpoint or "random, BN statistics calibrated",
        versions=dict(python=platform.python_version(), torch=torch.__version__, timm=timm.__version__),
        machine=platform.machine(),
        speedup="median over rounds of timm_ms / ours_ms, one pass each, back to back in the same round",
        targets={name: TARGETS[name] for name in results[0]["targets_met"]},
        results=results,
    )
    return finish(
        args.out,
        report,
        lambda: print_summary(results),
        all(r["outputs_match"] for r in results),
        f"an output differs from timm's by more than {MAX_REL_DIFF} (relative)",
    )


if __name__ == "__main__":
    sys.exit(main())
