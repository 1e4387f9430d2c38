"""Model registry: name -> builder and default configuration, timm style."""

from __future__ import annotations

import difflib
import fnmatch
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from leanvision.errors import InvalidArgumentError, UnknownModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    """What the registry knows about a model name: how to build it and what it expects.

    `features` builds the features_only form of a built model, as features(model, out_indices, kwargs);
    None for leanvision's models, whose FeatureExtractor reads their `feature_info`.
    """

    name: str
    builder: Callable[..., nn.Module]
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    paper: dict[str, Any] = field(default_factory=dict)  # published numbers, e.g. top1, params_m, flops_b
    features: Callable[[nn.Module, Sequence[int] | None, dict[str, Any]], nn.Module] | None = None


_REGISTRY: dict[str, ModelConfig] = {}


def register_model(name: str, builder: Callable[..., nn.Module], **config: Any) -> None:
    """Register `name`; `config` holds ModelConfig fields (kwargs, input_size, paper, ...)."""
    if name in _REGISTRY:
        raise InvalidArgumentError(f"model name {name!r} is already registered")
    _REGISTRY[name] = ModelConfig(name=name, builder=builder, **config)


def _ensure_models_loaded() -> None:
    import leanvision.models  # noqa: F401  (registers every model on import)


def list_models(pattern: str = "*") -> list[str]:
    """leanvision's registered model names matching a shell-style pattern, sorted (torchvision and timm
    models are not listed, but `get_model_config` and `create_model` take their names too)."""
    _ensure_models_loaded()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def unknown_model_error(name: str, candidates: Iterable[str], listed_by: str) -> UnknownModelError:
    """An UnknownModelError for `name` naming up to five close `candidates` and what lists them all."""
    candidates = list(candidates)
    prefixed = sorted(n for n in candidates if n.startswith(name))
    close = list(dict.fromkeys(prefixed + difflib.get_close_matches(name, candidates, n=5, cutoff=0.4)))[:5]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UnknownModelError(f"unknown model {name!r}{hint} ({listed_by})")


def get_model_config(name: str) -> ModelConfig:
    """The configuration of a leanvision name, `tv:NAME` (torchvision), `timm:NAME` (timm), or a bare
    torchvision classification name leanvision does not register (e.g. resnet18).

    Unknown names raise UnknownModelError listing the closest ones.
    """
    _ensure_models_loaded()
    if name in _REGISTRY:
        return _REGISTRY[name]
    from leanvision.models.external import external_config, torchvision_classifiers

    config = external_config(name)
    if config is None:
        raise unknown_model_error(
            name,
            [*_REGISTRY, *torchvision_classifiers()],
            "leanvision.list_models() lists leanvision's models; tv:NAME and timm:NAME name torchvision's "
            "and timm's",
        )
    return config


def _check_arguments(name: str, pretrained: object, kwargs: dict[str, Any]) -> None:
    """Refuse, by name, the arguments that would otherwise fail deep inside a builder or build an empty
    model: a pretrained that is not a path (weights are never downloaded), a num_classes that is not an
    int >= 0, in_chans < 1, a width_mult that is not a finite positive number."""
    if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
        raise InvalidArgumentError(
            f"pretrained must be the path of a local checkpoint file (weights are not downloaded), "
            f"got {pretrained!r}"
        )
    num_classes = kwargs.get("num_classes")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0
    ):
        raise InvalidArgumentError(
            f"{name}: num_classes must be an int >= 0 (0: no classifier), got {num_classes!r}"
        )
    in_chans = kwargs.get("in_chans")
    if in_chans is not None and (isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1):
        raise InvalidArgumentError(f"{name}: in_chans must be a positive int, got {in_chans!r}")
    width = kwargs.get("width_mult")
    if width is not None and not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
        raise InvalidArgumentError(f"{name}: width_mult must be a positive number, and finite: got {width!r}")


def create_model(
    name: str,
    pretrained: str | None = None,
    num_classes: int | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a model by name (see get_model_config), with random weights or those of `pretrained`, a
    local checkpoint file (ours, timm, torchvision or clovaai layout).

    `num_classes` defaults to the network's own (1000 for ImageNet, 2 for Visual Wake Words).
    `features_only=True` returns the multi-scale feature maps listed in `feature_info` instead (all
    levels, or those of `out_indices`): a FeatureExtractor for leanvision's models, timm's own form for
    timm's.
    """
    config = get_model_config(name)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    _check_arguments(name, pretrained, kwargs)
    kwargs = {**config.kwargs, **kwargs}
    model = config.builder(**kwargs)
    model.default_cfg = config
    if pretrained is not None:
        from leanvision.models.weights import load_checkpoint

        # a model that also reads foreign layouts of its own (e.g. RRR-Net from a full ResNet) says so
        getattr(model, "load_pretrained", lambda path: load_checkpoint(model, path))(pretrained)
    if not features_only:
        return model
    if config.features is not None:
        return config.features(model, out_indices, kwargs)
    from leanvision.models.base import FeatureExtractor

    return FeatureExtractor(model, out_indices)
