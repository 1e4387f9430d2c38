"""Model registry: name -> builder and default configuration, timm style."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from leanvision.errors import InvalidArgumentError, UnknownModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    """What the registry knows about a model name: how to build it and what it expects."""

    name: str
    builder: Callable[..., nn.Module]
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    paper: dict[str, Any] = field(default_factory=dict)  # published numbers, e.g. top1, params_m, flops_b


_REGISTRY: dict[str, ModelConfig] = {}


def register_model(name: str, builder: Callable[..., nn.Module], **config: Any) -> None:
    """Register `name`; `config` holds ModelConfig fields (kwargs, input_size, paper, ...)."""
    if name in _REGISTRY:
        raise InvalidArgumentError(f"model name {name!r} is already registered")
    _REGISTRY[name] = ModelConfig(name=name, builder=builder, **config)


def _ensure_models_loaded() -> None:
    import leanvision.models  # noqa: F401  (registers every model on import)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    _ensure_models_loaded()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_model_config(name: str) -> ModelConfig:
    """The registry entry for `name`; unknown names raise UnknownModelError listing the closest ones."""
    _ensure_models_loaded()
    if name not in _REGISTRY:
        prefixed = sorted(n for n in _REGISTRY if n.startswith(name))
        close = list(
            dict.fromkeys(prefixed + difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.4))
        )[:5]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}{hint} (leanvision.list_models() lists all)")
    return _REGISTRY[name]


def create_model(
    name: str,
    pretrained: str | None = None,
    num_classes: int | None = None,
    features_only: bool = False,
    out_indices: list[int] | tuple[int, ...] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model; `pretrained` is a local checkpoint file (ours, timm or clovaai layout).

    `num_classes` defaults to the registered network's own (1000 for ImageNet, 2 for Visual Wake Words).
    `features_only=True` returns a FeatureExtractor giving the multi-scale maps listed in `feature_info`.
    """
    config = get_model_config(name)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = config.builder(**{**config.kwargs, **kwargs})
    model.default_cfg = config
    if pretrained is not None:
        from leanvision.models.weights import load_checkpoint

        # a model that also reads foreign layouts of its own (e.g. RRR-Net from a full ResNet) says so
        getattr(model, "load_pretrained", lambda path: load_checkpoint(model, path))(pretrained)
    if features_only:
        from leanvision.models.base import FeatureExtractor

        return FeatureExtractor(model, out_indices)
    return model
