"""Every inference backend of leanvision on five models, at batch 1 and 32, side by side.

Models (random weights, BN statistics calibrated, each at its registered input size): rexnet_100,
mobilenetv2_100, mobilenetv2_rnnpool, rexnet_100_lowres_rnnpool and the face detector rnnpool_face_quant
(raw outputs at 640x480). Backends: eager, deploy, compile, ort, ort-int8, best (leanvision.export.
backends; ONNX Runtime with intra-op spinning off, as many threads as PyTorch). Per batch size all
models and backends are timed in one interleaved loop (export.backends.time_models): at least
--min-rounds rounds and --seconds seconds.

Targets (ratios of medians, measured in the same loop):
- best >= 1.0x ort at batch 1, every model;
- best >= 2.0x ort on the RNNPool networks (mobilenetv2_rnnpool, rexnet_100_lowres_rnnpool,
  rnnpool_face_quant), at both batch sizes;
- ort-int8 >= 1.5x ort at batch 32, every model.
A missed target adds the per-op profile that explains it: the 8 op types taking most of a call in our
best path (torch.profiler, self CPU time; aot profiled as compile, the same inductor kernels) and in
ONNX Runtime's fp32 session, and its int8 one when the int8 target is missed (ORT's own profiler, node
time per op type), each in ms per call. `best` repeats the timings of the path it picked.

    python benchmarks/backends.py [--batch-sizes 1,32] [--threads 2] [--models a,b] [--min-rounds 5]
        [--seconds 20] [--out results/backends.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import profile

import leanvision
from leanvision.bench import calibrate_batchnorm
from leanvision.export.backends import BACKENDS, PreparedBackends, time_models
from leanvision.export.onnx import INPUT_NAME
from report import finish

MODELS = (
    "rexnet_100",
    "mobilenetv2_100",
    "mobilenetv2_rnnpool",
    "rexnet_100_lowres_rnnpool",
    "rnnpool_face_quant",
)
RNNPOOL_MODELS = {"mobilenetv2_rnnpool", "rexnet_100_lowres_rnnpool", "rnnpool_face_quant"}
PROFILE_CALLS = 3
TOP_OPS = 8


def targets(model: str, batch: int, ms: dict[str, float]) -> list[dict]:
    """The targets that apply to one model at one batch size, each with its measured ratio."""
    checks = []
    if batch == 1:
        checks.append(("best >= 1.0x ort", ms["ort"] / ms["best"], 1.0))
    if model in RNNPOOL_MODELS:
        checks.append(("best >= 2.0x ort (RNNPool)", ms["ort"] / ms["best"], 2.0))
    if batch == 32:
        checks.append(("ort-int8 >= 1.5x ort", ms["ort"] / ms["ort-int8"], 1.5))
    return [
        dict(target=name, ratio=ratio, wanted=wanted, passed=ratio >= wanted)
        for name, ratio, wanted in checks
    ]


def torch_profile(call, calls: int = PROFILE_CALLS) -> list[dict]:
    """The op types taking most self CPU time of `call`, ms per call."""
    with profile() as prof:
        for _ in range(calls):
            call()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP_OPS]
    return [dict(op=e.key, ms=e.self_cpu_time_total / 1e3 / calls, count=e.count // calls) for e in ops]


def ort_profile(path: Path, x: torch.Tensor, threads: int, calls: int = PROFILE_CALLS) -> list[dict]:
    """The op types taking most node time in ONNX Runtime's session on the file, ms per call."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {INPUT_NAME: x.numpy()}
    session.run(None, feed)
    for _ in range(calls):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = sum(1 for e in events if e.get("name") == "model_run")
    by_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]][0] += event["dur"] / 1e3
            by_op[event["args"]["op_name"]][1] += 1
    top = sorted(by_op.items(), key=lambda item: item[1][0], reverse=True)[:TOP_OPS]
    return [dict(op=op, ms=total / runs, count=round(count / runs)) for op, (total, count) in top]


