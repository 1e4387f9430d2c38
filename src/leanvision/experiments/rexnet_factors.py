"""ReXNet Table 2, the factor analysis of Section 3.2 (`leanvision repro rexnet-factors`).

Four networks of two inverted bottlenecks with similar MACs, each adding one factor to the previous one,
are trained on a dataset that exists offline; we report test accuracy and the nuclear norm of the final
(penultimate) feature over the test split (leanvision.analysis.feature_rank):

1. baseline: the first 1x1 conv of each bottleneck has dimension ratio 1/20 (expansion ratio 20), each
   bottleneck has dimension ratio d_in/d_out 0.22, ReLU6 after every conv but the linear projection
   (MobileNetV2-like);
2. + the first 1x1 conv's dimension ratio 1/6 (expansion ratio 6);
3. + every bottleneck's dimension ratio 0.8 (channels grow gently, as in ReXNet's linear rule);
4. + SiLU instead of the first ReLU6 of each bottleneck (after the expansion conv).

The paper gives no widths or layout; our reading, with ReXNet's blocks (leanvision.layers.LinearBottleneck):
stem 3x3 conv stride 2 + BN + ReLU6 to `s` channels; bottleneck 1 (s -> c1, stride 2) and bottleneck 2
(c1 -> c2, stride 1, so with ReXNet's partial shortcut) with c1 = round(s / r), c2 = round(c1 / r) for the
block dimension ratio r; a 1x1 conv + BN + ReLU6 to `head` channels (the final feature), global average
pooling and a linear classifier. The baseline's stem has `width` channels; every other network gets the
stem width whose MACs come closest to the baseline's, so the block ratios are exact and the cost is matched
(the paper matches FLOPs too: 103M, 99M, 105M, 105M; footnote 4 says its stem is fixed, which with exact
ratios in both blocks cannot also match the cost, so we let the stem width carry the cost). The head width
is the same for all four, so their final features have the same dimension. Each network is trained
`seeds` times (the paper averages three) with the same recipe; numbers are means over the seeds.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from leanvision.analysis.cost import profile
from leanvision.analysis.feature_rank import penultimate_features, spectrum_of, summarize
from leanvision.engine.data import DataSplits, build_dataset
from leanvision.engine.train import TrainConfig, train
from leanvision.engine.train_state import empty_output_dir
from leanvision.errors import InvalidArgumentError
from leanvision.layers import ClassifierHead, ConvNormAct, LinearBottleneck
from leanvision.models.base import Classifier, feature_level


@dataclass(frozen=True)
class Factors:
    """One row of Table 2: what the network is and the paper's numbers for it (CIFAR-100, mean of 3)."""

    name: str
    change: str
    expansion: int
    block_ratio: float
    exp_act: str
    paper_flops_m: int
    paper_top1: float
    paper_nuclear_norm: float


TABLE2 = (
    Factors("baseline", "baseline", 20, 0.22, "relu6", 103, 48.0, 5997.5),
    Factors("expansion", "+ DR of 1x1 conv 1/20 -> 1/6", 6, 0.22, "relu6", 99, 52.1, 6655.9),
    Factors("block-ratio", "+ DR of IB 0.22 -> 0.8", 6, 0.8, "relu6", 105, 53.8, 6703.2),
    Factors("silu", "+ SiLU for the first ReLU6", 6, 0.8, "silu", 105, 54.6, 6895.9),
)
ACTS = {"relu6": nn.ReLU6, "silu": nn.SiLU}


