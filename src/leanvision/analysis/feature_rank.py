"""Singular values of a trained model's penultimate features: ReXNet Section 6 (Figure 5), Table 2.

The penultimate feature of an image is the input of the model's classifier (for our models the pooled
vector, after the head's hidden layer if it has one). Stacked over a dataset split they form F (N x D).
The paper measures the rank of F two ways, and we report both plus one scale-free number:
- the nuclear norm ||F||_* = sum_i sigma_i (Table 2, Figure 5 left). It grows with the number of images
  N and with the scale of the features, so it compares models only on the same images;
- the cumulative distribution of the singular values "normalized to [0, 1]" (Figure 5 right), which we
  read as sigma_i / sigma_1 (singular values are >= 0): the fraction of singular values at or below each
  value. A model whose curve lies lower (to the right) has more large singular values, a higher rank;
- the normalised nuclear norm sum_i sigma_i / sigma_1, the sum of those normalised values: between 1
  (rank one) and min(N, D) (all singular values equal); it does not change when F is scaled.
The paper does not say whether F is centred; we take the features as the classifier sees them. Singular
values are computed in float64 from the float32 features.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from leanvision.analysis.rank import RANK_RTOL, numerical_rank
from leanvision.errors import InvalidArgumentError


@dataclass
class FeatureSpectrum:
    """The singular values of one model's penultimate features over a split, and their summaries."""

    model: str
    checkpoint: str
    data: str
    split: str
    images: int
    dim: int
    singular_values: list[float]  # descending
    nuclear_norm: float
    normalized_nuclear_norm: float
    rank: int  # singular values above RANK_RTOL * the largest

    def to_dict(self) -> dict:
        return asdict(self)


def classifier_of(model: nn.Module) -> nn.Module:
    """The final classifier layer: `get_classifier()` (timm interface), else a `fc` or `classifier`
    attribute (torchvision; the last layer of a Sequential)."""
    if hasattr(model, "get_classifier"):
        return model.get_classifier()
    for name in ("fc", "classifier"):
        layer = getattr(model, name, None)
        if isinstance(layer, nn.Sequential):
            layer = layer[-1]
        if isinstance(layer, nn.Module):
            return layer
    raise InvalidArgumentError(
        f"{type(model).__name__} has no classifier to take the penultimate features from: expected "
        "get_classifier(), or a `fc` or `classifier` layer"
    )


@torch.no_grad()
def penultimate_features(
    model: nn.Module,
    dataset: Dataset,
    max_images: int | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """[N, D] inputs of the classifier of `model` (eval mode) for the first `max_images` of `dataset`."""
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}")
    if max_images is not None:
        if max_images < 1:
            raise InvalidArgumentError(f"max_images must be at least 1, got {max_images}")
        dataset = Subset(dataset, range(min(max_images, len(dataset))))
    if len(dataset) == 0:
        raise InvalidArgumentError("cannot take features of an empty dataset")
    captured: list[torch.Tensor] = []
    hook = classifier_of(model).register_forward_pre_hook(
        lambda module, inputs: captured.append(inputs[0].flatten(1).float().cpu())
    )
    was_training = model.training
    model.eval()
    try:
        for images, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            model(images.to(device))
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(captured)


def summarize(singular_values: torch.Tensor) -> tuple[float, float, int]:
    """(nuclear norm, nuclear norm / largest singular value, rank at RANK_RTOL) of descending values."""
    nuclear = singular_values.sum().item()
    largest = singular_values[0].item()
    return nuclear, nuclear / largest if largest > 0 else 0.0, int(numerical_rank(singular_values, RANK_RTOL))


def spectrum_of(features: torch.Tensor) -> torch.Tensor:
    """Descending singular values (float64) of a feature matrix [N, D]."""
    if features.ndim != 2 or not features.shape[0] or not features.shape[1]:
        raise InvalidArgumentError(f"expected a non-empty feature matrix [N, D], got {list(features.shape)}")
    return torch.linalg.svdvals(features.double())
