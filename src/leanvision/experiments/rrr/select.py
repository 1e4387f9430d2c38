"""Forward block selection: how many blocks of each stage the reduced ResNet keeps (RRR-Net's "reduce").

The sequence (`block_sequence`) starts from one block per stage and adds one block at a time, filling
the stages front to back: 1111 -> 2111 -> 3111 -> 3211 -> ... -> the full backbone (47 configurations
for ResNet-152). Each step fine-tunes the whole reduced network (one branch; AdamW, no schedule,
`epochs` per step), warm-started from the previous step's trained weights (the added block from the
pretrained file; the first step's classifier starts fresh), and is scored by its accuracy on `holdout`
images per class held out of the TRAINING part of a Meta-Album dataset (`metaalbum:DIR,holdout=V`): the
test part is never read. The stop rule ends the sequence early: `patience` steps without a better validation
accuracy, a `target` accuracy reached, or `max_steps` configurations.

OUT/select.json (rewritten atomically after every step) records the settings and the finished steps
(blocks, val_acc, params, checkpoint path relative to OUT). Running again with the same settings skips
the finished steps and goes on (a step interrupted midway resumes from its last finished epoch); the
stop rule may change between runs. OUT/select.png plots validation accuracy against parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from leanvision.engine.data import DataSplits, build_dataset
from leanvision.engine.train import seed_everything
from leanvision.errors import CheckpointError, InvalidArgumentError
from leanvision.experiments.rrr.state import load_state, write_json_atomic
from leanvision.experiments.rrr.train import finetune
from leanvision.models.rrrnet import RESNETS, RRRNet
from leanvision.models.weights import read_state_dict

STOP_SETTINGS = ("patience", "target", "max_steps")  # may change between runs; the others may not


@dataclass
class SelectConfig:
    """One block selection. `data` is one Meta-Album dataset; `holdout` images per class validate."""

    weights: str
    data: str
    backbone: str = "resnet152"
    out: str = "runs/rrr-select"
    epochs: int = 10
    holdout: int = 5
    img_size: int = 128
    batch_size: int = 32
    lr: float = 1e-3
    wd: float = 0.01
    seed: int = 0
    patience: int | None = None
    target: float | None = None
    max_steps: int | None = None

    def check(self) -> None:
        """Raise a ValueError naming the first bad setting."""
        if self.backbone not in RESNETS:
            raise InvalidArgumentError(
                f"unknown backbone {self.backbone!r}; expected one of {sorted(RESNETS)}"
            )
        if not self.data.startswith("metaalbum:"):
            raise InvalidArgumentError(
                f"block selection validates on images held out of a Meta-Album dataset's training part: "
                f"pass --data metaalbum:DIR, got {self.data!r}"
            )
        if self.epochs < 1 or self.holdout < 1:
            raise InvalidArgumentError(
                f"need epochs >= 1 and holdout >= 1, got {self.epochs}, {self.holdout}"
            )
        if (self.patience is not None and self.patience < 1) or (
            self.max_steps is not None and self.max_steps < 1
        ):
            raise InvalidArgumentError(
                f"need patience >= 1 and max_steps >= 1, got {self.patience}, {self.max_steps}"
            )
        if self.target is not None and not 0 < self.target <= 100:
            raise InvalidArgumentError(f"target is a validation accuracy in (0, 100] %, got {self.target}")


def block_sequence(backbone: str) -> list[tuple[int, ...]]:
    """1111, then one more block per step, each stage filled before the next: up to the full backbone."""
    if backbone not in RESNETS:
        raise InvalidArgumentError(f"unknown backbone {backbone!r}; expected one of {sorted(RESNETS)}")
    depths = RESNETS[backbone][1]
    blocks = [1, 1, 1, 1]
    sequence = [tuple(blocks)]
    for stage, depth in enumerate(depths):
        while blocks[stage] < depth:
            blocks[stage] += 1
            sequence.append(tuple(blocks))
    return sequence


def blocks_label(blocks: tuple[int, ...] | list[int]) -> str:
    """A configuration's name in folders and plots, e.g. 1-1-1-1."""
    return "-".join(map(str, blocks))


