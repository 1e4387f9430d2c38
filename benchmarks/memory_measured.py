"""Peak RAM the PyTorch CPU allocator really holds during eager inference, next to the three conventions.

For each network: batch 1 at 224, eval mode, no gradients, weights excluded (they are allocated before the
pass). "measured" is the input tensor plus the peak of the running sum of the allocations and frees the
profiler records during one forward pass (torch.profiler, profile_memory=True), after one warm-up pass.
It includes what the conventions leave out: temporaries, im2col/oneDNN workspaces, BN outputs that a
runtime would fuse, RNNPool's whole-map projections. The conventions are computed for fp32 (4 bytes).

    python benchmarks/memory_measured.py [--threads N] [--out results/memory_measured.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.profiler import ProfilerActivity, profile

import leanvision
from leanvision.analysis.memory import CONVENTIONS, peak_memory, trace

NETWORKS = {
    "mobilenetv2_100": None,
    "mobilenetv2_rnnpool": None,
    "resnet18": torchvision.models.resnet18,
    "resnet18_rnnpool": None,
    "densenet121_rnnpool": None,
    "googlenet_rnnpool": None,
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/memory_measured.json"), help="JSON path")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (workspaces depend on it)")
    args = parser.parse_args()
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def measured_peak_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Input bytes + the peak of allocations minus frees during one profiled forward pass."""
    with torch.no_grad():
        model(x)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(x)
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    running = itertools.accumulate((e.nbytes() for e in events), initial=0)
    return x.numel() * x.element_size() + max(running)


def measure(name: str) -> dict:
    builder = NETWORKS[name]
    model = (builder() if builder else leanvision.create_model(name)).eval()
    graph = trace(model)
    row = dict(model=name, measured_bytes=measured_peak_bytes(model, torch.randn(1, 3, 224, 224)))
    for convention in CONVENTIONS:
        report = peak_memory(graph, convention=convention, dtype_bytes=4)
        row[f"{convention}_bytes"], row[f"{convention}_at"] = report.peak_bytes, report.peak_layer
    return row


def print_summary(rows: list[dict]) -> None:
    columns = ["measured", *CONVENTIONS]
    print(f"{'model':24s}" + "".join(f"{c + ' MiB':>14s}" for c in columns) + "   measured / planner")
    for row in rows:
        values = "".join(f"{row[c + '_bytes'] / 2**20:14.3f}" for c in columns)
        print(f"{row['model']:24s}{values}   {row['measured_bytes'] / row['planner_bytes']:.1f}x")


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(name) for name in NETWORKS]
    report = dict(
        input_size=[3, 224, 224],
        batch_size=1,
        dtype="fp32",
        device="cpu",
        threads=torch.get_num_threads(),
        measured="input + peak of (allocations - frees) in one eager forward, torch.profiler memory events",
        units="bytes; MiB = 2^20 bytes",
        versions=dict(python=platform.python_version(), torch=torch.__version__),
        machine=platform.machine(),
        results=rows,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_summary(rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
