"""Train and evaluate classifiers: one process, or data-parallel under `torchrun` (DDP).

A run writes to its output folder: `last.pt` after every epoch (see engine/train_state.py),
`metrics.csv` (one row per epoch), `summary.json` and `curves.png` at the end. `resume=True` continues
from `last.pt` exactly: the epoch after a resume has the same metrics as in an uninterrupted run.
That holds because each epoch's order of samples depends only on (seed, epoch) and every random
generator is saved with the weights. Every file is written atomically, so a process killed at any moment
(`kill -9`) leaves whole files: `last.pt` of the last completed epoch and `metrics.csv` of that epoch or the
one before (a resume rewrites it from the checkpoint). Ctrl-C keeps `last.pt` and writes the summary
(status "interrupted"); SIGTERM does the same (status "terminated") and then ends the process as SIGTERM
does; a non-finite loss stops the run with `NonFiniteLossError`, `last.pt` untouched.

Multi-label datasets train with a per-label sigmoid (BCE) loss and report exact-match accuracy (`acc`:
every label right) and per-label accuracy (`label_acc`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from leanvision.bench import check_device
from leanvision.engine.data import DataSplits, build_dataset
from leanvision.engine.task import StepMeter, Task
from leanvision.engine.train_state import (
    load_training_checkpoint,
    rng_state,
    save_atomic,
    set_rng_state,
    temporary_path,
    training_config_of,
    write_text_atomic,
)
from leanvision.errors import InvalidArgumentError, OutputError
from leanvision.models.weights import load_checkpoint

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "none")
# Settings a resumed run takes from its checkpoint (the rest may change between sessions).
RUN_SETTINGS = ("epochs", "out", "resume", "workers", "device", "progress")
RUN_FILES = ("last.pt", "metrics.csv", "summary.json")  # written atomically (train_state.write_atomic)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class TrainConfig:
    """One training run. `batch_size` is per process (the global batch is world size x batch_size)."""

    model: str
    data: str
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    opt: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    wd: float = 5e-5
    sched: str = "cosine"
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    img_size: int | None = None
    seed: int = 0
    out: str = "runs/train"
    resume: bool = False
    workers: int = 0
    device: str | None = None
    amp: bool = True
    channels_last: bool = False
    strict: bool = False
    progress: bool = True
    task: str = "classification"

    def check(self) -> None:
        """Raise a ValueError naming the first bad setting."""
        if self.opt not in OPTIMIZERS:
            raise InvalidArgumentError(f"opt must be one of {OPTIMIZERS}, got {self.opt!r}")
        if self.sched not in SCHEDULES:
            raise InvalidArgumentError(f"sched must be one of {SCHEDULES}, got {self.sched!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.workers < 0:
            raise InvalidArgumentError(
                f"need epochs >= 1, batch_size >= 1, workers >= 0; got {self.epochs}, {self.batch_size}, "
                f"{self.workers}"
            )
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise InvalidArgumentError(
                f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}"
            )
        finite = all(math.isfinite(v) for v in (self.lr, self.wd, self.label_smoothing, self.momentum))
        if (
            not finite
            or not self.lr > 0
            or not self.wd >= 0
            or not 0 <= self.label_smoothing < 1
            or not (0 <= self.momentum < 1)
        ):
            raise InvalidArgumentError(
                "need finite lr > 0, wd >= 0, 0 <= label_smoothing < 1, 0 <= momentum < 1; got "
                f"lr={self.lr}, wd={self.wd}, label_smoothing={self.label_smoothing}, "
                f"momentum={self.momentum}"
            )
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError:
                raise InvalidArgumentError(
                    f"device must be cpu, cuda or cuda:N, got {self.device!r}"
                ) from None
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise InvalidArgumentError(f"out {self.out} is a file; the run needs a folder")
        check_writable_folder(Path(self.out))


def _nearest_existing(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists())


def check_writable_folder(out: Path) -> None:
    """Raise an OutputError if the folder `out` cannot be created or written (its nearest existing
    ancestor is a file, or is not writable: no permission, a read-only file system)."""
    existing = _nearest_existing(out)
    if not existing.is_dir():
        raise OutputError(f"cannot create the output folder {out}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to the output folder {out}: {existing} is not writable")


@dataclass
class Dist:
    """This process's place in a (possibly one-process) data-parallel run."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None) -> Dist:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA) when WORLD_SIZE > 1."""
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device {device!r} was asked for but torch.cuda.is_available() is False")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device(device or ("cuda" if use_cuda else "cpu")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return Dist(dist.get_rank(), world, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_model(name: str, data: DataSplits) -> nn.Module:
    """The registered model `name` sized for `data` (classes, and input channels when not 3)."""
    from leanvision.models.registry import create_model

    kwargs: dict[str, Any] = {"num_classes": data.num_classes}
    if data.channels != 3:
        kwargs["in_chans"] = data.channels
    try:
        return create_model(name, **kwargs)
    except TypeError as err:
        if "in_chans" not in str(err):
            raise
        raise InvalidArgumentError(
            f"model {name!r} takes 3-channel images (it has no in_chans option) but {data.spec!r} has "
            f"{data.channels}-channel images"
        ) from err


def check_model_fits(model: nn.Module, data: DataSplits, name: str) -> None:
    """One eval forward of two validation images: raise a ValueError if sizes or class counts disagree."""
    images = torch.stack([data.val[i][0] for i in range(min(2, len(data.val)))])
    device = next(model.parameters()).device
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(images.to(device))
    except (ValueError, RuntimeError) as err:
        raise InvalidArgumentError(
            f"model {name!r} cannot take the {list(images.shape[1:])} images of {data.spec!r}: {err} "
            "(change --img-size)"
        ) from err
    finally:
        model.train(was_training)
    if out.ndim != 2 or out.shape[1] != data.num_classes:
        raise InvalidArgumentError(
            f"model {name!r} gives {list(out.shape[1:])} outputs per image but {data.spec!r} has "
            f"{data.num_classes} classes"
        )


def check_free_space(out: Path, model: nn.Module, config: TrainConfig) -> None:
    """Raise an OutputError if the disk of `out` cannot hold one checkpoint: the weights and the optimizer's
    copies of them (a momentum buffer for SGD, two moments for AdamW)."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    needed = weights * (3 if config.opt == "adamw" else 1 + (config.momentum > 0))
    free = shutil.disk_usage(_nearest_existing(out)).free
    if free < needed:
        raise OutputError(
            f"the disk of {out} has {free:,} bytes free; a checkpoint of this model needs {needed:,}"
        )


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW; weight decay on weight matrices and kernels only (not on biases, norms or scalars)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.wd}, {"params": no_decay, "weight_decay": 0.0}]
    if config.opt == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    return torch.optim.AdamW(groups, lr=config.lr)


def lr_factor(step: int, total: int, warmup: int, sched: str) -> float:
    """Learning-rate multiplier at optimizer step `step` of `total`: linear warm-up over `warmup` steps,
    then cosine to 0, x0.1 at 50% and again at 75% of the steps ("step"), or constant ("none")."""
    if step < warmup:
        return (step + 1) / warmup
    if sched == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    if sched == "step":
        return 0.1 ** sum(step >= total * m for m in (0.5, 0.75))
    return 1.0


def make_loader(dataset: Dataset, batch_size: int, workers: int, sampler=None, collate=None) -> DataLoader:
    return DataLoader(
        dataset, batch_size, sampler=sampler, num_workers=workers, persistent_workers=False, drop_last=False,
        collate_fn=collate,
    )  # fmt: skip


class Meter(StepMeter):
    """Sums of loss, exact-match hits, per-label hits and samples, reduced over processes on demand."""

    def __init__(self, num_labels: int, multilabel: bool, device: torch.device) -> None:
        self.multilabel = multilabel
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, exact hits, n
        self.label_hits = torch.zeros(num_labels if multilabel else 0, dtype=torch.float64, device=device)

    def update(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        n = targets.shape[0]
        if self.multilabel:
            right = (logits > 0) == (targets > 0.5)
            self.label_hits += right.sum(0)
            hits = right.all(1).sum()
        else:
            hits = (logits.argmax(1) == targets).sum()
        self.sums += torch.stack([loss.detach().double() * n, hits.double(), hits.new_tensor(n).double()])

    def result(self) -> dict[str, Any]:
        """loss, acc (%) and, for multi-label data, label_acc (%) and per_label_acc (% per label)."""
        if dist.is_initialized():
            dist.all_reduce(self.sums)
            if self.multilabel:
                dist.all_reduce(self.label_hits)
        loss, hits, n = self.sums.tolist()
        out = {"loss": loss / n, "acc": 100 * hits / n, "samples": int(n)}
        if self.multilabel:
            per_label = (100 * self.label_hits / n).tolist()
            out.update(label_acc=sum(per_label) / len(per_label), per_label_acc=per_label)
        return out


def make_criterion(
    multilabel: bool, label_smoothing: float
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy, or per-label BCE-with-logits whose targets are smoothed towards 1/2."""
    if not multilabel:
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    bce = nn.BCEWithLogitsLoss()
    return lambda logits, targets: bce(logits, targets * (1 - label_smoothing) + label_smoothing / 2)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    multilabel: bool = False,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    workers: int = 0,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Loss and accuracy of `model` (eval mode) over `dataset`; under DDP each process takes a shard."""
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    if dist.is_initialized():
        dataset = Subset(dataset, range(dist.get_rank(), len(dataset), dist.get_world_size()))
    criterion = make_criterion(multilabel, 0.0)
    was_training = model.training
    model.eval()
    meter = None
    for images, targets in make_loader(dataset, batch_size, workers):
        images, targets = _to_device(images, device, channels_last), targets.to(device, non_blocking=True)
        with autocast(device):
            logits = model(images).float()
        meter = meter or Meter(logits.shape[1], multilabel, device)
        meter.update(criterion(logits, targets), logits, targets)
    model.train(was_training)
    if meter is None:
        raise InvalidArgumentError("cannot evaluate on an empty dataset")
    return meter.result()


class ClassificationTask(Task):
    """Single- or multi-label image classification on a `build_dataset` spec (the default task)."""

    name = "classification"
    metric = "acc"
    train_columns = ("loss", "acc")
    val_columns = ("loss", "acc", "label_acc")

    def build_data(self, config: TrainConfig) -> DataSplits:
        return build_dataset(config.data, config.img_size, config.strict)

    def make_model(self, config: TrainConfig, data: DataSplits) -> nn.Module:
        return make_model(config.model, data)

    def check_model_fits(self, model: nn.Module, data: DataSplits, name: str) -> None:
        check_model_fits(model, data, name)

    def to_device(self, batch, device: torch.device, config: TrainConfig) -> tuple[torch.Tensor, ...]:
        images, targets = batch
        return _to_device(images, device, config.channels_last), targets.to(device, non_blocking=True)

    def loss(self, net, inputs, targets, config) -> tuple[torch.Tensor, torch.Tensor]:
        logits = net(inputs).float()
        multilabel = targets.is_floating_point()
        loss = make_criterion(multilabel, config.label_smoothing)(logits, targets)
        return loss, logits.detach()

    def train_meter(self, data: DataSplits, device: torch.device) -> Meter:
        return Meter(data.num_classes, data.multilabel, device)

    def evaluate(self, model, data: DataSplits, config: TrainConfig, device: torch.device) -> dict[str, Any]:
        return evaluate(
            model, data.val, data.multilabel, config.batch_size, device, config.workers, config.channels_last
        )


def _to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    return images.to(device, non_blocking=True, memory_format=memory_format)


def autocast(device: torch.device, enabled: bool = True):
    """fp16 autocast on CUDA, nothing elsewhere."""
    return torch.autocast("cuda", dtype=torch.float16) if enabled and device.type == "cuda" else nullcontext()


def write_metrics_csv(history: list[dict[str, Any]], path: Path) -> None:
    """One row per epoch of `history`, written atomically (the whole file each time)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(text.getvalue(), path)


def plot_curves(history: list[dict[str, Any]], path: Path, metric: str = "acc") -> None:
    """Loss and `metric` per epoch, train and validation (where the history has them), side by side."""
    from leanvision.plotting import new_figure, save_figure

    epochs = [row["epoch"] for row in history]
    fig, axes = new_figure(1, 2, figsize=(10, 4))
    for ax, name in zip(axes, ("loss", metric)):
        for split in ("train", "val"):
            if f"{split}_{name}" in history[0]:
                ax.plot(epochs, [row[f"{split}_{name}"] for row in history], marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel({"acc": "accuracy (%)", "loss": "loss"}.get(name, name))
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path, dpi=100)


@dataclass
class TrainResult:
    """What `train` returns: how the run ended, its per-epoch metrics and the final evaluation."""

    status: str  # "completed", "stopped" (by on_epoch_end), "interrupted" (Ctrl-C), "terminated" (SIGTERM)
    history: list[dict[str, Any]]
    val: dict[str, Any]
    out: Path
    model: nn.Module
    main_process: bool = True  # False on the other ranks of a data-parallel run

    def raise_if_interrupted(self) -> None:
        """Re-raise the Ctrl-C (or SIGTERM) that ended this run: a caller running several must stop too
        (its `out` keeps the last finished epoch, which the same call with resume continues)."""
        if self.status in ("interrupted", "terminated"):
            raise KeyboardInterrupt


def _resume_config(config: TrainConfig, state: dict[str, Any], path: Path) -> TrainConfig:
    """The checkpoint's settings, except those in RUN_SETTINGS; another model or data spec raises."""
    saved = state["config"]
    for key in ("model", "data", "task"):
        if saved.get(key, "classification") != getattr(config, key):
            raise InvalidArgumentError(
                f"cannot resume: {path} is a checkpoint of {key} {saved[key]!r}, not {getattr(config, key)!r}"
            )
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(
        **{**{k: v for k, v in saved.items() if k in known}, **{k: getattr(config, k) for k in RUN_SETTINGS}}
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: the run stops as on Ctrl-C."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (`kill`, a scheduler's stop before preemption) handled as Ctrl-C is: the run stops, says
    where its last epoch is and writes its summary (status "terminated"). Then the signal goes on to the
    handler that was there before, so that by default the process ends as SIGTERM ends it (exit status
    143), which tells a scheduler what happened. Only in the main thread, where Python can install
    handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = False

    def terminate(signum: int, frame: Any) -> None:
        nonlocal received
        received = True
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if received:
            sys.stdout.flush()  # the default action ends the process without flushing Python's buffers
            sys.stderr.flush()
            signal.raise_signal(signal.SIGTERM)


def train(
    config: TrainConfig,
    model: nn.Module | None = None,
    data: DataSplits | None = None,
    on_epoch_end: Callable[[dict[str, Any]], bool | None] | None = None,
    task: Task | None = None,
) -> TrainResult:
    """Train `config.model` (or the given module, named by config.model) on `config.data` (or `data`).

    `on_epoch_end(row)` gets each epoch's metrics row; returning True stops the run after that epoch.
    `task` (default: classification) supplies data, model, loss and metrics; it must be `config.task`.
    """
    config.check()
    task = task or ClassificationTask()
    if task.name != config.task:
        raise InvalidArgumentError(f"config.task is {config.task!r} but a {task.name!r} task was given")
    out = Path(config.out)
    checkpoint_path = out / "last.pt"
    state = None
    if config.resume:
        state = load_training_checkpoint(checkpoint_path)
        config = _resume_config(config, state, checkpoint_path)
    elif checkpoint_path.exists():
        raise InvalidArgumentError(
            f"{out} already holds a run ({checkpoint_path}); pass --resume or another --out"
        )
    for name in RUN_FILES:
        temporary_path(out / name).unlink(missing_ok=True)  # a write a crash cut short
    ctx = setup_distributed(config.device)
    with sigterm_as_interrupt():
        try:
            result = _train(config, model, data, on_epoch_end, state, ctx, task)
            if ctx.world > 1:  # leave together: a rank tearing gloo down while rank 0 still writes can abort
                dist.barrier()
            return result
        finally:  # a process that exits with gloo's threads alive can abort ("terminate called ...")
            if ctx.world > 1:
                dist.destroy_process_group()


def _train(
    config: TrainConfig,
    model: nn.Module | None,
    data: DataSplits | None,
    on_epoch_end: Callable[[dict[str, Any]], bool | None] | None,
    state: dict[str, Any] | None,
    ctx: Dist,
    task: Task,
) -> TrainResult:
    out = Path(config.out)
    checkpoint_path = out / "last.pt"
    seed_everything(config.seed)
    data = data or task.build_data(config)
    model = (model or task.make_model(config, data)).to(ctx.device)
    if config.channels_last:  # NHWC: faster convolutions (and their backward) on CPU and on tensor cores
        model = model.to(memory_format=torch.channels_last)
    task.check_model_fits(model, data, config.model)

    sampler = DistributedSampler(data.train, ctx.world, ctx.rank, shuffle=True, seed=config.seed)
    loader = make_loader(data.train, config.batch_size, config.workers, sampler, task.collate)
    optimizer = build_optimizer(model, config)
    steps = len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, config.epochs * steps, config.warmup_epochs * steps, config.sched),
    )
    amp = config.amp and ctx.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if state is not None and state.get("world_size", ctx.world) != ctx.world:
        raise InvalidArgumentError(
            f"cannot resume: {checkpoint_path} was trained by {state['world_size']} process(es), this run "
            f"has {ctx.world}; the global batch and the data order would change. Resume with "
            f"{state['world_size']} process(es)"
        )
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):  # the schedule of this run's
            group["lr"] = base * lr_factor(  # epochs: a raised --epochs continues the cosine, not at 0
                scheduler.last_epoch, config.epochs * steps, config.warmup_epochs * steps, config.sched
            )
        scaler.load_state_dict(state["scaler"])
        history, start_epoch = list(state["history"]), state["epoch"]
        set_rng_state(state["rng"])
    check_free_space(out, model, config)
    net = nn.parallel.DistributedDataParallel(model) if ctx.world > 1 else model
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)

    status, started, val = "completed", time.perf_counter(), None
    try:
        for epoch in range(start_epoch, config.epochs):
            sampler.set_epoch(epoch)
            tic, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
            train_metrics = _train_epoch(
                net, loader, task, optimizer, scheduler, scaler, data, ctx, amp, epoch, config
            )
            val = task.evaluate(model, data, config, ctx.device)
            row = {"epoch": epoch + 1, "lr": lr}
            row.update({f"train_{k}": v for k, v in train_metrics.items() if k in task.train_columns})
            row.update({f"val_{k}": v for k, v in val.items() if k in task.val_columns})
            row["time_s"] = round(time.perf_counter() - tic, 3)
            if ctx.main:
                save_atomic(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "epoch": epoch + 1,
                        "history": [*history, row],
                        "config": asdict(config),
                        "rng": rng_state(),
                        "world_size": ctx.world,
                    },
                    checkpoint_path,
                )
            history.append(row)  # after the save: an interrupted save leaves history as last.pt has it
            if ctx.main:
                write_metrics_csv(history, out / "metrics.csv")
                if config.progress:
                    _print_row(row, config.epochs, task)
            if on_epoch_end is not None and on_epoch_end(row):
                status = "stopped"
                break
    except KeyboardInterrupt as stop:
        status = "terminated" if isinstance(stop, Terminated) else "interrupted"
        if ctx.main:
            done = history[-1]["epoch"] if history else start_epoch
            print(f"{status}: {checkpoint_path} holds epoch {done}; continue with --resume")
    if val is None:  # nothing ran in this session
        val = task.evaluate(model, data, config, ctx.device)
    if ctx.main and history:  # metrics.csv again: a run killed between last.pt and it has lost a row
        write_metrics_csv(history, out / "metrics.csv")
        _write_summary(out, config, status, history, val, model, ctx, time.perf_counter() - started, task)
        plot_curves(history, out / "curves.png", task.metric)
    return TrainResult(status, history, val, out, model, ctx.main)


