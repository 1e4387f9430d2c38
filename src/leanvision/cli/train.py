"""Commands that train and evaluate one model: `train` and `eval`."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from leanvision.cli.common import (
    AutoDeviceOpt,
    DataImgSizeOpt,
    DeviceOpt,
    ForwardBatchOpt,
    JsonOpt,
    ModelOpt,
    RunImgSizeOpt,
    StrictOpt,
    console,
    fail,
    run,
)


def train(
    ctx: typer.Context,
    model: ModelOpt,
    data: Annotated[str, typer.Option(help="Dataset spec, e.g. synthetic:lines, fashion-mnist, folder:DIR.")],
    task: TaskOpt = "classification",
    epochs: Annotated[int, typer.Option(help="Epochs to train (a resumed run may raise it).")] = 10,
    batch_size: Annotated[
        int | None, typer.Option(help="Images per step and process (default 64; detection 32).")
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="Peak learning rate (default 0.05; detection 0.01).")
    ] = None,
    opt: Annotated[str, typer.Option(help="sgd or adamw.")] = "sgd",
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    nesterov: Annotated[bool, typer.Option("--nesterov", help="Nesterov momentum.")] = False,
    wd: Annotated[
        float | None, typer.Option(help="Weight decay on weights only (default 5e-5; detection 5e-4).")
    ] = None,
    sched: Annotated[str, typer.Option(help="cosine, step (x0.1 at 50% and 75%) or none.")] = "cosine",
    warmup_epochs: Annotated[
        int | None, typer.Option(help="Epochs of linear learning-rate warm-up (default 0; detection 5).")
    ] = None,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing.")] = 0.0,
    img_size: DataImgSizeOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of weights, order and augmentation.")] = 0,
    out: Annotated[str | None, typer.Option(help="Output folder (default runs/MODEL).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from last.pt.")] = False,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 0,
    device: AutoDeviceOpt = None,
    amp: Annotated[bool, typer.Option(help="Mixed precision on CUDA.")] = True,
    channels_last: Annotated[
        bool, typer.Option("--channels-last", help="NHWC memory format (faster convolutions on CPU).")
    ] = False,
    strict: StrictOpt = False,
) -> None:
    """Train a model; writes last.pt, metrics.csv, summary.json and curves.png to --out.

    --task detection trains a face detector (rnnpool_face_*) with S3FD's loss and WIDER-style AP, or an
    object detector (ssdlite_*, fasterrcnn_fpn_*) with its own loss and COCO AP, on a detection spec
    (synthetic:faces, synthetic:shapes-boxes, widerface:DIR, scut-head:DIR, coco-boxes:DIR).
    Data-parallel: torchrun --nproc_per_node N $(which leanvision) train ... (gloo on CPU, nccl on CUDA).
    Ctrl-C saves the last finished epoch and exits 130 (status interrupted); SIGTERM saves it too, records
    status terminated and exits 143.
    """
    from leanvision.engine.train import NonFiniteLossError, TrainConfig
    from leanvision.engine.train import train as run_training

    run_task = run(lambda: _task(task, model))
    if resume:
        _refuse_ignored_flags(ctx, out or f"runs/{model}")
    given = {"batch_size": batch_size, "lr": lr, "wd": wd, "warmup_epochs": warmup_epochs}
    defaults = {}
    if task == "detection":
        defaults = dict(run_task.defaults, warmup_epochs=min(run_task.defaults["warmup_epochs"], epochs))
    settings = {**defaults, **{k: v for k, v in given.items() if v is not None}}
    config = TrainConfig(
        model=model, data=data, epochs=epochs, opt=opt, momentum=momentum, nesterov=nesterov, sched=sched,
        label_smoothing=label_smoothing, img_size=img_size, seed=seed, out=out or f"runs/{model}",
        resume=resume, workers=workers, device=device, amp=amp, channels_last=channels_last, strict=strict,
        task=task,
        **settings,
    )  # fmt: skip
    try:
        result = run(lambda: run_training(config, task=run_task))
    except NonFiniteLossError as err:
        fail(str(err), code=1)
    if result.status == "interrupted":
        raise typer.Exit(130)
    if result.main_process:
        score = (
            f"val AP {result.val['ap']:.4f}" if task == "detection" else f"val acc {result.val['acc']:.2f}%"
        )
        console.print(f"{result.status}: {score}; results in {result.out}")


TaskOpt = Annotated[str, typer.Option(help="classification or detection.")]


def _refuse_ignored_flags(ctx: typer.Context, out: str) -> None:
    """A resumed run keeps its checkpoint's settings (engine.train.RUN_SETTINGS excepted): a flag given on
    the command line with another value would be ignored silently, so it is refused, each one named."""
    from pathlib import Path

    from leanvision.engine.train import RUN_SETTINGS
    from leanvision.engine.train_state import read_training_config

    saved = read_training_config(Path(out) / "last.pt")
    if saved is None:
        return  # no readable checkpoint: the engine says what is wrong with it
    ignored = [
        f"--{name.replace('_', '-')} {value} (the run's: {saved[name]})"
        for name, value in ctx.params.items()
        if name in saved and name not in RUN_SETTINGS and value != saved[name]
        and getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"  # typer vendors click
    ]  # fmt: skip
    if ignored:
        fail(
            f"--resume continues {out}/last.pt with its own settings; these flags differ from them and would "
            f"be ignored: {', '.join(ignored)}. Drop them, or start a new run with another --out"
        )


def _task(name: str, model: str):
    """The engine task named by --task, for `model` (detection: a face or an object detector's)."""
    if name == "classification":
        from leanvision.engine.train import ClassificationTask

        return ClassificationTask()
    if name == "detection":
        from leanvision.detection.task import detection_task

        return detection_task(model)
    fail(f"--task must be classification or detection, got {name!r}")


def evaluate(
    data: Annotated[str, typer.Option(help="Dataset spec; its validation split is evaluated.")],
    model: Annotated[str | None, typer.Option(help="Registered model name.")] = None,
    checkpoint: Annotated[
        str | None, typer.Option(help="Weights file (a training last.pt or any checkpoint).")
    ] = None,
    task: TaskOpt = "classification",
    baseline: Annotated[
        str | None, typer.Option(help="Detection only: evaluate a classical baseline instead (haar).")
    ] = None,
    multiscale: Annotated[
        bool, typer.Option("--multiscale", help="Detection: S3FD's multi-scale test.")
    ] = False,
    flip: Annotated[bool, typer.Option("--flip", help="Detection: add a horizontally flipped pass.")] = False,
    backend: Annotated[
        str, typer.Option(help="eager, ort (ONNX Runtime, fp32) or ort-int8 (static int8, calibrated).")
    ] = "eager",
    calib: Annotated[
        str | None, typer.Option(help="ort-int8: calibration data spec (default: --data's training images).")
    ] = None,
    calib_method: Annotated[str, typer.Option(help="ort-int8: minmax, entropy or percentile.")] = "minmax",
    per_channel: Annotated[
        bool, typer.Option("--per-channel", help="ort-int8: per-channel weights.")
    ] = False,
    img_size: RunImgSizeOpt = None,
    batch_size: ForwardBatchOpt = 256,
    device: DeviceOpt = "cpu",
    strict: StrictOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a checkpoint on a dataset's validation split: loss and accuracy, or (--task detection) WIDER
    FACE AP per subset (easy / medium / hard, and on images with <= 3 faces), single-scale by default."""
    if task not in ("classification", "detection"):
        fail(f"--task must be classification or detection, got {task!r}")
    if backend not in ("eager", "ort", "ort-int8"):
        fail(f"--backend must be eager, ort or ort-int8, got {backend!r}")
    if backend != "ort-int8" and (calib is not None or per_channel or calib_method != "minmax"):
        fail("--calib, --calib-method and --per-channel go with --backend ort-int8")
    if backend == "ort-int8":
        from leanvision.export import CALIBRATION_METHODS

        if calib_method not in CALIBRATION_METHODS:
            known = f"{', '.join(CALIBRATION_METHODS[:-1])} or {CALIBRATION_METHODS[-1]}"
            fail(f"--calib-method must be {known}, got {calib_method!r}")
    if task == "detection" and backend != "eager":
        fail("--task detection evaluates eager PyTorch only; export detectors with `leanvision export`")
    if task == "detection":
        from leanvision.detection.task import evaluate_detection

        options = {"multiscale": multiscale, "flip": flip}
        metrics = run(
            lambda: evaluate_detection(
                model, checkpoint, data, baseline, min(batch_size, 16), device, strict, **options
            )
        )
    else:
        if model is None or checkpoint is None or baseline is not None:
            fail("classification eval needs --model and --checkpoint (--baseline is for --task detection)")
        if backend == "eager":
            from leanvision.engine.train import evaluate_checkpoint

            metrics = run(
                lambda: evaluate_checkpoint(model, checkpoint, data, img_size, batch_size, device, strict)
            )
        else:
            from leanvision.export import evaluate_exported

            metrics = run(
                lambda: evaluate_exported(
                    model,
                    checkpoint,
                    data,
                    backend,
                    img_size,
                    batch_size,
                    calib,
                    strict=strict,
                    method=calib_method,
                    per_channel=per_channel,
                )  # fmt: skip
            )
    if as_json:
        print(json.dumps(metrics))
        return
    name = baseline or model
    if task == "detection":
        coco = "ap50" in metrics
        protocol = "COCO box AP" if coco else "WIDER FACE protocol"
        table = Table(
            "IoU" if coco else "subset",
            "AP",
            title=f"{name} on {data} ({metrics['images']} images), {protocol}",
        )
        for key, value in metrics.items():
            if coco and key.startswith("ap"):
                table.add_row({"ap": "0.50:0.95", "ap50": "0.50", "ap75": "0.75"}[key], f"{value:.4f}")
            elif key.startswith("ap_"):
                table.add_row(key[3:], f"{value:.4f}")
        console.print(table)
        return
    extra = f", per-label accuracy {metrics['label_acc']:.2f}%" if "label_acc" in metrics else ""
    via = "" if backend == "eager" else f" via {backend}"
    console.print(
        f"[bold]{name}[/bold]{via} on {data} ({metrics['samples']} images): loss {metrics['loss']:.4f}, "
        f"accuracy {metrics['acc']:.2f}%{extra}"
    )
