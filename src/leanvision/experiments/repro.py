"""The RNNPool paper's experiments that fit a CPU (`leanvision repro NAME`).

- `rnnpool-probe` (Appendix C.1, Table 7): for each probe dataset, the smallest RNNPool (h1, h2 powers of
  2, by parameter count) that lets one linear layer fit the test set to 100% (exact match for the
  multi-label sets), with and without a preceding conv (8 filters, 3x3, stride 2); and the MDS plot of
  the RNNPool outputs on the lines set with row/column-permuted test images (Figure 4 right).
- `pooling-one-go` (Appendix C.2): the whole image to 1x1 in one go by RNNPool (h1 = h2 = 32), a strided
  conv of 128 filters, or max / average pooling then a 1x1 conv to 128; each followed by a linear layer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leanvision.engine.data import DataSplits, build_dataset
from leanvision.engine.train import TrainConfig, train
from leanvision.engine.train_state import empty_output_dir
from leanvision.errors import InvalidArgumentError
from leanvision.layers import RNNPool

PROBE_SETTINGS = (("lines", 32), ("multilines", 32), ("multilines", 64), ("shapes", 64))
PAPER_TABLE7 = {  # (dataset, size) -> (h1, h2) with conv, (h1, h2) without
    ("lines", 32): ((4, 16), (16, 32)),
    ("multilines", 32): ((8, 8), (32, 32)),
    ("multilines", 64): ((8, 16), (32, 32)),
    ("shapes", 64): ((8, 16), (32, 32)),  # printed as "h1 = 8 = h2 = 16"
}
ONE_GO_KINDS = ("rnnpool", "conv", "avg", "max")
PAPER_ONE_GO = {"cifar10": {"rnnpool": 70.63, "conv": 53.13, "avg": 26.53, "max": 20.04}}


class ProbeNet(nn.Module):
    """[optional conv 8x3x3 stride 2 + ReLU] -> one RNNPool over the whole map -> BN -> linear.

    The BatchNorm1d is an affine map at inference, so it folds into the linear layer and the classifier is
    still one linear layer. It is there for training: at the reference initialisation (biases one, weights
    0.1 * randn) each FastGRNN sweep shrinks the differences between images about a hundredfold, so the
    pooled features differ by ~3e-4 between images and a bare linear layer on them stays at chance.
    """

    def __init__(self, num_outputs: int, hidden1: int, hidden2: int, conv: bool, in_chans: int = 1) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_chans, 8, 3, 2, 1), nn.ReLU()) if conv else nn.Identity()
        self.pool = RNNPool(8 if conv else in_chans, hidden1, hidden2)
        self.norm = nn.BatchNorm1d(4 * hidden2)
        self.fc = nn.Linear(4 * hidden2, num_outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.features(x)))


def one_go_model(kind: str, in_chans: int, size: int, num_classes: int) -> nn.Module:
    """C.2's models: an image [B, C, size, size] pooled to 128 values in one go, then a linear layer."""
    if kind == "rnnpool":
        pool = RNNPool(in_chans, 32, 32)
    elif kind == "conv":
        pool = nn.Sequential(nn.Conv2d(in_chans, 128, size, stride=size), nn.Flatten())
    elif kind in ("avg", "max"):
        reduce = nn.AdaptiveAvgPool2d(1) if kind == "avg" else nn.AdaptiveMaxPool2d(1)
        pool = nn.Sequential(reduce, nn.Conv2d(in_chans, 128, 1), nn.Flatten())
    else:
        raise InvalidArgumentError(f"unknown one-go pooling {kind!r}; expected one of {ONE_GO_KINDS}")
    return nn.Sequential(pool, nn.Linear(128, num_classes))


def probe_candidates(max_hidden: int) -> list[tuple[int, int]]:
    """(h1, h2) powers of 2 from 4 to max_hidden, fewest RNNPool parameters first."""
    if not isinstance(max_hidden, int) or max_hidden < 4:
        raise InvalidArgumentError(
            f"max_hidden must be an integer >= 4 (the smallest probe), got {max_hidden}"
        )
    sizes = [2**i for i in range(2, int(np.log2(max_hidden)) + 1)]
    return sorted(
        ((h1, h2) for h1 in sizes for h2 in sizes),
        key=lambda h: (sum(p.numel() for p in RNNPool(8, *h).parameters()), h),
    )


def _fit(model: nn.Module, data: DataSplits, out: Path, config: dict[str, Any], stop_at_100: bool):
    torch.manual_seed(config.get("seed", 0))
    cfg = TrainConfig("probe", data.spec, out=str(out), opt="adamw", wd=0.0, **config)
    stop = (lambda row: row["val_acc"] >= 100.0) if stop_at_100 else None
    result = train(cfg, model=model, data=data, on_epoch_end=stop)
    result.raise_if_interrupted()
    return result


