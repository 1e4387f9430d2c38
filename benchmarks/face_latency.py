"""Batch-1 latency of our RNNPool-Face detectors against EdgeML's own model code, on the same weights.

For each model and input size (fp32, eval, no gradients, torch.set_num_threads(--threads), default all
cores), EdgeML's S3FD class (examples/pytorch/vision/Face_Detection/models/RPool_Face_*.py, imported at run
time from --edgeml-dir, never copied) and ours hold the same weights:
- random: EdgeML's model built under a fixed seed, every BN affine, RNN bias, zeta/nu and L2Norm scale
  randomised, the BN statistics set from a train-mode pass over the benchmark image; or, when `weights`
  names one of our checkpoints for the model, those weights copied into EdgeML's model (the inverse of
  leanvision.models.face.checkpoint's key mapping, RNN sparsity masks multiplied in);
- then one constant is added to the face logit bias of every conf head, so that `candidates` priors of
  the benchmark image (a smooth seeded random image, no real faces) score above the confidence threshold:
  a trained detector's workload for NMS, where random weights put most of the priors above it;
- EdgeML's model is saved as its train.py does and loaded into ours with create_model(pretrained=PATH).
Checked: the max abs difference of the raw loc / conf / priors of each of ours (flagged above 1e-4 of
the largest output), and the boxes each of our pipelines keeps (the same count as EdgeML's; an EdgeML box
we lack must be a near-tie; the row shows the deploy form's counts, `boxes_match` covers all three).
Timed, warm-up first, then --rounds interleaved rounds (report.interleaved_ms), median per candidate,
ours three times: the eager model as built; its deploy form (`leanvision.deploy.fuse_for_inference`: BN
folded, each head's loc and conf convolutions as one with the L2Norm scales folded in, channels_last),
which `leanvision detect` runs; and that form with its head_outputs compiled by torch.compile (inductor,
freezing; RNNPool stays the numba kernels, an opaque operator), compiled before the timing:
- forward: EdgeML's 'train'-phase forward (raw loc, conf, priors) against our `model.head_outputs(x)`;
- pipeline: EdgeML's 'test' phase (softmax, decode, per-class threshold, Python NMS, top 750) on the
  mean-subtracted image against our `model([image])` (normalise, heads, decode, NMS).
Targets, on the faster of deploy and compile (named in the row): forward >= 3x, pipeline >= 5x faster
than EdgeML's.

Run-time shims for EdgeML's code on torch 2.14 (the peer checkout is not edited):
- `easydict` (not installed) is stubbed by a dict with attribute access, as its configs need;
- the `data` package is stubbed by an empty package over its folder, so that data.config loads without
  data/__init__ (the WIDER dataset: cv2, six and the IS_QVGA_MONO environment variable);
- layers/bbox_utils.nms calls torch.index_select(..., out=buffer) on a buffer of the previous, larger
  size; torch 2.14 then warns ("An output with one or more elements was resized ...") on every call,
  which costs ~20% of its NMS time. Its module sees a copy of `torch` whose index_select first resizes
  `out` to zero elements, as the warning advises (same results, no warning);
- its import-time print ("Running without FastGRNN CUDA") is silenced; EdgeML's top-level modules
  (models, layers, data, edgeml_pytorch, easydict) are removed from sys.modules again after loading.

    python benchmarks/face_latency.py --edgeml-dir /work/peers/EdgeML [--models a,b] [--rounds 7]
        [--threads N] [--candidates 300] [--out results/face_latency.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import math
import os
import platform
import statistics
import sys
import tempfile
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

import leanvision
from leanvision.deploy import fuse_for_inference
from leanvision.models.face.checkpoint import convert_edgeml_face
from leanvision.models.face.nets import RNNPoolFace
from report import finish, interleaved_ms

EDGEML_MODELS = {
    "rnnpool_face_c": "RPool_Face_C",
    "rnnpool_face_quant": "RPool_Face_Quant",
    "rnnpool_face_qvga_mono": "RPool_Face_QVGA_monochrome",
    "rnnpool_face_m4": "RPool_Face_M4",
}
FACE_DETECTION = Path("examples/pytorch/vision/Face_Detection")
EDGEML_MODULES = ("easydict", "data", "layers", "models", "edgeml_pytorch")
TARGETS = {"forward": 3.0, "pipeline": 5.0}  # EdgeML time / our time
OUTPUT_TOLERANCE = 1e-4  # max |EdgeML - ours| / max |EdgeML| of the raw outputs
WARMUP = 2
SEED = 0


class EasyDict(dict):
    """The part of easydict.EasyDict that EdgeML's configs use: keys as attributes."""

    __getattr__ = dict.__getitem__
    __setattr__ = dict.__setitem__


def _index_select(input: torch.Tensor, dim: int, index: torch.Tensor, *, out=None) -> torch.Tensor:
    """torch.index_select that empties `out` first, as torch 2.14 asks of a reused output buffer."""
    if out is None:
        return torch.index_select(input, dim, index)
    return torch.index_select(input, dim, index, out=out.resize_(0))


def load_edgeml(edgeml_dir: str | Path) -> dict[str, types.ModuleType]:
    """EdgeML's model modules (RPool_Face_* files) by our model name, imported from a checkout."""
    root = Path(edgeml_dir)
    folder = root / FACE_DETECTION
    if not (folder / "models").is_dir() or not (root / "pytorch" / "edgeml_pytorch").is_dir():
        raise FileNotFoundError(f"{root} lacks {FACE_DETECTION}/models or pytorch/edgeml_pytorch")

    def ours(name: str) -> bool:
        return name.split(".")[0] in EDGEML_MODULES

    saved = {k: v for k, v in sys.modules.items() if ours(k)}
    for name in saved:
        del sys.modules[name]
    data = types.ModuleType("data")
    data.__path__ = [str(folder / "data")]
    sys.modules.update(easydict=types.SimpleNamespace(EasyDict=EasyDict), data=data)
    paths = [str(folder), str(root / "pytorch")]
    sys.path[:0] = paths
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            modules = {n: importlib.import_module(f"models.{m}") for n, m in EDGEML_MODELS.items()}
        bbox_utils = sys.modules["layers.bbox_utils"]
        shim = types.ModuleType("torch")
        shim.__dict__.update(vars(torch))
        shim.index_select = _index_select
        bbox_utils.torch = shim
    finally:
        del sys.path[: len(paths)]
        for name in [k for k in sys.modules if ours(k)]:
            del sys.modules[name]
        sys.modules.update(saved)
    return modules


def benchmark_image(channels: int, height: int, width: int) -> torch.Tensor:
    """A smooth seeded random 0-1 image [C, H, W], the same scene at every size."""
    coarse = torch.rand(1, channels, 24, 32, generator=torch.Generator().manual_seed(SEED))
    return F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0].clamp(0, 1)


def randomise(net: nn.Module, x: torch.Tensor) -> None:
    """Seeded random BN affines, RNN biases, zeta / nu and L2Norm scales; BN statistics from x."""
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in net.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "weight" and p.ndim == 1:  # L2Norm scales, BN gammas
                p.mul_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=generator))
            elif leaf in ("bias_gate", "bias_update", "zeta", "nu") or (leaf == "bias" and p.ndim == 1):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
        norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        momenta = [bn.momentum for bn in norms]
        for bn in norms:
            bn.momentum = 1.0  # the running statistics become this batch's
        net.train()(x)
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
    net.eval()


def copy_ours_into(net: nn.Module, model: RNNPoolFace) -> None:
    """Load our model's weights into EdgeML's net (checkpoint.py's key mapping, inverted)."""
    keys = list(net.state_dict())
    tags = convert_edgeml_face({k: torch.tensor(i) for i, k in enumerate(keys)}, model)
    state = model.state_dict()
    edgeml = {}
    for key, tag in tags.items():
        if key.endswith("_mask"):
            continue
        value = state[key]
        if key.endswith((".W", ".U")):  # what FastGRNNCell computes with
            value = value * state[f"{key[:-1]}{key[-1].lower()}_mask"]
        edgeml[keys[int(tag)]] = value
    missing = net.load_state_dict(edgeml, strict=False).missing_keys
    if any("unrollRNN" not in k for k in missing):  # unrollRNN keys alias the loaded cell tensors
        raise KeyError(f"no weights of ours for EdgeML's {[k for k in missing if 'unrollRNN' not in k]}")