def explain(model: torch.nn.Module, size: tuple[int, int, int], batch: int, picked: str, threads: int,
            int8: bool) -> dict:  # fmt: skip
    """Per-op profiles of our best path (`picked`; aot is profiled as compile: the same inductor kernels,
    which torch.profiler cannot see inside the AOT library) and of ONNX Runtime fp32 (and int8) on one
    model."""
    x = torch.rand(batch, *size, generator=torch.Generator().manual_seed(0))
    profiled = "compile" if picked == "aot" else picked
    with tempfile.TemporaryDirectory() as folder:
        ready = PreparedBackends(model, x, Path(folder), [x.numpy()])
        profiles = {f"ours ({picked}, profiled as {profiled})": torch_profile(ready.get(profiled).call)}
        profiles["ort"] = ort_profile(ready.onnx_file(), x, threads)
        if int8:
            profiles["ort-int8"] = ort_profile(ready.onnx_file(int8=True), x, threads)
        return profiles


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--threads", type=int, default=None, help="default: PyTorch's")
    parser.add_argument("--min-rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per batch size, at least")
    parser.add_argument("--out", type=Path, default=Path("results/backends.json"))
    args = parser.parse_args()
    names = [m for m in args.models.split(",") if m]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    sizes = {name: tuple(leanvision.get_model_config(name).input_size) for name in names}
    models = {name: calibrate_batchnorm(leanvision.create_model(name), sizes[name]) for name in names}
    rows = []
    for batch in batches:

        def say(step: str, batch: int = batch) -> None:
            print(f"batch {batch}: {step}", flush=True)

        timed = time_models(
            models, BACKENDS, sizes, batch, threads, args.min_rounds, args.seconds, on_step=say
        )
        for name in names:
            by_backend = {r["backend"]: r for r in timed[name]}
            ms = {b: r["median_ms"] for b, r in by_backend.items()}
            row = dict(
                model=name, batch_size=batch, input_size=list(sizes[name]), backends=by_backend,
                best_picked=by_backend["best"]["detail"], targets=targets(name, batch, ms),
            )  # fmt: skip
            if not all(t["passed"] for t in row["targets"]):
                print(f"profiling {name} at batch {batch} (a target is missed)", flush=True)
                picked = row["best_picked"].split(";")[0]
                int8 = any(t["target"].startswith("ort-int8") and not t["passed"] for t in row["targets"])
                row["profile"] = explain(models[name], sizes[name], batch, picked, threads, int8)
            rows.append(row)
    report = dict(
        torch=torch.__version__,
        onnxruntime=__import__("onnxruntime").__version__,
        python=platform.python_version(),
        threads=threads,
        cpu_count=os.cpu_count(),
        rows=rows,
    )
    return finish(args.out, report, lambda: print_summary(rows), True, "")


def print_summary(rows: list[dict]) -> None:
    header = "".join(f"{b:>10}" for b in BACKENDS)
    print(f"{'model':<27}{'batch':>6}{header}  best=   targets (ratio, wanted)")
    for row in rows:
        times = "".join(f"{row['backends'][b]['median_ms']:>10.2f}" for b in BACKENDS)
        verdicts = "; ".join(
            f"{t['target']}: {t['ratio']:.2f} {'PASS' if t['passed'] else 'MISS'}" for t in row["targets"]
        )
        picked = row["best_picked"].split(";")[0]
        print(f"{row['model']:<27}{row['batch_size']:>6}{times}  {picked:<7} {verdicts}")
    print("median ms per call of the whole batch; per batch size, all models and backends interleaved")
    for row in rows:
        for part, ops in row.get("profile", {}).items():
            listed = ", ".join(f"{o['op']} {o['ms']:.2f} ms x{o['count']}" for o in ops)
            print(f"  {row['model']} b={row['batch_size']} {part}: {listed}")


if __name__ == "__main__":
    sys.exit(main())