class FactorNet(Classifier):
    """Stem -> two inverted bottlenecks -> 1x1 conv to `head` channels -> pool -> linear (see above)."""

    def __init__(
        self,
        stem: int,
        factors: Factors,
        head: int = 256,
        num_classes: int = 10,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.total_stride = 4
        c1 = round(stem / factors.block_ratio)
        c2 = round(c1 / factors.block_ratio)
        self.channels = (stem, c1, c2, head)
        act = ACTS[factors.exp_act]
        self.stem = ConvNormAct(in_chans, stem, 3, stride=2, act_layer=nn.ReLU6)
        self.features = nn.Sequential(
            LinearBottleneck(stem, c1, 2, factors.expansion, exp_act=act),
            LinearBottleneck(c1, c2, 1, factors.expansion, exp_act=act),
            ConvNormAct(c2, head, act_layer=nn.ReLU6),
        )
        self.feature_info = [feature_level(-1, stem, 2), feature_level(1, c2, 4)]
        self.head = ClassifierHead(head, num_classes)


def macs_of(model: nn.Module, data: DataSplits) -> int:
    """MACs of one image of `data` through `model`."""
    return profile(model, (data.channels, data.image_size, data.image_size)).macs


def stem_widths(data: DataSplits, width: int = 8, head: int = 256) -> list[int]:
    """Stem width of each TABLE2 network for `data`: `width` for the baseline, then MACs matched to it."""
    if width < 1 or head < 1:
        raise InvalidArgumentError(f"width and head must be positive channel counts, got {width} and {head}")

    def macs(stem: int, factors: Factors) -> int:
        return macs_of(FactorNet(stem, factors, head, data.num_classes, data.channels), data)

    budget = macs(width, TABLE2[0])
    widths = [width]
    for factors in TABLE2[1:]:
        low, high = 1, 16 * width  # MACs grow with the stem width: the widest at or under the budget
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if macs(middle, factors) <= budget else (low, middle - 1)
        widths.append(min((low, low + 1), key=lambda stem: abs(macs(stem, factors) - budget)))
    return widths


def rexnet_factors(
    out: str | Path,
    data: str = "fashion-mnist",
    epochs: int = 3,
    seeds: int = 1,
    width: int = 8,
    head: int = 256,
    img_size: int | None = 16,
    train_size: int | None = 5000,
    lr: float = 0.005,
    log: Callable[[str], None] = print,
    **train_kwargs: Any,
) -> list[dict[str, Any]]:
    """Train the four Table 2 networks on `data` (images resized to `img_size`, the first `train_size`
    training images) `seeds` times each. One row per network: channels, MACs, mean test accuracy and
    nuclear norms over the whole test split, beside the paper's numbers. Writes one training folder per
    run and rexnet_factors.json to `out` (which must be empty). The defaults fit a few CPU minutes."""
    if seeds < 1:
        raise InvalidArgumentError(f"seeds must be at least 1, got {seeds}")
    out = empty_output_dir(out)
    splits = build_dataset(data, img_size)
    if splits.multilabel:
        raise InvalidArgumentError(
            f"{data!r} is multi-label; Table 2 needs a single-label dataset such as fashion-mnist"
        )
    if train_size is not None:
        splits = dataclasses.replace(
            splits, train=Subset(splits.train, range(min(train_size, len(splits.train))))
        )
    config = {
        "epochs": epochs,
        "lr": lr,
        "opt": "adamw",
        "batch_size": 128,
        "progress": False,
        **train_kwargs,
    }
    rows = []
    for factors, stem in zip(TABLE2, stem_widths(splits, width, head)):
        runs = []
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = FactorNet(stem, factors, head, splits.num_classes, splits.channels)
            run = TrainConfig(
                factors.name, data, img_size=img_size, seed=seed, out=str(out / f"{factors.name}-seed{seed}"),
                **config,
            )  # fmt: skip
            result = train(run, model=model, data=splits)
            result.raise_if_interrupted()
            nuclear, normalized, rank = summarize(spectrum_of(penultimate_features(result.model, splits.val)))
            runs.append(
                dict(
                    acc=result.val["acc"], nuclear_norm=nuclear, normalized_nuclear_norm=normalized, rank=rank
                )
            )
            log(f"{factors.name} seed {seed}: test acc {runs[-1]['acc']:.2f}%, nuclear norm {nuclear:.1f}")
        macs = macs_of(model, splits)
        rows.append(
            dict(
                network=factors.name, change=factors.change, expansion=factors.expansion,
                block_ratio=factors.block_ratio, exp_act=factors.exp_act, channels=list(model.channels),
                macs=macs, params=sum(p.numel() for p in model.parameters()), seeds=seeds,
                **{k: mean(r[k] for r in runs) for k in runs[0]},
                paper=dict(
                    flops_m=factors.paper_flops_m, top1=factors.paper_top1,
                    nuclear_norm=factors.paper_nuclear_norm,
                ),
            )
        )  # fmt: skip
    (out / "rexnet_factors.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows
