"""What int8 costs in accuracy: the Fashion-MNIST checkpoints of benchmarks/fashion_mnist.py evaluated in
PyTorch (fp32), with ONNX Runtime on the exported fp32 file, and on its static int8 (QDQ) models.

For each model (rexnet_100_lowres and rexnet_100_lowres_rnnpool, `--runs DIR/<model>/last.pt`) the test
split is evaluated by `leanvision.export.evaluate_exported` as `leanvision eval --backend ...` does: eager,
ort, and ort-int8 calibrated on the first --calib-images training images with each calibration variant
(MinMax per tensor, MinMax per channel, Percentile per channel, Entropy per channel).
Target: the best int8 variant within 0.5 accuracy points of fp32 (eager), for both models; the default
variant (MinMax per tensor) is reported beside it.

    python benchmarks/int8_accuracy.py [--runs runs/bench-fashion-mnist] [--data fashion-mnist]
        [--calib-images 256] [--out results/int8_accuracy.json]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from leanvision.engine.train import evaluate_checkpoint
from leanvision.export import evaluate_exported
from report import finish

MODELS = ("rexnet_100_lowres", "rexnet_100_lowres_rnnpool")
VARIANTS = (("minmax", False), ("minmax", True), ("percentile", True), ("entropy", True))
MAX_DROP = 0.5  # accuracy points


def timed(fn, *args, **kwargs) -> tuple[dict, float]:
    start = time.perf_counter()
    return fn(*args, **kwargs), round(time.perf_counter() - start, 1)


def measure(name: str, checkpoint: Path, data: str, calib_images: int) -> dict:
    fp32, fp32_s = timed(evaluate_checkpoint, name, checkpoint, data)
    ort, ort_s = timed(evaluate_exported, name, checkpoint, data, "ort")
    row = dict(model=name, checkpoint=str(checkpoint), samples=fp32["samples"], eager_acc=fp32["acc"],
               eager_s=fp32_s, ort_acc=ort["acc"], ort_s=ort_s, int8=[])  # fmt: skip
    for method, per_channel in VARIANTS:
        options = dict(calib_images=calib_images, method=method, per_channel=per_channel)
        result, seconds = timed(evaluate_exported, name, checkpoint, data, "ort-int8", **options)
        row["int8"].append(dict(method=method, per_channel=per_channel, acc=result["acc"],
                                drop=fp32["acc"] - result["acc"], seconds=seconds))  # fmt: skip
    best = min(row["int8"], key=lambda r: r["drop"])
    row.update(best_int8=best, default_int8=row["int8"][0], passed=best["drop"] <= MAX_DROP)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-fashion-mnist"))
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--calib-images", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("results/int8_accuracy.json"))
    args = parser.parse_args()
    missing = [str(args.runs / m / "last.pt") for m in MODELS if not (args.runs / m / "last.pt").is_file()]
    if missing:
        parser.error(f"no checkpoint {', '.join(missing)}: run benchmarks/fashion_mnist.py first")
    rows = [measure(m, args.runs / m / "last.pt", args.data, args.calib_images) for m in MODELS]
    report = dict(torch=torch.__version__, python=platform.python_version(), data=args.data,
                  calib_images=args.calib_images, max_drop=MAX_DROP, rows=rows)  # fmt: skip

    def summary() -> None:
        print(f"{'model':<27}{'eager':>8}{'ort':>8}  int8 variants (acc, drop in points)")
        for row in rows:
            variants = "; ".join(
                f"{v['method']}{' per-ch' if v['per_channel'] else ''} {v['acc']:.2f} ({v['drop']:+.2f})"
                for v in row["int8"]
            )
            verdict = "PASS" if row["passed"] else "MISS"
            print(f"{row['model']:<27}{row['eager_acc']:>8.2f}{row['ort_acc']:>8.2f}  {variants}  {verdict}")
        print(f"test split, {rows[0]['samples']} images; target: best int8 within {MAX_DROP} points of eager")

    return finish(
        args.out, report, summary, all(r["passed"] for r in rows), "int8 costs more than 0.5 points"
    )


if __name__ == "__main__":
    raise SystemExit(main())