def shift_face_logits(net: nn.Module, conf: torch.Tensor, candidates: int, thresh: float) -> float:
    """Add one constant to every conf head's face bias so that `candidates` priors of `conf` [1, P, 2]
    score above `thresh`; returns the constant."""
    margin = (conf[0, :, 1] - conf[0, :, 0]).sort(descending=True).values
    k = min(candidates, len(margin) - 1)
    shift = math.log(thresh / (1 - thresh)) - float(margin[k - 1] + margin[k]) / 2
    with torch.no_grad():
        for head in net.conf:
            if isinstance(head, nn.Conv2d):  # a predicting conv; its last channel is the face logit
                head.bias[-1] += shift
    return shift


def build_pair(
    name: str, module: types.ModuleType, image: torch.Tensor, candidates: int, weights: str | None
) -> tuple[nn.Module, nn.Module, RNNPoolFace, float]:
    """EdgeML's net in the 'train' and the 'test' phase, and ours, on the same weights (see the module
    docstring); and the face-logit shift."""
    torch.manual_seed(SEED)
    train_net, test_net = module.build_s3fd("train"), module.build_s3fd("test")
    model = leanvision.create_model(name, pretrained=weights)
    x = normalise(model, image)
    if weights is None:
        randomise(train_net, x)
    else:
        copy_ours_into(train_net.eval(), model)
    with torch.no_grad():
        conf = train_net(x)[0][1]
    shift = shift_face_logits(train_net, conf, candidates, model.score_thresh)
    test_net.load_state_dict(train_net.state_dict())
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "edgeml.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in train_net.state_dict().items()}}, path)
        model = leanvision.create_model(name, pretrained=path)
    return train_net, test_net.eval(), model.eval(), shift


def normalise(model: RNNPoolFace, image: torch.Tensor) -> torch.Tensor:
    """[1, C, H, W] as EdgeML feeds its nets: 0-255 pixels less the mean, not scaled."""
    mean = torch.tensor(model.image_mean).view(-1, 1, 1)
    return ((image - mean) / model.image_std[0])[None]