def rnnpool_probe(
    out: str | Path,
    train_size: int = 4000,
    val_size: int = 1000,
    epochs: int = 20,
    max_hidden: int = 32,
    settings: tuple[tuple[str, int], ...] = PROBE_SETTINGS,
    log: Callable[[str], None] = print,
    **train_kwargs: Any,
) -> list[dict[str, Any]]:
    """Table 7: one row per (dataset, size, conv) with the smallest fitting (h1, h2) or None."""
    probe_candidates(max_hidden)  # a bad max_hidden fails before the output folder is made
    out = empty_output_dir(out)
    config = {"epochs": epochs, "lr": 0.01, "batch_size": 64, "progress": False, **train_kwargs}
    rows, mds_model = [], None
    for name, size in settings:
        data = build_dataset(f"synthetic:{name},train={train_size},val={val_size}", size)
        for conv in (True, False):
            found, best = None, 0.0
            for h1, h2 in probe_candidates(max_hidden):
                model = ProbeNet(data.num_classes, h1, h2, conv)
                result = _fit(
                    model, data, out / f"{name}{size}-{'conv' if conv else 'noconv'}-{h1}-{h2}", config, True
                )
                best = max(row["val_acc"] for row in result.history)
                log(
                    f"{name} {size}x{size} {'with' if conv else 'without'} conv, h1={h1} h2={h2}: {best:.2f}%"
                )
                if (name, size, conv) == ("lines", 32, False):
                    mds_model = result.model
                if best >= 100.0:
                    found = (h1, h2)
                    break
            paper = PAPER_TABLE7[(name, size)][0 if conv else 1]
            rows.append(dict(data=name, size=size, conv=conv, ours=found, best_acc=best, paper=paper))
    (out / "table7.json").write_text(json.dumps(rows, indent=2) + "\n")
    if mds_model is not None:
        lines = build_dataset(f"synthetic:lines,train=1,val={val_size}", 32)
        plot_permuted_mds(mds_model, lines, out / "mds_lines.png")
    return rows


def classical_mds(features: np.ndarray, dims: int = 2) -> np.ndarray:
    """Classical (Torgerson) multi-dimensional scaling of points [N, D] to [N, dims]."""
    squared = ((features[:, None] - features[None]) ** 2).sum(-1)
    center = np.eye(len(features)) - 1.0 / len(features)
    values, vectors = np.linalg.eigh(-0.5 * center @ squared @ center)
    top = np.argsort(values)[::-1][:dims]
    return vectors[:, top] * np.sqrt(np.maximum(values[top], 0))


@torch.no_grad()
def plot_permuted_mds(
    model: ProbeNet, data: DataSplits, path: Path, permuted: int = 50, seed: int = 0
) -> None:
    """Figure 4 right: MDS of RNNPool outputs of the test set plus row/column-permuted 80 and 100 degree
    images (black: 80, brown: 100)."""
    from leanvision.plotting import new_figure, save_figure

    images = torch.stack([data.val[i][0] for i in range(len(data.val))])
    labels = torch.stack([data.val[i][1] for i in range(len(data.val))])
    g = torch.Generator().manual_seed(seed)
    extra, extra_labels = [], []
    for label in (4, 5):  # 80 and 100 degrees
        for image in images[labels == label][:permuted]:
            rows, cols = (
                torch.randperm(image.shape[1], generator=g),
                torch.randperm(image.shape[2], generator=g),
            )
            extra.append(image[:, rows][:, :, cols])
            extra_labels.append(label)
    model.eval()
    points = classical_mds(model.features(torch.cat([images, torch.stack(extra)])).double().numpy())
    fig, ax = new_figure(figsize=(6, 6))
    n = len(images)
    ax.scatter(*points[:n].T, c=labels.numpy(), cmap="tab10", s=6, label="test images (colour: class)")
    for label, colour in ((4, "black"), (5, "saddlebrown")):
        mask = n + np.flatnonzero(np.array(extra_labels) == label)
        ax.scatter(*points[mask].T, c=colour, s=10, label=f"{20 * label} degrees, rows/cols permuted")
    ax.set_title("RNNPool outputs on the lines test set (classical MDS)")
    ax.legend(fontsize=7)
    save_figure(fig, path, dpi=100, tight=False)


def pooling_one_go(
    out: str | Path,
    datasets: tuple[str, ...] = ("fashion-mnist",),
    epochs: int = 10,
    log: Callable[[str], None] = print,
    **train_kwargs: Any,
) -> list[dict[str, Any]]:
    """C.2: test accuracy of each one-go pooling on each dataset, with the paper's CIFAR-10 numbers."""
    out = empty_output_dir(out)
    config = {"epochs": epochs, "lr": 0.002, "batch_size": 128, "progress": False, **train_kwargs}
    rows = []
    for spec in datasets:
        data = build_dataset(spec)
        for kind in ONE_GO_KINDS:
            model = one_go_model(kind, data.channels, data.image_size, data.num_classes)
            result = _fit(model, data, out / f"{spec.split(':')[0]}-{kind}", config, False)
            paper = PAPER_ONE_GO.get(spec.split(":")[0], {}).get(kind)
            rows.append(dict(data=spec, pooling=kind, acc=result.val["acc"], paper=paper))
            log(f"{spec} {kind}: {result.val['acc']:.2f}%" + (f" (paper {paper}%)" if paper else ""))
    (out / "pooling_one_go.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows
