"""Reduce a ResNet checkpoint, and train an RRR-Net as the paper's code does.

Training (`fit_rrr`): the stem is frozen; its BN running statistics are first warmed with `warm_epochs`
epochs of no-grad train-mode passes over the training images, then it stays in eval mode. Every branch
has its own AdamW (lr 1e-3, weight decay 0.01 by default) and its own cross-entropy loss on its own
logits; branches share only the data loading and the stem's (frozen) output, so a step on one branch
never moves another. Evaluation averages the branches' softmax probabilities (`RRRNet.forward`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from leanvision.engine.data import DataSplits
from leanvision.engine.train import TrainConfig, evaluate, seed_everything, train
from leanvision.errors import InvalidArgumentError
from leanvision.models.rrrnet import RRRNet
from leanvision.models.weights import save_checkpoint


def reduce_checkpoint(
    backbone: str,
    weights: str | Path,
    blocks: tuple[int, ...],
    out: str | Path,
    num_classes: int = 1000,
    branches: int = 1,
    seed: int = 0,
    overwrite: bool = False,
) -> RRRNet:
    """Write the reduced (and optionally split) model built from a full ResNet file; returns the model.

    The file loads with `create_model(f"rrrnet_{backbone}", blocks=..., branches=..., num_classes=...,
    pretrained=out)`. An existing `out` is replaced only with `overwrite`, and never when it is `weights`.
    """
    if Path(out).exists() and Path(weights).exists() and Path(out).samefile(weights):
        raise InvalidArgumentError(f"--out {out} is the --weights file it is reduced from; write elsewhere")
    if Path(out).exists() and not overwrite:
        raise InvalidArgumentError(f"{out} already exists; pass --overwrite to replace it")
    model = RRRNet(backbone, blocks, branches, num_classes, seed=seed).load_pretrained(weights)
    save_checkpoint(model, out)
    return model


class BranchTrainer:
    """One AdamW per branch over that branch's parameters; `step` trains the chosen branches independently."""

    def __init__(self, model: RRRNet, lr: float = 1e-3, wd: float = 0.01) -> None:
        if not model.stem_frozen:
            raise InvalidArgumentError(
                "freeze the stem first (model.freeze_stem()): branches share it, frozen"
            )
        self.model = model
        self.optimizers = [torch.optim.AdamW(b.parameters(), lr=lr, weight_decay=wd) for b in model.branches]

    def step(
        self, images: torch.Tensor, targets: torch.Tensor, branches: list[int] | None = None
    ) -> list[float]:
        """One optimiser step per chosen branch (default: all) on its own loss; returns the losses."""
        self.model.train()
        with torch.no_grad():
            features = self.model.forward_features(images)
        losses = []
        for index in range(len(self.optimizers)) if branches is None else branches:
            loss = F.cross_entropy(self.model.branches[index](features), targets)
            self.optimizers[index].zero_grad(set_to_none=True)
            loss.backward()
            self.optimizers[index].step()
            losses.append(loss.item())
        return losses


@dataclass
class RRRResult:
    history: list[dict[str, Any]]
    val: dict[str, Any]
    model: RRRNet


def fit_rrr(
    model: RRRNet,
    data: DataSplits,
    epochs: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    wd: float = 0.01,
    warm_epochs: int = 10,
    seed: int = 0,
) -> RRRResult:
    """Freeze and warm the stem, then train every branch independently for `epochs` (module docstring)."""
    if epochs < 1 or batch_size < 1 or warm_epochs < 0:
        raise InvalidArgumentError(
            f"need epochs >= 1, batch_size >= 1, warm_epochs >= 0; got {epochs}, {batch_size}, {warm_epochs}"
        )
    seed_everything(seed)
    device = model.conv1.weight.device
    loader = DataLoader(data.train, batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    model.freeze_stem()
    for _ in range(warm_epochs):
        model.warm_stem(images for images, _ in loader)
    trainer = BranchTrainer(model, lr, wd)
    history = []
    for epoch in range(epochs):
        losses = [trainer.step(x.to(device), y.to(device)) for x, y in loader]
        val = evaluate(model, data.val, batch_size=256, device=device)
        mean_loss = sum(sum(step) / len(step) for step in losses) / len(losses)
        history.append(
            {"epoch": epoch + 1, "train_loss": mean_loss, "val_loss": val["loss"], "val_acc": val["acc"]}
        )
    return RRRResult(history, evaluate(model, data.val, batch_size=256, device=device), model)


def finetune(
    model: RRRNet,
    data: DataSplits,
    out: Path,
    epochs: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    wd: float = 0.01,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the model's trainable parameters with AdamW at a constant lr (the paper's recipe) through
    `leanvision.engine.train`, writing to `out`; an interrupted run in `out` is resumed. Returns the final
    validation metrics; an interruption (Ctrl-C) raises KeyboardInterrupt."""
    config = TrainConfig(
        model=f"rrrnet_{model.backbone}",
        data=data.spec,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        opt="adamw",
        wd=wd,
        sched="none",
        img_size=data.image_size,
        seed=seed,
        out=str(out),
        resume=(out / "last.pt").is_file(),
        progress=False,
    )
    result = train(config, model, data)
    result.raise_if_interrupted()
    return result.val