def stop_reason(steps: list[dict[str, Any]], config: SelectConfig, total: int) -> str | None:
    """Why the selection ends after `steps` (None: go on). Depends on the recorded steps only."""
    if len(steps) == total:
        return "sequence done"
    if not steps:
        return None
    if config.max_steps is not None and len(steps) >= config.max_steps:
        return f"max_steps={config.max_steps}"
    if config.target is not None and steps[-1]["val_acc"] >= config.target:
        return f"target={config.target}% reached"
    if config.patience is not None and len(steps) - 1 - best_step(steps) >= config.patience:
        return f"patience={config.patience}: no better validation accuracy in {config.patience} steps"
    return None


def best_step(steps: list[dict[str, Any]]) -> int:
    """Index of the highest validation accuracy (the first, i.e. the smallest network, on ties)."""
    return max(range(len(steps)), key=lambda i: (steps[i]["val_acc"], -i))


def warm_start_(model: RRRNet, checkpoint: Path) -> None:
    """Copy the previous step's trained tensors into `model` by name (it has one block more)."""
    state = read_state_dict(checkpoint)
    unexpected = [k for k in state if k not in model.state_dict()]
    if unexpected:
        raise CheckpointError(
            f"{checkpoint} does not fit the next configuration: unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state, strict=False)


def train_step(
    config: SelectConfig, blocks: tuple[int, ...], data: DataSplits, warm_from: Path | None
) -> dict[str, Any]:
    """Fine-tune configuration `blocks` (resuming its run if one was interrupted); its step record."""
    out = Path(config.out)
    run_dir = out / "steps" / blocks_label(blocks)
    seed_everything(config.seed)  # the fresh classifier's initialisation
    model = RRRNet(config.backbone, blocks, num_classes=data.num_classes, seed=config.seed)
    model.load_pretrained(config.weights)
    if warm_from is not None:
        warm_start_(model, warm_from)
    val = finetune(model, data, run_dir, config.epochs, config.batch_size, config.lr, config.wd, config.seed)
    return {
        "blocks": list(blocks),
        "val_acc": val["acc"],
        "params": sum(p.numel() for p in model.parameters()),
        "checkpoint": str((run_dir / "last.pt").relative_to(out)),
    }


def select_blocks(
    config: SelectConfig, on_step: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run (or continue) the selection; returns the final state (module docstring).

    `on_step(step)` gets the record of every step trained in this call, after it is saved.
    """
    config.check()
    out = Path(config.out)
    state_path = out / "select.json"
    settings = {k: v for k, v in asdict(config).items() if k not in STOP_SETTINGS and k != "out"}
    state = load_state(state_path, settings, {"steps": [], "stopped": None, "best": None})
    steps = state["steps"]
    sequence = block_sequence(config.backbone)
    data = None
    while (reason := stop_reason(steps, config, len(sequence))) is None:
        blocks = sequence[len(steps)]
        data = data or build_dataset(f"{config.data},holdout={config.holdout}", config.img_size)
        warm_from = out / steps[-1]["checkpoint"] if steps else None
        steps.append(train_step(config, blocks, data, warm_from))
        write_json_atomic(state, state_path)
        if on_step is not None:
            on_step(steps[-1])
    state.update(stopped=reason, best=best_step(steps))
    write_json_atomic(state, state_path)
    plot_selection(steps, state["best"], out / "select.png")
    return state


def plot_selection(steps: list[dict[str, Any]], best: int, path: Path) -> None:
    """Validation accuracy against parameters, one point per step in sequence order, the best starred."""
    from leanvision.plotting import new_figure, save_figure

    params = [step["params"] / 1e6 for step in steps]
    accs = [step["val_acc"] for step in steps]
    fig, ax = new_figure(figsize=(7, 4))
    ax.plot(params, accs, marker="o")
    ax.plot(params[best], accs[best], marker="*", markersize=16, linestyle="none", label="best")
    for i in {0, best, len(steps) - 1}:
        ax.annotate(blocks_label(steps[i]["blocks"]), (params[i], accs[i]), textcoords="offset points",
                    xytext=(4, 4))  # fmt: skip
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path, dpi=100)
