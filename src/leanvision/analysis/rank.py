"""The rank study of ReXNet (Han et al., CVPR 2021), Section 3.2 and Figure 1.

For every block type and nonlinearity f we build `networks` random-sized single-block networks per
channel dimension ratio d_in / d_out, feed them a batch X of N inputs and average rank(F) / d_out over
the networks, where F (d_out x N) is the block's output feature.

Our reading of the paper:

- Inputs are the paper's X in R^{d_in x N}: N vectors, i.e. 1x1 feature maps, standardised per channel
  (zero mean, unit variance over the batch, as if produced by a BN). A kxk convolution with zero padding
  on a 1x1 map reduces to its centre tap, so a 3x3 convolution is a d_out x d_in matrix (like a 1x1 one,
  with its own random draw) and a 3x3 depthwise convolution is a per-channel scale.
- d_out is drawn uniformly from [d_min, d_max] per network; d_in = max(1, round(ratio * d_out)); N > d_out.
- Every convolution is followed by BN (training-mode batch statistics, weight 1, bias 0) and f comes after
  the BN ("f denotes a nonlinear function with the normalization"). Weights are standard normal; their
  scale does not matter because a BN follows each convolution.
- Blocks:
  conv1x1, conv3x3: f(BN(W X)) with W d_out x d_in.
  ib_conv, ib_dwconv: the inverted bottleneck of MobileNetV2 / ReXNet. A 1x1 expansion d_in -> d_out
  (its expansion ratio d_out / d_in is the reciprocal of the dimension ratio, as the paper says), BN, f;
  a 3x3 convolution d_out -> d_out (ib_conv) or a 3x3 depthwise convolution (ib_dwconv), BN; a linear
  1x1 projection d_out -> d_out, BN; then the shortcut adds the input to the first d_in channels
  (ReXNet's partial shortcut). Footnote 2: the block's input is the input of the first 1x1 convolution
  and its output is taken after the shortcut addition.
- One nonlinearity per inverted bottleneck, after the expansion (`bottleneck_act="expansion"`, default):
  the paper handles the block "similarly ... as a single convolution layer", f(W X) with one f, and the
  dimension ratio it studies is the expansion's; ReXNet (Section 4.4) puts its studied nonlinearity
  (SiLU) only there, the depthwise conv having ratio 1. `bottleneck_act="both"` also applies f after the
  middle conv (MobileNetV2's two ReLU6). We do not use ReXNet's fixed ReLU6 after the depthwise conv:
  with it the f = identity block is no longer linear, so there is no input-dimension reference.
- With f = identity every block is linear in the (zero-mean) input, so the rank is exactly
  min(d_in, d_out): the reference curve. That is also why the inputs stay 1x1: on an 8x8 map (rank over
  the d_out x N*H*W matrix) a linear 3x3 conv already reaches rank ratio 0.88 at d_in/d_out = 0.1 and 1.0
  from 0.2 (nine taps see 9 d_in inputs), which contradicts the paper's "the rank is originally bounded
  to the input dimension".

Rank numerics. f(W X) is generically full rank for any non-polynomial f, so every curve in Figure 1
depends on a numerical rank rule, which the paper does not state. Features are float32 (PyTorch's
default dtype, as the paper's networks). Two rules:
- relative (default): count the singular values above rtol * the largest one, as torch.linalg.matrix_rank
  does. The default rtol is RANK_RTOL = 0.01; rtol=None is torch's own default, eps(float32) *
  max(d_out, N) = 1.5e-5 at N=128, under which every nonlinearity is (near) full rank from ratio 0.2 up.
- energy: the fewest singular values that hold the fraction `energy` of sum sigma_i^2 (e.g. 0.999).
RANK_RTOL = 0.01 treats singular values below 1% of the largest as noise; torch's default is unlikely to
be the paper's rule, which has networks "fail to expand the rank close to the output dimension" under
drastic expansion. With RANK_RTOL, and equally with energy=0.999, these observations hold
(tests/test_rank.py): the rank ratio falls with the dimension ratio, more for the inverted bottlenecks
than for the single convolutions (not at rtol 0.03, where the single convs fall as far); every
nonlinearity lifts it above d_in / d_out; the lift is larger for single convolutions than for the
bottlenecks. The bottleneck parts of the first and last are one fact seen twice: the bottleneck's f(BN(W
X)) is a single 1x1 conv's feature, and its curves lie lower because the linear maps after f (middle conv,
projection, their BNs) are random, badly conditioned matrices that push some directions under the
tolerance. Not reproduced under any rule or construction we tried: the depthwise bottleneck falling most
(with one f per bottleneck the dense random middle conv makes ib_conv fall more; with two, both
bottlenecks fall far less than the single convs) and SiLU/ELU lifting more than ReLU (after BN, 27% of the
variance of ReLU(z) is nonlinear in z, 20% for SiLU and 6% for ELU). Features of different d_out are zero-
padded to d_max rows for one batched SVD; zero rows change neither the singular values nor max(d_max, N) =
N.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from leanvision.errors import InvalidArgumentError

BLOCKS = ("conv1x1", "conv3x3", "ib_conv", "ib_dwconv")
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "softplus": F.softplus,
    "hardswish": F.hardswish,
    "silu": F.silu,
    "identity": lambda x: x,
}
RATIOS = tuple(round(0.1 * i, 1) for i in range(1, 11))
BOTTLENECK_ACTS = ("expansion", "both")
RANK_RTOL = 0.01


@dataclass
class RankStudy:
    """Mean rank ratio rank(F) / d_out per block, activation and dimension ratio (in `ratios` order)."""

    ratios: list[float]
    networks: int
    batch: int
    d_out_range: tuple[int, int]
    seed: int
    rtol: float | None
    energy: float | None
    bottleneck_act: str
    rank_ratio: dict[str, dict[str, list[float]]]

    def to_dict(self) -> dict:
        return asdict(self)


def _bn(h: torch.Tensor) -> torch.Tensor:
    """Training-mode BN of a (channels, N) feature: per-channel batch statistics, weight 1, bias 0."""
    return (h - h.mean(1, keepdim=True)) / torch.sqrt(h.var(1, unbiased=False, keepdim=True) + 1e-5)


def numerical_rank(
    singular_values: torch.Tensor, rtol: float = RANK_RTOL, energy: float | None = None
) -> torch.Tensor:
    """Rank from singular values sorted in descending order along the last dimension.

    Without `energy`: how many exceed rtol * the largest (torch.linalg.matrix_rank's rule). With `energy`:
    the fewest leading ones whose squares sum to at least that fraction of the total.
    """
    if energy is None:
        return (singular_values > rtol * singular_values[..., :1]).sum(-1)
    squares = singular_values.double() ** 2
    kept = squares.cumsum(-1) / squares.sum(-1, keepdim=True)
    return ((kept < energy).sum(-1) + 1).clamp(max=singular_values.shape[-1])  # rounding when energy=1


def _features(
    block: str, d_in: int, d_out: int, batch: int, bottleneck_act: str, g: torch.Generator
) -> list[torch.Tensor]:
    """One random network of `block`: its (d_out, batch) output for every activation, in ACTIVATIONS order.

    The weights and input are drawn once and shared by all activations.
    """
    x = _bn(torch.randn(d_in, batch, generator=g))
    if block in ("conv1x1", "conv3x3"):
        h = _bn(torch.randn(d_out, d_in, generator=g) @ x)
        return [f(h) for f in ACTIVATIONS.values()]
    expand = torch.randn(d_out, d_in, generator=g)
    if block == "ib_conv":
        middle = torch.randn(d_out, d_out, generator=g)
    else:  # ib_dwconv: the centre taps of the depthwise kernels
        middle = torch.diag(torch.randn(d_out, generator=g))
    project = torch.randn(d_out, d_out, generator=g)
    out = []
    for f in ACTIVATIONS.values():
        h = _bn(middle @ f(_bn(expand @ x)))
        y = _bn(project @ (f(h) if bottleneck_act == "both" else h))
        y[:d_in] += x
        out.append(y)
    return out


def rank_study(
    blocks: Sequence[str] = BLOCKS,
    activations: Sequence[str] = tuple(ACTIVATIONS),
    networks: int = 100,
    ratios: Sequence[float] = RATIOS,
    batch: int = 128,
    seed: int = 0,
    rtol: float | None = RANK_RTOL,
    d_out_range: tuple[int, int] = (16, 64),
    energy: float | None = None,
    bottleneck_act: str = "expansion",
) -> RankStudy:
    """Average rank(f(block(X))) / d_out over `networks` random-sized networks per block and ratio.

    The rank counts singular values above rtol * the largest (rtol=None: torch's default), or, given
    `energy`, the fewest that hold that fraction of the squared sum; see the module docstring.
    """
    for name, given, known in (("block", blocks, BLOCKS), ("activation", activations, ACTIVATIONS)):
        unknown = [b for b in given if b not in known]
        if unknown or not given:
            raise InvalidArgumentError(
                f"unknown {name} {unknown or given!r}; expected some of {', '.join(known)}"
            )
    bad = [r for r in ratios if not 0 < r <= 1]
    if bad or not ratios:
        raise InvalidArgumentError(f"dimension ratios must lie in (0, 1], got {list(ratios)!r}")
    d_min, d_max = d_out_range
    if not 1 <= d_min <= d_max:
        raise InvalidArgumentError(
            f"d_out_range must be (low, high) with 1 <= low <= high, got {d_out_range!r}"
        )
    if batch <= d_max:
        raise InvalidArgumentError(f"batch must exceed the largest d_out ({d_max}) as N > d_out, got {batch}")
    if networks < 1:
        raise InvalidArgumentError(f"networks must be at least 1, got {networks}")
    if rtol is not None and not 0 <= rtol < 1:
        raise InvalidArgumentError(f"rtol must lie in [0, 1), got {rtol}")
    if energy is not None and not 0 < energy <= 1:
        raise InvalidArgumentError(f"energy must lie in (0, 1], got {energy}")
    if bottleneck_act not in BOTTLENECK_ACTS:
        raise InvalidArgumentError(
            f"unknown bottleneck_act {bottleneck_act!r}; expected one of {BOTTLENECK_ACTS}"
        )
    if rtol is None:
        rtol = torch.finfo(torch.float32).eps * max(d_max, batch)

    g = torch.Generator().manual_seed(seed)
    columns = [list(ACTIVATIONS).index(a) for a in activations]
    result: dict[str, dict[str, list[float]]] = {b: {a: [] for a in activations} for b in blocks}
    for block in blocks:
        for ratio in ratios:
            padded = torch.zeros(networks, len(ACTIVATIONS), d_max, batch)
            d_outs = torch.randint(d_min, d_max + 1, (networks,), generator=g)
            for m, d_out in enumerate(d_outs.tolist()):
                d_in = max(1, round(ratio * d_out))
                for k, feature in enumerate(_features(block, d_in, d_out, batch, bottleneck_act, g)):
                    padded[m, k, :d_out] = feature
            singular_values = torch.linalg.svdvals(padded.mT)  # tall: much faster on CPU
            ranks = numerical_rank(singular_values, rtol, energy)
            mean = (ranks / d_outs[:, None]).mean(0)
            for a, k in zip(activations, columns):
                result[block][a].append(round(mean[k].item(), 4))
    used_rtol = None if energy is not None else rtol  # the energy rule replaces the relative one
    return RankStudy(
        list(ratios), networks, batch, d_out_range, seed, used_rtol, energy, bottleneck_act, result
    )


def plot_rank_study(study: RankStudy, path: str) -> None:
    """Figure 1: rank ratio vs dimension ratio, one panel per block, one curve per activation."""
    from leanvision.plotting import new_figure, save_figure

    blocks = list(study.rank_ratio)
    fig, axes = new_figure(1, len(blocks), figsize=(4 * len(blocks), 3.6), squeeze=False)
    for ax, block in zip(axes[0], blocks):
        for activation, values in study.rank_ratio[block].items():
            style = "k--" if activation == "identity" else "-"
            ax.plot(study.ratios, values, style, marker=".", label=activation)
        ax.set_title(block)
        ax.set_xlabel("dimension ratio d_in / d_out")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("rank ratio rank / d_out")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"Rank study, mean over {study.networks} random networks per point (N={study.batch})")
    save_figure(fig, path, dpi=100)