def edgeml_boxes(detections: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The face rows of EdgeML's [1, 2, TOP_K, 5] output (zero rows are padding): pixel boxes, scores."""
    rows = detections[0, 1]
    rows = rows[rows[:, 0] > 0]
    return rows[:, 1:] * torch.tensor([width, height, width, height]), rows[:, 0]


def compare_boxes(theirs: tuple[torch.Tensor, torch.Tensor], ours: dict[str, torch.Tensor]) -> dict:
    """Kept boxes of both pipelines; those of EdgeML's with no equal box of ours, and whether all of
    these are near-ties (greedy NMS keeps whichever of two equal scores float noise puts first)."""
    boxes, scores = theirs
    same = (box_iou(boxes, ours["boxes"]) > 0.999) & ((scores[:, None] - ours["scores"][None]).abs() < 1e-4)
    unmatched = ~same.any(1)
    near_ties = ((scores[:, None] - scores[None]).abs() < 1e-5).sum(1) > 1
    return dict(
        boxes_edgeml=len(boxes),
        boxes_ours=len(ours["boxes"]),
        boxes_unmatched=int(unmatched.sum()),
        boxes_match=len(boxes) == len(ours["boxes"]) and bool(near_ties[unmatched].all()),
    )


def compiled_copy(model: RNNPoolFace, x: torch.Tensor) -> RNNPoolFace:
    """A copy of (deploy-form) `model` whose head_outputs is compiled by torch.compile with inductor
    freezing, compiled now on x; its forward (decode, NMS) stays Python around it."""
    import torch._inductor.config as inductor_config

    compiled = copy.deepcopy(model)
    compiled.head_outputs = torch.compile(compiled.head_outputs, dynamic=False)  # one graph per size
    with torch.no_grad(), inductor_config.patch(freezing=True):
        compiled.head_outputs(x)
    return compiled


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def timed(calls: dict[str, Callable[[], object]], rounds: int) -> dict:
    """Median ms of EdgeML's call and of ours (eager, deploy, compile) over interleaved rounds after a
    warm-up, and EdgeML's time over eager's and over the faster of deploy and compile ('speedup')."""
    for _ in range(WARMUP):
        for call in calls.values():
            call()
    times = {name: statistics.median(t) for name, t in interleaved_ms(calls, rounds, 0.0).items()}
    return dict(
        edgeml_ms=times["edgeml"], eager_ms=times["eager"], deploy_ms=times["deploy"],
        compile_ms=times["compile"], ours=(best := min(("deploy", "compile"), key=times.get)),
        ours_ms=times[best], eager_speedup=times["edgeml"] / times["eager"],
        speedup=times["edgeml"] / times[best],
    )  # fmt: skip


def measure(
    name: str,
    module: types.ModuleType,
    size: tuple[int, int],
    rounds: int,
    candidates: int,
    weights: str | None,
) -> dict:
    """One row: output checks, forward and pipeline timings of one model at one input size (H, W)."""
    height, width = size
    channels = leanvision.create_model(name).in_chans
    image = benchmark_image(channels, height, width)
    train_net, test_net, model, shift = build_pair(name, module, image, candidates, weights)
    x = normalise(model, image)
    row: dict = dict(
        model=name,
        edgeml_class=EDGEML_MODELS[name],
        input=[1, channels, height, width],
        weights=weights or f"random (seed {SEED})",
        face_logit_shift=shift,
    )
    with torch.no_grad():
        (loc_e, conf_e, priors_e), _, _ = train_net(x)
        loc, conf, priors = model.head_outputs(x)
        scale = max(float(loc_e.abs().max()), float(conf_e.abs().max()))
        row.update(
            max_abs_output=scale,
            max_abs_diff_loc=max_abs_diff(loc_e, loc),
            max_abs_diff_conf=max_abs_diff(conf_e, conf),
            max_abs_diff_priors=max_abs_diff(priors_e, priors),
            candidates_edgeml=int((conf_e.softmax(-1)[0, :, 1] > model.score_thresh).sum()),
            candidates_ours=int((conf.softmax(-1)[0, :, 1] > model.score_thresh).sum()),
        )
        worst = max(row["max_abs_diff_loc"], row["max_abs_diff_conf"])
        row["outputs_match"] = worst <= OUTPUT_TOLERANCE * scale
        theirs = edgeml_boxes(test_net(normalise(model, image))[0], height, width)
        deploy = fuse_for_inference(model)
        compiled = compiled_copy(deploy, x)
        for name, net in (("deploy", deploy), ("compile", compiled)):
            row[f"{name}_max_abs_diff"] = max(map(max_abs_diff, (loc, conf), net.head_outputs(x)[:2]))
            row["outputs_match"] &= row[f"{name}_max_abs_diff"] <= OUTPUT_TOLERANCE * scale
        kept = {name: compare_boxes(theirs, net([image])[0]) for name, net in
                (("eager", model), ("deploy", deploy), ("compile", compiled))}  # fmt: skip
        pipeline = {**kept["deploy"], "boxes_match": all(k["boxes_match"] for k in kept.values())}
        forward = {
            "edgeml": lambda: train_net(x), "eager": lambda: model.head_outputs(x),
            "deploy": lambda: deploy.head_outputs(x), "compile": lambda: compiled.head_outputs(x),
        }  # fmt: skip
        row["forward"] = timed(forward, rounds)
        whole = {
            "edgeml": lambda: test_net(normalise(model, image)), "eager": lambda: model([image]),
            "deploy": lambda: deploy([image]), "compile": lambda: compiled([image]),
        }  # fmt: skip
        row["pipeline"] = {**timed(whole, rounds), **pipeline}
    for part, target in TARGETS.items():
        row[part].update(target=target, passed=row[part]["speedup"] >= target)
    return row


def latency_rows(
    models: tuple[str, ...] = ("rnnpool_face_quant", "rnnpool_face_m4"),
    sizes: tuple[tuple[int, int], ...] = ((480, 640), (240, 320)),
    rounds: int = 7,
    edgeml_dir: str | Path = "/work/peers/EdgeML",
    weights: dict[str, str] | None = None,
    threads: int | None = None,
    candidates: int = 300,
) -> list[dict]:
    """One row per model and input size (H, W): our forward and whole pipeline against EdgeML's, batch 1,
    with `threads` threads (default: all cores); `weights` maps a model to one of our checkpoints."""
    unknown = [m for m in models if m not in EDGEML_MODELS]
    if unknown:
        raise ValueError(f"no EdgeML model for {unknown}; known: {', '.join(EDGEML_MODELS)}")
    modules = load_edgeml(edgeml_dir)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        rows = []
        for name in models:
            for size in sizes:
                row = measure(name, modules[name], size, rounds, candidates, (weights or {}).get(name))
                rows.append({**row, "threads": torch.get_num_threads(), "rounds": rounds})
    finally:
        torch.set_num_threads(previous)
    return rows


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def print_summary(rows: list[dict]) -> None:
    print(
        f"{'model':<20}{'input':>9} {'part':<9}{'EdgeML ms':>10}{'eager ms':>9}{'x':>6}{'deploy':>8}"
        f"{'compile':>8}{'x':>6}{'target':>7}  "
        f"{'verdict':<8}{'max|d| loc/conf':>17}  boxes EdgeML/ours"
    )
    for row in rows:
        size = f"{row['input'][3]}x{row['input'][2]}"
        for part in TARGETS:
            r = row[part]
            diffs = f"{row['max_abs_diff_loc']:.1e}/{row['max_abs_diff_conf']:.1e}"
            diff = diffs if part == "forward" else ""
            boxes = (
                f"{r['boxes_edgeml']}/{r['boxes_ours']} of {row['candidates_edgeml']}/"
                f"{row['candidates_ours']} ({'match' if r['boxes_match'] else 'DIFFER'})"
                if part == "pipeline"
                else ""
            )
            print(
                f"{row['model']:<20}{size:>9} {part:<9}{r['edgeml_ms']:>10.1f}{r['eager_ms']:>9.1f}"
                f"{r['eager_speedup']:>5.1f}x{r['deploy_ms']:>8.1f}{r['compile_ms']:>8.1f}"
                f"{r['speedup']:>5.1f}x{r['target']:>6.0f}x  "
                f"{'PASS' if r['passed'] else 'MISS':<8}"
                f"{diff:>17}  {boxes}"
            )
    print(
        "median of interleaved rounds; x: EdgeML ms over eager ms, and over the faster of deploy and compile"
        " (the target's); boxes kept of candidates above the confidence threshold"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edgeml-dir", required=True, help="EdgeML checkout (examples/ and pytorch/)")
    parser.add_argument("--models", default="rnnpool_face_quant,rnnpool_face_m4")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--candidates", type=int, default=300, help="priors above the threshold")
    parser.add_argument("--out", type=Path, default=Path("results/face_latency.json"))
    args = parser.parse_args()
    rows = latency_rows(
        tuple(m for m in args.models.split(",") if m),
        rounds=args.rounds,
        edgeml_dir=args.edgeml_dir,
        threads=args.threads,
        candidates=args.candidates,
    )
    report = dict(
        torch=torch.__version__,
        python=platform.python_version(),
        threads=rows[0]["threads"] if rows else None,
        cpu=cpu_name(),
        cpu_count=os.cpu_count(),
        edgeml_dir=str(args.edgeml_dir),
        rows=rows,
    )
    ok = all(r["outputs_match"] and r["pipeline"]["boxes_match"] for r in rows)
    return finish(args.out, report, lambda: print_summary(rows), ok, "EdgeML's and our outputs differ")


if __name__ == "__main__":
    sys.exit(main())
