"""Classifier head: global pool -> optional hidden layer -> dropout -> linear."""

from __future__ import annotations

import torch
from torch import nn

from leanvision.errors import InvalidArgumentError
from leanvision.layers.conv import ConvNormAct


def create_classifier(in_features: int, num_classes: int) -> nn.Module:
    """A fresh Linear(in_features, num_classes), or Identity for `num_classes=0` (features pass through)."""
    if num_classes < 0:
        raise InvalidArgumentError(f"num_classes must be >= 0, got {num_classes}")
    return nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()


class ClassifierHead(nn.Module):
    """Pool to one vector per image, then classify.

    `hidden_size` adds a 1x1 conv (with bias) + BN + ReLU6 before the dropout, as ReXNet-lite does.
    `num_classes=0` leaves the classifier as Identity, so the head returns pooled features.
    """

    def __init__(
        self, in_features: int, num_classes: int, drop_rate: float = 0.0, hidden_size: int | None = None
    ) -> None:
        super().__init__()
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.hidden = (
            ConvNormAct(in_features, hidden_size, act_layer=nn.ReLU6, bias=True) if hidden_size else None
        )
        self.num_features = hidden_size or in_features
        self.drop = nn.Dropout(drop_rate)
        self.fc = create_classifier(self.num_features, num_classes)

    def reset(self, num_classes: int) -> None:
        """Replace the final layer with a fresh one for `num_classes` outputs (0 = no classifier)."""
        self.fc = create_classifier(self.num_features, num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.hidden is not None:
            x = self.hidden(x)
        x = self.drop(x.flatten(1))
        return x if pre_logits else self.fc(x)
