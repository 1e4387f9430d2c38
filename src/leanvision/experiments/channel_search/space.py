"""The channel-configuration search space of ReXNet Section 4 (Han et al., CVPR 2021).

Networks (Section 4.2): a 3x3 stem conv to 16 channels + BN + activation, D inverted bottlenecks with
expansion 6 whose output widths c_1 <= ... <= c_D are searched, a large 1x1 expansion layer, global pooling
and the classifier. Widths follow c_i = a f(i) + b with f a piecewise-linear function of the block index
through a random subset of breakpoints.

Our reading where the paper is silent:
- Strides: the stem keeps full resolution and blocks D // 3 and 2D // 3 (0-based) have stride 2: the two
  reductions of the CIFAR NAS networks the paper follows (DARTS [35], P-DARTS [4], DARTS+ [31]), 32x32 maps
  end at 8x8. D >= 2 (footnote 4) keeps the two positions apart.
- Every block has expansion 6, the first included ("we do not search the building blocks' expansion ratio").
- The penultimate expansion layer is a 1x1 conv to 6 * c_D channels + BN + activation. MobileNetV2's fixed
  1280 cannot meet Table 3(a) (0.2M parameters with CIFAR-100's 100 classes: 1280 * 101 for the classifier
  alone is 0.13M). With 6 * c_D, Table 3's best configurations (a)-(d) cost 0.18M/28.9M, 0.50M/92.0M,
  1.07M/183.6M and 3.29M/351.1M params/MACs against the paper's 0.2M/30M, 0.5M/101M, 1.0M/210M, 3.0M/351M.
- One activation after the stem, expansion, depthwise and head convs: ReLU6 by default, as MobileNetV2 and
  Section 4.4 (Section 4.2 writes ReLU for the stem). The projection conv is linear.
- Block types: "mbv2", MobileNetV2's inverted residual (shortcut only when stride 1 and c_in == c_out), or
  "rexnet", ReXNet's linear bottleneck (zero-padded partial shortcut when stride 1 and c_in <= c_out).
- Sampling: f(1) = 0, f(D) = 1; k interior breakpoints (k uniform in 0..D-2, then a uniform k-subset of
  blocks 2..D-1) take sorted uniform values in [0, 1], and f is linear in between. A straight line (k = 0)
  and stage-wise steps (equal values, then a jump between neighbouring blocks) are both in the space.
  b = c_1 is uniform in [min_channels, the widest flat network that fits]; a is then the largest value that
  keeps the network within both limits, so every candidate spends its budget (Table 3's groups all sit at
  the limits) and the search compares shapes. c_i = round(a f(i) + b).
- Costs are analytic: parameters (convs, BN weights and biases, classifier) and MACs of the convolutions
  and the classifier at batch 1, what leanvision.profile counts. The paper's "FLOPs" are these MACs (its
  ReXNet x1.0 "0.40B FLOPs" are 0.398G MACs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from torch import nn

from leanvision.errors import InvalidArgumentError
from leanvision.layers import ClassifierHead, ConvNormAct, LinearBottleneck
from leanvision.models.base import Classifier, feature_level

STEM_CHANNELS = 16
EXPANSION = 6
HEAD_EXPANSION = 6
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "silu": nn.SiLU,
    "hardswish": nn.Hardswish,
    "elu": nn.ELU,
}


class InvertedResidual(LinearBottleneck):
    """MobileNetV2's inverted residual: the linear bottleneck with a shortcut only where shapes match."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.use_shortcut = self.use_shortcut and self.in_channels == self.out_channels


BLOCKS: dict[str, type[LinearBottleneck]] = {"mbv2": InvertedResidual, "rexnet": LinearBottleneck}


