"""The interface every leanvision classifier shares (timm-shaped), and multi-scale feature extraction."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from leanvision.errors import InvalidArgumentError
from leanvision.layers import ClassifierHead, ImageNormalize, create_classifier

SMALLEST_ANCHOR = 32  # px: torchvision's R-CNN anchors start at 32, SSDLite's lowest boxes are 0.1 x 320


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


def feature_level(block: int, num_chs: int, reduction: int) -> dict:
    """A `feature_info` entry for the output of `features[block]` (block -1 is the stem)."""
    return dict(module="stem" if block < 0 else f"features.{block}", num_chs=num_chs, reduction=reduction)


def feature_block(level: dict) -> int:
    """The index in `features` of the block whose output a `feature_info` level is (-1: the stem)."""
    return -1 if level["module"] == "stem" else int(level["module"].split(".")[1])


def check_detection_classes(num_classes: int) -> None:
    """A detector's class count includes the background, so it is at least 2."""
    if num_classes < 2:
        raise InvalidArgumentError(
            f"num_classes counts the background too, so it must be >= 2, got {num_classes}"
        )


class TorchvisionDetector:
    """leanvision's detector interface beside torchvision's own, mixed into its SSD / Faster / Mask R-CNN:
    `normalize` (the transform's image statistics as a module), `batch_images`, and `head_outputs(x)`: the
    raw outputs of a normalised batch at the network's input size (no resize, no post-processing), which
    the memory analysis, `bench` and export use. Inputs, and the size the transform resizes images to,
    must be at least the smallest anchor (SMALLEST_ANCHOR px)."""

    in_chans = 3
    head_output_names: tuple[str, ...] = ()
    memory_scope = "traced up to the heads' raw outputs; box decoding and NMS are not counted"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        size = min(self.transform.min_size)
        if size < SMALLEST_ANCHOR:
            raise InvalidArgumentError(
                f"{type(self).__name__} would resize images to {size} px, smaller than its smallest anchor "
                f"({SMALLEST_ANCHOR} px): use a size >= {SMALLEST_ANCHOR}"
            )
        self.normalize = ImageNormalize(self.transform.image_mean, self.transform.image_std)

    def batch_images(self, images: torch.Tensor) -> torch.Tensor:
        """A [B, 3, H, W] batch of 0-1 images, normalised (not resized: `forward` resizes)."""
        return self.normalize(images)

    def head_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The raw outputs named by `head_output_names` of a normalised batch [B, 3, H, W]."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise InvalidArgumentError(f"{model_name(self)} expects input [B, 3, H, W], got {list(x.shape)}")
        if min(x.shape[2:]) < SMALLEST_ANCHOR:
            raise InvalidArgumentError(
                f"{model_name(self)}: input {x.shape[2]}x{x.shape[3]} is smaller than its smallest anchor "
                f"({SMALLEST_ANCHOR} px)"
            )
        return self.raw_outputs(x)

    def raw_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


def model_name(model: nn.Module) -> str:
    """The name `create_model` built `model` under, else its class name."""
    return getattr(getattr(model, "default_cfg", None), "name", type(model).__name__)


class ClassifierBase(nn.Module):
    """What every leanvision classifier shares, timm's interface: forward_features, forward_head,
    get_classifier, reset_classifier, num_classes, num_features, and `feature_info` for
    `create_model(..., features_only=True)`.

    `forward_features` runs `stages()` one after the other: by default `stem` (if any), then each block of
    `features` (an nn.Sequential). `feature_info` lists the feature levels, one dict each (module: the
    name of a stage, num_chs, reduction), or is None where the model has no such levels. Subclasses set
    `in_chans` / `total_stride` where they are not 3 / 32, and give the head (see Classifier and
    TorchvisionClassifier).
    """

    in_chans: int = 3
    total_stride: int = 32
    feature_info: list[dict] | None = None

    def stages(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of each step from the image to the last feature map, in order."""
        stem = [("stem", self.stem)] if "stem" in self._modules else []
        return stem + [(f"features.{name}", module) for name, module in self.features.named_children()]

    @property
    def num_classes(self) -> int:
        fc = self.get_classifier()
        return fc.out_features if isinstance(fc, nn.Linear) else 0

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch -> last feature map (before global pooling)."""
        check_input(x, self.in_chans, self.total_stride, model_name(self))
        for _, stage in self.stages():
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits (or the pooled vector the classifier sees, with pre_logits=True)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The final layer (Identity after reset_classifier(0))."""
        raise NotImplementedError

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final layer by a freshly initialised one for `num_classes` (0 removes it)."""
        raise NotImplementedError


class Classifier(ClassifierBase):
    """A classifier laid out as `stem -> features -> head`, `head` a ClassifierHead."""

    head: ClassifierHead

    @property
    def num_features(self) -> int:
        return self.head.num_features

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.head.reset(num_classes)


class TorchvisionClassifier(ClassifierBase):
    """A classifier with torchvision's head: three of its own modules, named by `head_modules` (global
    pool, dropout or None, final Linear), so torchvision's keys and weight files stay valid. Subclasses
    set `num_features`, the width the final Linear sees."""

    head_modules: tuple[str, str | None, str]
    num_features: int

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pool, drop, _ = self.head_modules
        x = self.get_submodule(pool)(x).flatten(1)
        if drop is not None:
            x = self.get_submodule(drop)(x)
        return x if pre_logits else self.get_classifier()(x)

    def get_classifier(self) -> nn.Module:
        return self.get_submodule(self.head_modules[2])

    def reset_classifier(self, num_classes: int) -> None:
        self.set_submodule(self.head_modules[2], create_classifier(self.num_features, num_classes))


class FeatureExtractor(nn.Module):
    """A classifier's maps at its `feature_info` levels (all, or those `out_indices` picks).

    Runs the model's `stages()` up to the deepest level asked for; the later ones are dropped.
    """

    def __init__(self, model: ClassifierBase, out_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        self.model_name = model_name(model)
        levels = getattr(model, "feature_info", None)
        if not levels:
            raise InvalidArgumentError(
                f"{self.model_name} has no features_only mode: {type(model).__name__} lists no feature "
                "levels (feature_info)"
            )
        out_indices = list(range(len(levels))) if out_indices is None else list(out_indices)
        bad = [i for i in out_indices if not -len(levels) <= i < len(levels)]
        if bad:
            raise InvalidArgumentError(
                f"out_indices {bad} out of range: {self.model_name} has {len(levels)} feature levels"
            )
        self.feature_info = [levels[i] for i in out_indices]
        self.wanted = {info["module"] for info in self.feature_info}
        stages = model.stages()
        last = max(i for i, (name, _) in enumerate(stages) if name in self.wanted)
        self.names = [name for name, _ in stages[: last + 1]]
        self.stages = nn.ModuleList(module for _, module in stages[: last + 1])
        self.in_chans, self.total_stride = model.in_chans, model.total_stride

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_input(x, self.in_chans, self.total_stride, self.model_name)
        out = []
        for name, stage in zip(self.names, self.stages):
            x = stage(x)
            if name in self.wanted:
                out.append(x)
        return out
