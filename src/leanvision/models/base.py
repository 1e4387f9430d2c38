"""The interface every leanvision classifier shares (timm-shaped), and multi-scale feature extraction."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from leanvision.errors import InvalidArgumentError
from leanvision.layers import ClassifierHead


def check_input(x: torch.Tensor, in_chans: int, min_size: int, model_name: str) -> None:
    """Raise a ValueError naming the expected layout when `x` cannot go through the network."""
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise InvalidArgumentError(f"{model_name} expects input [B, {in_chans}, H, W], got {list(x.shape)}")
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise InvalidArgumentError(
            f"{model_name} downsamples by {min_size}: input height and width must be >= {min_size}, "
            f"got {x.shape[2]}x{x.shape[3]}"
        )


def check_width(width_mult: float) -> None:
    """Raise a ValueError unless the width multiplier is a positive number."""
    if not width_mult > 0:
        raise InvalidArgumentError(f"width_mult must be a positive number, got {width_mult}")


def init_like_torchvision(model: nn.Module) -> None:
    """torchvision's conv/BN initialisation (MobileNetV2, ResNet): Kaiming normal fan-out, BN to identity.

    Other modules (linear layers, RNN cells) keep their own initialisation.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def feature_level(block: int, channels: int, reduction: int) -> dict:
    """A `feature_info` entry for the output of `features[block]` (block -1 is the stem)."""
    return dict(module="stem" if block < 0 else f"features.{block}", num_chs=channels, reduction=reduction)


class Classifier(nn.Module):
    """Base for classifiers laid out as `stem -> features -> head`.

    Subclasses set `stem`, `features` (an nn.Sequential), `head` (a ClassifierHead), `in_chans`,
    `total_stride` and `feature_info` (one dict per feature level: module, num_chs, reduction).
    """

    stem: nn.Module
    features: nn.Sequential
    head: ClassifierHead
    in_chans: int = 3
    total_stride: int = 32
    feature_info: list[dict]

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def num_features(self) -> int:
        return self.head.num_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch -> last feature map (before global pooling)."""
        check_input(x, self.in_chans, self.total_stride, type(self).__name__)
        return self.features(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits (or the pooled vector the classifier sees, with pre_logits=True)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final layer by a freshly initialised one for `num_classes` (0 removes it)."""
        self.head.reset(num_classes)


class FeatureExtractor(nn.Module):
    """Runs a classifier's stem and feature blocks and returns the maps at the levels of `feature_info`.

    Works with any model that has `features` (nn.Sequential), optional `stem`, and `feature_info` whose
    `module` entries are "stem" or "features.<i>". Blocks after the deepest requested level are dropped.
    """

    def __init__(self, model: nn.Module, out_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        levels = model.feature_info
        out_indices = list(range(len(levels))) if out_indices is None else list(out_indices)
        bad = [i for i in out_indices if not -len(levels) <= i < len(levels)]
        if bad:
            raise InvalidArgumentError(
                f"out_indices {bad} out of range: the model has {len(levels)} feature levels"
            )
        self.feature_info = [levels[i] for i in out_indices]
        wanted = {info["module"] for info in self.feature_info}
        stages: list[tuple[str, nn.Module]] = []
        if hasattr(model, "stem"):
            stages.append(("stem", model.stem))
        stages += [(f"features.{i}", m) for i, m in enumerate(model.features)]
        last = max(i for i, (name, _) in enumerate(stages) if name in wanted)
        self.names = [name for name, _ in stages[: last + 1]]
        self.stages = nn.ModuleList(m for _, m in stages[: last + 1])
        self.wanted = wanted
        self.in_chans = getattr(model, "in_chans", 3)
        self.total_stride = getattr(model, "total_stride", 1)
        self.model_name = type(model).__name__

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_input(x, self.in_chans, self.total_stride, self.model_name)
        out = []
        for name, stage in zip(self.names, self.stages):
            x = stage(x)
            if name in self.wanted:
                out.append(x)
        return out
