"""Commands that train and evaluate one model: `train` and `eval`."""

from __future__ import annotations

import json
from typing import Annotated

import typer

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
    model: ModelOpt,
    data: Annotated[str, typer.Option(help="Dataset spec, e.g. synthetic:lines, fashion-mnist, folder:DIR.")],
    epochs: Annotated[int, typer.Option(help="Epochs to train (a resumed run may raise it).")] = 10,
    batch_size: Annotated[int, typer.Option(help="Images per step and process.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 0.05,
    opt: Annotated[str, typer.Option(help="sgd or adamw.")] = "sgd",
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    nesterov: Annotated[bool, typer.Option("--nesterov", help="Nesterov momentum.")] = False,
    wd: Annotated[float, typer.Option(help="Weight decay (weights only, not biases or norms).")] = 5e-5,
    sched: Annotated[str, typer.Option(help="cosine, step (x0.1 at 50% and 75%) or none.")] = "cosine",
    warmup_epochs: Annotated[int, typer.Option(help="Epochs of linear learning-rate warm-up.")] = 0,
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

    Data-parallel: torchrun --nproc_per_node N $(which leanvision) train ... (gloo on CPU, nccl on CUDA).
    """
    from leanvision.engine.train import NonFiniteLossError, TrainConfig
    from leanvision.engine.train import train as run_training

    config = TrainConfig(
        model=model, data=data, epochs=epochs, batch_size=batch_size, lr=lr, opt=opt, momentum=momentum,
        nesterov=nesterov, wd=wd, sched=sched, warmup_epochs=warmup_epochs, label_smoothing=label_smoothing,
        img_size=img_size, seed=seed, out=out or f"runs/{model}", resume=resume, workers=workers,
        device=device, amp=amp, channels_last=channels_last, strict=strict,
    )  # fmt: skip
    try:
        result = run(lambda: run_training(config))
    except NonFiniteLossError as err:
        fail(str(err), code=1)
    if result.status == "interrupted":
        raise typer.Exit(130)
    if result.main_process:
        console.print(f"{result.status}: val acc {result.val['acc']:.2f}%; results in {result.out}")


def evaluate(
    model: ModelOpt,
    checkpoint: Annotated[str, typer.Option(help="Weights file (a training last.pt or any checkpoint).")],
    data: Annotated[str, typer.Option(help="Dataset spec; its validation split is evaluated.")],
    img_size: RunImgSizeOpt = None,
    batch_size: ForwardBatchOpt = 256,
    device: DeviceOpt = "cpu",
    strict: StrictOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a checkpoint on a dataset's validation split: loss and accuracy."""
    from leanvision.engine.train import evaluate_checkpoint

    metrics = run(lambda: evaluate_checkpoint(model, checkpoint, data, img_size, batch_size, device, strict))
    if as_json:
        print(json.dumps(metrics))
        return
    extra = f", per-label accuracy {metrics['label_acc']:.2f}%" if "label_acc" in metrics else ""
    console.print(
        f"[bold]{model}[/bold] on {data} ({metrics['samples']} images): loss {metrics['loss']:.4f}, "
        f"accuracy {metrics['acc']:.2f}%{extra}"
    )