def _train_epoch(net, loader, task, optimizer, scheduler, scaler, data, ctx, amp, epoch, config):
    net.train()
    meter = task.train_meter(data, ctx.device)
    progress = _progress_bar(ctx.main and config.progress, f"epoch {epoch + 1}/{config.epochs}", len(loader))
    with progress as bar:
        bar_task = bar.add_task("train", total=len(loader), loss=float("nan"))
        for step, batch in enumerate(loader):
            inputs, targets = task.to_device(batch, ctx.device, config)
            with autocast(ctx.device, amp):
                loss, outputs = task.loss(net, inputs, targets, config)
            checked = loss.detach().clone()
            if ctx.world > 1:  # every process sees a non-finite loss together, so all stop at once
                dist.all_reduce(checked)
            if not torch.isfinite(checked):
                checkpoint = Path(config.out) / "last.pt"
                kept = (
                    f"{checkpoint} keeps the last good epoch ({epoch})"
                    if checkpoint.exists()
                    else "no checkpoint was written"
                )
                raise NonFiniteLossError(
                    f"loss is {checked.item()} at epoch {epoch + 1}, step {step + 1}: training stopped; "
                    f"{kept}. Try a lower --lr or check the data"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            meter.update(loss, outputs, targets)
            bar.update(bar_task, advance=1, loss=loss.item())
    return meter.result()


def _progress_bar(enabled: bool, title: str, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn(title),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        disable=not (enabled and sys.stdout.isatty()),
        transient=True,
    )


def _print_row(row: dict[str, Any], epochs: int, task: Task) -> None:
    columns = [f"{split}_{k}" for split in ("train", "val") for k in getattr(task, f"{split}_columns")]
    metrics = []
    for key in (c for c in columns if c in row):
        split, name = key.split("_", 1)
        value = f"{row[key]:.2f}%" if name.endswith("acc") else f"{row[key]:.4f}"
        metrics.append(f"{split} {name.replace('_', ' ')} {value}")
    print(f"epoch {row['epoch']}/{epochs}: lr {row['lr']:.4g}, {', '.join(metrics)} ({row['time_s']:.1f} s)")


def _write_summary(out, config, status, history, val, model, ctx, seconds, task) -> None:
    best = max(history, key=lambda row: row[f"val_{task.metric}"])
    summary = {
        "status": status,
        "model": config.model,
        "data": config.data,
        "epochs_completed": history[-1]["epoch"],
        "val": val,
        f"best_val_{task.metric}": best[f"val_{task.metric}"],
        "best_epoch": best["epoch"],
        "params": sum(p.numel() for p in model.parameters()),
        "world_size": ctx.world,
        "device": str(ctx.device),
        "seconds": round(seconds, 2),
        "config": asdict(config),
    }
    write_text_atomic(json.dumps(summary, indent=2) + "\n", out / "summary.json")


def load_model_for_data(
    model_name: str, checkpoint: str | Path, data_spec: str, img_size: int | None = None, strict: bool = False
) -> tuple[nn.Module, DataSplits]:
    """(model with weights from `checkpoint`, dataset splits), as `leanvision eval` loads them.

    A training checkpoint gives the image size (unless `img_size` is set) and must be of `model_name`.
    """
    saved = training_config_of(checkpoint, model_name)
    if saved is not None and img_size is None:
        img_size = saved["img_size"]
    data = build_dataset(data_spec, img_size, strict)
    model = make_model(model_name, data)
    load_checkpoint(model, checkpoint, context=f" ({data_spec!r} has {data.num_classes} classes)")
    check_model_fits(model, data, model_name)
    return model, data


def evaluate_checkpoint(
    model_name: str,
    checkpoint: str | Path,
    data_spec: str,
    img_size: int | None = None,
    batch_size: int = 256,
    device: str = "cpu",
    strict: bool = False,
) -> dict[str, Any]:
    """Validation loss and accuracy of `model_name` with weights from `checkpoint` on `data_spec`
    (loaded by `load_model_for_data`)."""
    check_device(device)
    model, data = load_model_for_data(model_name, checkpoint, data_spec, img_size, strict)
    return evaluate(model.to(device), data.val, data.multilabel, batch_size, device)
