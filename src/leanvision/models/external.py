"""torchvision and timm models by name, for everything that takes a model name.

- `tv:NAME`: torchvision.models.get_model(NAME), a classification model of torchvision;
- a bare NAME leanvision does not register but torchvision has as a classification model (e.g. `resnet18`,
  the base network of RNNPool's Table 1): the same;
- `timm:NAME` (optionally NAME.TAG): timm.create_model(NAME, pretrained=False); timm is an optional
  dependency, imported only for these names.

Weights start random (nothing is downloaded); `create_model(..., pretrained=FILE)` loads a local file with
leanvision's checkpoint loader, as for its own models. torchvision classifiers expect 224x224 ImageNet-
normalised images; timm's input size, mean and std are those of the model's pretrained config.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torchvision
from torch import nn

from leanvision.errors import InvalidArgumentError
from leanvision.models.registry import ModelConfig, unknown_model_error

TORCHVISION_PREFIX = "tv:"
TIMM_PREFIX = "timm:"


@functools.cache
def torchvision_classifiers() -> tuple[str, ...]:
    """torchvision's classification model names (no detection, segmentation, video or quantized ones)."""
    return tuple(torchvision.models.list_models(module=torchvision.models))


def external_config(name: str) -> ModelConfig | None:
    """The ModelConfig of a torchvision or timm name; None for a bare name torchvision does not have.

    An unknown `tv:` or `timm:` name raises UnknownModelError listing the closest ones.
    """
    if name.startswith(TIMM_PREFIX):
        return timm_config(name)
    tv_name = name.removeprefix(TORCHVISION_PREFIX)
    if tv_name in torchvision_classifiers():
        return ModelConfig(name=name, builder=functools.partial(torchvision.models.get_model, tv_name))
    if name.startswith(TORCHVISION_PREFIX):
        raise unknown_model_error(
            name,
            [TORCHVISION_PREFIX + n for n in torchvision_classifiers()],
            "torchvision.models.list_models(module=torchvision.models) lists torchvision's classifiers",
        )
    return None


def import_timm(name: str) -> Any:
    """The timm module, or a clear error naming the model that needs it."""
    try:
        import timm
    except ImportError as err:
        raise InvalidArgumentError(
            f"{name} is a timm model, but timm (an optional dependency) is not installed: pip install timm"
        ) from err
    return timm


def timm_config(name: str) -> ModelConfig:
    """The ModelConfig of `timm:NAME`, with the input size, mean and std of its pretrained config."""
    timm = import_timm(name)
    timm_name = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(timm_name):
        raise unknown_model_error(
            name, [TIMM_PREFIX + n for n in timm.list_models()], "timm.list_models() lists timm's models"
        )
    try:
        cfg = timm.get_pretrained_cfg(timm_name)
    except RuntimeError as err:  # an unknown pretrained tag
        arch = timm_name.split(".")[0]
        raise unknown_model_error(
            name,
            [TIMM_PREFIX + n for n in timm.list_pretrained(f"{arch}.*")],
            f"{err}; timm.list_pretrained('{arch}.*') lists its tags",
        ) from None
    return ModelConfig(
        name=name,
        builder=functools.partial(timm.create_model, timm_name, pretrained=False),
        input_size=tuple(cfg.input_size),
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        features=functools.partial(timm_features, timm_name),
    )


def timm_features(
    timm_name: str, model: nn.Module, out_indices: Sequence[int] | None, kwargs: dict[str, Any]
) -> nn.Module:
    """timm's features_only form of `model`, with its weights (random or loaded).

    timm lays a features_only model out differently (some families drop or rename modules), so the
    weights go through timm's own state_dict passthrough, as pretrained weights do in timm.
    """
    import timm

    if out_indices is not None:
        kwargs = {**kwargs, "out_indices": tuple(out_indices)}
    return timm.create_model(
        timm_name,
        features_only=True,
        pretrained=True,
        pretrained_cfg_overlay=dict(state_dict=model.state_dict()),
        **kwargs,
    )