@dataclass(frozen=True)
class SearchSpace:
    """The networks of one search: depth, activation and block type, sized for the data."""

    blocks: int
    in_chans: int = 3
    img_size: int = 32
    num_classes: int = 100
    act: str = "relu6"
    block: str = "mbv2"
    min_channels: int = 8

    def __post_init__(self) -> None:
        if self.blocks < 2:
            raise InvalidArgumentError(
                f"blocks must be >= 2 (ReXNet footnote 4: one block cannot reach the budget), "
                f"got {self.blocks}"
            )
        if self.act not in ACTIVATIONS:
            raise InvalidArgumentError(
                f"unknown activation {self.act!r}; expected one of {sorted(ACTIVATIONS)}"
            )
        if self.block not in BLOCKS:
            raise InvalidArgumentError(f"unknown block type {self.block!r}; expected one of {sorted(BLOCKS)}")
        sizes = {n: getattr(self, n) for n in ("in_chans", "img_size", "num_classes", "min_channels")}
        if min(sizes.values()) < 1:
            raise InvalidArgumentError(
                f"in_chans, img_size, num_classes and min_channels must be >= 1, got {sizes}"
            )

    @property
    def strides(self) -> tuple[int, ...]:
        """Stride of each block: 2 at blocks D // 3 and 2D // 3 (0-based), 1 elsewhere."""
        reductions = {self.blocks // 3, 2 * self.blocks // 3}
        return tuple(2 if i in reductions else 1 for i in range(self.blocks))

    def to_dict(self) -> dict:
        return asdict(self)


def check_channels(channels: Sequence[int], space: SearchSpace) -> None:
    """Raise a ValueError unless `channels` are space.blocks positive, non-decreasing integers."""
    if len(channels) != space.blocks or any(not isinstance(c, int) or c < 1 for c in channels):
        raise InvalidArgumentError(f"expected {space.blocks} positive integer widths, got {list(channels)}")
    if any(a > b for a, b in zip(channels, channels[1:])):
        raise InvalidArgumentError(f"widths must be non-decreasing (paper eq. 1), got {list(channels)}")


def network_cost(channels: Sequence[int], space: SearchSpace) -> tuple[int, int]:
    """(parameters, MACs) of the search network with block widths `channels`, as leanvision.profile counts."""
    check_channels(channels, space)
    size, c_in = space.img_size, STEM_CHANNELS
    params = 9 * space.in_chans * c_in + 2 * c_in  # conv + BN weight and bias
    macs = 9 * space.in_chans * c_in * size * size
    for c_out, stride in zip(channels, space.strides):
        mid = EXPANSION * c_in
        out_size = (size - 1) // stride + 1  # 3x3 depthwise conv, padding 1
        params += c_in * mid + 9 * mid + mid * c_out + 2 * (2 * mid + c_out)
        macs += c_in * mid * size * size + (9 * mid + mid * c_out) * out_size * out_size
        c_in, size = c_out, out_size
    head = HEAD_EXPANSION * c_in
    params += c_in * head + 2 * head + head * space.num_classes + space.num_classes
    macs += c_in * head * size * size + head * space.num_classes
    return params, macs


class ChannelSearchNet(Classifier):
    """Stem (16) -> D inverted bottlenecks of widths `channels` -> 1x1 conv to 6 c_D -> pool -> classifier."""

    def __init__(self, channels: Sequence[int], space: SearchSpace) -> None:
        super().__init__()
        check_channels(channels, space)
        act = ACTIVATIONS[space.act]
        self.in_chans = space.in_chans
        self.total_stride = math.prod(space.strides)
        self.stem = ConvNormAct(space.in_chans, STEM_CHANNELS, 3, act_layer=act)
        blocks: list[nn.Module] = []
        self.feature_info = []
        c_in, reduction = STEM_CHANNELS, 1
        for c_out, stride in zip(channels, space.strides):
            if stride > 1:
                self.feature_info.append(feature_level(len(blocks) - 1, c_in, reduction))
                reduction *= stride
            blocks.append(BLOCKS[space.block](c_in, c_out, stride, EXPANSION, exp_act=act, dw_act=act))
            c_in = c_out
        head = HEAD_EXPANSION * c_in
        blocks.append(ConvNormAct(c_in, head, act_layer=act))
        self.feature_info.append(feature_level(len(blocks) - 1, head, reduction))
        self.features = nn.Sequential(*blocks)
        self.head = ClassifierHead(head, space.num_classes)


@dataclass(frozen=True)
class Candidate:
    """One sampled configuration: widths c_i = round(a f(i) + b), f bending at `breakpoints` (1-based)."""

    channels: tuple[int, ...]
    params: int
    macs: int
    a: float
    b: int
    breakpoints: tuple[int, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def _fits(channels: list[int], space: SearchSpace, max_params: int, max_macs: int) -> bool:
    params, macs = network_cost(channels, space)
    return params <= max_params and macs <= max_macs


def widest_flat(space: SearchSpace, max_params: int, max_macs: int) -> int:
    """The largest width b whose flat network (every block b) fits; a ValueError when none does."""
    if max_params < 1 or max_macs < 1:
        raise InvalidArgumentError(
            f"max_params and max_macs must be positive, got {max_params} and {max_macs}"
        )
    smallest = [space.min_channels] * space.blocks
    if not _fits(smallest, space, max_params, max_macs):
        params, macs = network_cost(smallest, space)
        raise InvalidArgumentError(
            f"no network of {space.blocks} blocks meets max_params {max_params:,} and max_macs "
            f"{max_macs:,}: the smallest (every block {space.min_channels} channels) has {params:,} params "
            f"and {macs:,} MACs"
        )
    lo, hi = space.min_channels, 2 * space.min_channels
    while _fits([hi] * space.blocks, space, max_params, max_macs):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # lo fits, hi does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _fits([mid] * space.blocks, space, max_params, max_macs) else (lo, mid)
    return lo


def _widths(a: float, b: int, shape: np.ndarray) -> list[int]:
    return [int(round(a * float(s) + b)) for s in shape]


def sample_candidate(
    space: SearchSpace, max_params: int, max_macs: int, rng: np.random.Generator, b_max: int
) -> Candidate:
    """One random configuration that spends the budget (see the module docstring); b_max = widest_flat()."""
    d = space.blocks
    k = int(rng.integers(0, d - 1))
    interior = np.sort(rng.choice(np.arange(1, d - 1), size=k, replace=False))
    xs = np.concatenate([[0], interior, [d - 1]])
    ys = np.concatenate([[0.0], np.sort(rng.random(k)), [1.0]])
    shape = np.interp(np.arange(d), xs, ys)
    b = int(rng.integers(space.min_channels, b_max + 1))
    lo, hi = 0.0, 1.0  # the slope a: lo fits (the flat network of width b <= b_max does), hi does not
    while _fits(_widths(hi, b, shape), space, max_params, max_macs):
        lo, hi = hi, 2 * hi
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _fits(_widths(mid, b, shape), space, max_params, max_macs) else (lo, mid)
    channels = _widths(lo, b, shape)
    params, macs = network_cost(channels, space)
    return Candidate(tuple(channels), params, macs, round(lo, 4), b, tuple(int(x) + 1 for x in xs))


def sample_candidates(
    space: SearchSpace, max_params: int, max_macs: int, seed: int, count: int
) -> list[Candidate]:
    """The first `count` distinct configurations of the stream seeded by `seed` (draw j uses seed (seed, j)),
    so a longer search extends a shorter one with the same seed."""
    b_max = widest_flat(space, max_params, max_macs)
    seen: set[tuple[int, ...]] = set()
    candidates: list[Candidate] = []
    draws = 20 * count + 100
    for draw in range(draws):
        candidate = sample_candidate(space, max_params, max_macs, np.random.default_rng([seed, draw]), b_max)
        if candidate.channels not in seen:
            seen.add(candidate.channels)
            candidates.append(candidate)
            if len(candidates) == count:
                return candidates
    raise InvalidArgumentError(
        f"only {len(candidates)} distinct configurations in {draws} draws: the limits leave too little room "
        f"for {count} models; raise max_params/max_macs or ask for fewer models"
    )
