"""ReXNet Figure 5 / Table 2 on a trained checkpoint: the singular values of its penultimate features over a
dataset split (the measures are defined in leanvision.analysis.feature_rank)."""

from __future__ import annotations

import torch

from leanvision.analysis.feature_rank import FeatureSpectrum, penultimate_features, spectrum_of, summarize
from leanvision.bench import check_device
from leanvision.engine.train import load_model_for_data
from leanvision.errors import InvalidArgumentError

SPLITS = ("val", "train")


def feature_spectrum(
    model_name: str,
    checkpoint: str,
    data_spec: str,
    split: str = "val",
    max_images: int | None = None,
    img_size: int | None = None,
    batch_size: int = 256,
    device: str = "cpu",
    strict: bool = False,
) -> FeatureSpectrum:
    """Singular values of `model_name`'s penultimate features (weights from `checkpoint`) over a split.

    The train split is read as training reads it, augmentation included (seeded, so repeatable).
    """
    if split not in SPLITS:
        raise InvalidArgumentError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    check_device(device)
    model, data = load_model_for_data(model_name, checkpoint, data_spec, img_size, strict)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the train split's augmentation draws from the global generator
        features = penultimate_features(
            model.to(device), getattr(data, split), max_images, batch_size, device
        )
    values = spectrum_of(features)
    nuclear, normalized, rank = summarize(values)
    return FeatureSpectrum(
        model_name, checkpoint, data_spec, split, features.shape[0], features.shape[1],
        values.tolist(), nuclear, normalized, rank,
    )  # fmt: skip


def plot_spectra(spectra: list[FeatureSpectrum], path: str) -> None:
    """Figure 5 (right): cumulative distribution of sigma_i / sigma_1, one curve per model."""
    from leanvision.plotting import new_figure, save_figure

    fig, ax = new_figure(figsize=(5, 4))
    for s in spectra:
        values = torch.tensor(s.singular_values)
        normalized = (values / values[0]).flip(0)  # ascending
        fraction = torch.arange(1, len(values) + 1) / len(values)
        label = f"{s.model} (sum sigma/sigma_1 = {s.normalized_nuclear_norm:.1f})"
        ax.step(normalized.numpy(), fraction.numpy(), where="post", label=label)
    ax.set_xlabel("singular value / largest")
    ax.set_ylabel("fraction of singular values")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"Penultimate features, {spectra[0].data} ({spectra[0].split})", fontsize=8)
    save_figure(fig, path, dpi=100)
