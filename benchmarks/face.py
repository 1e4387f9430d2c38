"""RNNPool-Face on synthetic:faces: train, measure AP, cost and speed, beside the Haar cascade and EdgeML.

For rnnpool_face_quant and rnnpool_face_m4 (by default):
- trains each on `synthetic:faces` with the engine (`leanvision train --task detection`, S3FD loss and
  augmentation) on this machine's CPU cores, --epochs epochs (the run folders keep last.pt, metrics.csv);
- AP on the validation images by face-size bucket (easy >= 64 px, medium >= 32 px, hard >= 16 px; the
  WIDER FACE protocol with the other faces ignored), single-scale, and on images with <= 3 faces;
- params, MACs (leanvision.profile) and the layer-convention peak RAM (fp32 and int8) at 320x240;
- OpenCV's Haar cascade on the same validation images (target: the trained Quant beats it, and reaches
  AP >= 0.90 on faces >= 16 px);
- batch-1 latency of our forward and whole pipeline against EdgeML's model code on the same weights
  (face_latency.latency_rows; targets >= 3x forward, >= 5x pipeline), when --edgeml-dir holds EdgeML.
Run it on an otherwise idle machine.

    python benchmarks/face.py [--models a,b] [--epochs 30] [--train 2000] [--edgeml-dir DIR]
        [--out results/face.json] [--runs runs/face-bench]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

import leanvision
from leanvision.analysis.memory import peak_memory
from leanvision.detection.data import build_detection_data
from leanvision.detection.haar import HaarCascade
from leanvision.detection.inference import detect_images
from leanvision.detection.task import DetectionTask, detection_ap
from leanvision.engine.train import TrainConfig, train
from report import finish

AP_TARGET = 0.90  # the trained Quant model on faces >= 16 px ("hard" bucket)
BUCKETS = ("easy", "medium", "hard")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="rnnpool_face_quant,rnnpool_face_m4")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--train", type=int, default=2000, help="synthetic training images")
    parser.add_argument("--val", type=int, default=200, help="synthetic validation images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (EdgeML's)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers (augmentation)")
    parser.add_argument("--edgeml-dir", default=None, help="EdgeML checkout for the side-by-side latency")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default="results/face.json")
    parser.add_argument("--runs", default="runs/face-bench")
    return parser.parse_args()


def subset_aps(aps: dict) -> dict:
    """{subset: AP} of detection_ap's {"ap_SUBSET": AP, ...}."""
    return {k[3:]: v for k, v in aps.items() if k.startswith("ap_")}


def train_and_measure(name: str, spec: str, args: argparse.Namespace) -> dict:
    """Train `name` on `spec` (resuming a finished or interrupted run in the same folder) and measure it."""
    out = Path(args.runs) / name
    config = TrainConfig(
        model=name, data=spec, task="detection", epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        wd=5e-4, warmup_epochs=min(5, args.epochs), img_size=320, out=str(out), workers=args.workers,
        resume=(out / "last.pt").exists(), progress=False,
    )  # fmt: skip
    tic = time.perf_counter()
    result = train(config, task=DetectionTask())
    result.raise_if_interrupted()  # the same command resumes the run
    model = result.model.eval()
    data = build_detection_data(spec, model.in_chans)
    aps = detection_ap(lambda images: detect_images(model, images), data, max_faces=3)
    size = (model.in_chans, 240, 320)
    cost = leanvision.profile(model, size)
    return {
        "model": name,
        "train_seconds": round(time.perf_counter() - tic, 1),
        "epochs": result.history[-1]["epoch"],
        "final_train_loss": result.history[-1]["train_loss"],
        "ap": subset_aps(aps),
        "params": cost.params,
        "macs": cost.macs,
        "peak_ram_fp32": peak_memory(model, size, "layer", dtype_bytes=4).peak_bytes,
        "peak_ram_int8": peak_memory(model, size, "layer", dtype_bytes=1).peak_bytes,
    }


def print_summary(report: dict) -> None:
    header = f"{'detector':<22}{'easy':>7}{'medium':>8}{'hard':>7}{'<=3 faces':>10}{'params':>10}{'MMACs':>8}"
    print(header + f"{'RAM fp32':>10}{'RAM int8':>10}")
    for row in report["detectors"]:
        ap = row["ap"]
        few = ap.get("hard (<= 3 faces)", float("nan"))
        cost = (
            f"{row['params']:>10,}{row['macs'] / 1e6:>8.1f}{row['peak_ram_fp32'] / 1024:>8.0f}KB"
            f"{row['peak_ram_int8'] / 1024:>8.0f}KB"
            if "params" in row
            else ""
        )
        print(
            f"{row['model']:<22}"
            + "".join(f"{ap[b]:>{w}.3f}" for b, w in zip(BUCKETS, (7, 8, 7)))
            + f"{few:>10.3f}{cost}"
        )
    for row in report.get("latency", []):
        print(row)
    quant = next((r for r in report["detectors"] if r["model"] == "rnnpool_face_quant"), None)
    if quant is not None:
        haar = report["detectors"][-1]["ap"]["hard"]
        verdict = "PASS" if quant["ap"]["hard"] >= AP_TARGET and quant["ap"]["hard"] > haar else "MISS"
        print(
            f"Quant AP on faces >= 16 px {quant['ap']['hard']:.3f} "
            f"(target >= {AP_TARGET}, Haar {haar:.3f}): {verdict}"
        )


def main() -> int:
    args = parse_args()
    torch.manual_seed(0)
    spec = f"synthetic:faces,train={args.train},val={args.val}"
    report: dict = {
        "spec": spec,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "detectors": [],
    }
    for name in args.models.split(","):
        report["detectors"].append(train_and_measure(name, spec, args))
        print(f"{name}: {report['detectors'][-1]['ap']}", flush=True)
    haar_aps = detection_ap(HaarCascade(), build_detection_data(spec, 3), max_faces=3)
    report["detectors"].append({"model": "haar (OpenCV)", "ap": subset_aps(haar_aps)})
    if args.edgeml_dir:
        from face_latency import latency_rows

        weights = {
            r["model"]: str(Path(args.runs) / r["model"] / "last.pt") for r in report["detectors"][:-1]
        }
        report["latency"] = latency_rows(
            tuple(weights), rounds=args.rounds, edgeml_dir=args.edgeml_dir, weights=weights
        )
    return finish(Path(args.out), report, lambda: print_summary(report), True, "")


if __name__ == "__main__":
    sys.exit(main())
