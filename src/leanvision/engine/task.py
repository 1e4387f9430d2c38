"""What the training loop (engine/train.py) asks of a kind of task: classification here, detection in
leanvision.detection. The loop owns checkpoints, resume, DDP, schedules and progress; a task owns its data,
model, loss and validation metrics.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from leanvision.engine.train import TrainConfig


class StepMeter(ABC):
    """Running training metrics of one epoch, reduced over processes by `result`."""

    @abstractmethod
    def update(self, loss: torch.Tensor, outputs: Any, targets: Any) -> None: ...

    @abstractmethod
    def result(self) -> dict[str, Any]: ...


class Task(ABC):
    """One kind of training run. `metric` names the validation metric (higher is better) that picks the best
    epoch; `train_columns` / `val_columns` the metrics a history row records (as train_KEY / val_KEY)."""

    name: ClassVar[str]
    metric: ClassVar[str]
    train_columns: ClassVar[tuple[str, ...]]
    val_columns: ClassVar[tuple[str, ...]]
    collate: Callable[[list], Any] | None = None  # the DataLoader's collate_fn (None: torch's default)

    @abstractmethod
    def build_data(self, config: TrainConfig) -> Any:
        """The run's data: an object with .spec, .train and .val datasets."""

    @abstractmethod
    def make_model(self, config: TrainConfig, data: Any) -> nn.Module: ...

    @abstractmethod
    def check_model_fits(self, model: nn.Module, data: Any, name: str) -> None:
        """Raise InvalidArgumentError if `model` cannot take `data` (one eval forward)."""

    @abstractmethod
    def to_device(self, batch: Any, device: torch.device, config: TrainConfig) -> tuple[Any, Any]:
        """(inputs, targets) of a loader batch, on `device`."""

    @abstractmethod
    def loss(
        self, net: nn.Module, inputs: Any, targets: Any, config: TrainConfig
    ) -> tuple[torch.Tensor, Any]:
        """(scalar training loss, outputs for the meter) of one batch, net in training mode."""

    @abstractmethod
    def train_meter(self, data: Any, device: torch.device) -> StepMeter: ...

    @abstractmethod
    def evaluate(
        self, model: nn.Module, data: Any, config: TrainConfig, device: torch.device
    ) -> dict[str, Any]:
        """Validation metrics of `model` on `data.val` (every process gets the full-set result)."""
