"""RNNPool-Face detectors (RNNPool paper Section 5.3, Appendix F.2): an RNNPool stem, MobileNetV2 blocks
and S3FD heads, in torchvision's detection interface.

- `rnnpool_face_c`, `_quant`, `_qvga_mono`, `_m4`: EdgeML's models (examples/pytorch/vision/
  Face_Detection/models/RPool_Face_*.py), block for block, so their checkpoints load and their outputs
  match (tests/test_face_models.py, against outputs of EdgeML's own code);
- `rnnpool_face_a`, `_b`: only in the paper (Tables 12, 13); built from the tables, choices in their
  builders' docstrings.

All share EdgeML's choices: ConvBNReLU6 convs, torchvision's InvertedResidual (ReLU6, the same keys),
8x8 RNNPool patches at stride 4 with one replicated row/column ("edgeml" padding), L2Norm on the first
three sources (scales 10, 8, 5), one loc and one conf conv per source, the first conf conv predicting 3
background logits whose max is kept (S3FD's max-out background), square priors of S3FD's steps and
sizes, thresholds and top-k of EdgeML's configs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.ops.misc import Conv2dNormActivation

from leanvision.errors import InvalidArgumentError
from leanvision.layers import ImageNormalize, RNNPoolLayer
from leanvision.layers.conv import stack_convs
from leanvision.models.base import init_like_torchvision, model_name
from leanvision.models.face.checkpoint import load_face_checkpoint
from leanvision.models.face.loss import multibox_loss, target_boxes
from leanvision.models.face.matching import THRESHOLDS
from leanvision.models.face.postprocess import detect
from leanvision.models.face.priors import VARIANCES, prior_boxes
from leanvision.models.mobilenet import DepthwiseSeparable
from leanvision.models.registry import register_model

Row = tuple[str, int, int, int, int]  # (operator, t, c, n, s): one row of the paper's architecture tables
OPERATORS = ("bottleneck", "conv3x3", "conv1x1", "dwsep")

# EdgeML's configs: config.py (VGA, 640x480 RGB) and config_qvga.py (QVGA, 320x240 grayscale).
VGA = dict(steps=(4, 8, 16, 32, 64, 128), anchor_sizes=(16, 32, 64, 128, 256, 512), score_thresh=0.01)
QVGA = dict(steps=(8, 8, 16, 16), anchor_sizes=(8, 16, 32, 48), score_thresh=0.05)
# EdgeML subtracts the BGR mean (104, 117, 123) from 0-255 pixels and does not scale; a grayscale input is
# 0.299 R + 0.587 G + 0.114 B of that, so its mean is 117.312. Ours take 0-1 images, hence the 1/255 std.
RGB_MEAN = (123 / 255, 117 / 255, 104 / 255)
GRAY_MEAN = ((0.299 * 123 + 0.587 * 117 + 0.114 * 104) / 255,)
PIXEL_STD = 1 / 255
L2NORM_SCALES = (10.0, 8.0, 5.0)  # S3FD's, on the first three sources
MAXOUT_BACKGROUND = 3  # S3FD's Nm on the first (stride-4) source


@dataclass(frozen=True)
class Source:
    """A map the detector predicts from: the blocks from the previous source to it, and its head.

    `l2norm`: the scale of an L2Norm before the head; `head_width`: a strided 3x3 ConvBNReLU6 of this
    width before each of the head's convs (RNNPool-Face-Quant's first head, stride 2 -> 4).
    """

    rows: tuple[Row, ...] = ()
    l2norm: float | None = None
    kernel_size: int = 3
    head_width: int | None = None


class L2Norm(nn.Module):
    """Each location's channel vector scaled to unit L2 norm, then by a learned per-channel weight
    (SSD's conv4_3 normalisation): x / max(||x||, 1e-10). EdgeML computes x / (||x|| + 1e-10), the same to
    float32 precision wherever ||x|| > 1e-6; the ONNX exporter drops that tiny addition (0 / 0 = NaN at an
    all-zero location), a clamp it keeps."""

    def __init__(self, channels: int, scale: float, eps: float = 1e-10) -> None:
        super().__init__()
        self.eps = eps
        self.weight: nn.Parameter | None = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # not torch.linalg.vector_norm(x, dim=1): on CPU it is 20-40x slower over the channel dimension
        x = x / x.square().sum(1, keepdim=True).sqrt_().clamp_min(self.eps)
        if self.weight is None:  # folded into a conv
            return x
        weight = self.weight.view(1, -1, 1, 1)
        return x * weight if torch.is_grad_enabled() else x.mul_(weight)  # in place: one map fewer alive


class DetectionHead(nn.Module):
    """One source's box offsets (4 per location) and face/background logits (2 per location).

    With `background_maxout` > 1 the classifier predicts that many background logits and keeps their max.
    Returns loc [B, 4, h, w] and conf [B, 2, h, w].
    """

    def __init__(
        self,
        in_channels: int,
        kernel_size: int = 3,
        l2norm: float | None = None,
        head_width: int | None = None,
        background_maxout: int = 1,
    ) -> None:
        super().__init__()
        self.background_maxout = background_maxout
        self.l2norm = L2Norm(in_channels, l2norm) if l2norm else nn.Identity()
        self.loc = self._branch(in_channels, 4, kernel_size, head_width)
        self.conf = self._branch(in_channels, background_maxout + 1, kernel_size, head_width)
        self.merged: nn.Module | None = None  # the two branches as one (fuse_for_inference_)

    @staticmethod
    def _branch(in_channels: int, out_channels: int, kernel_size: int, width: int | None) -> nn.Module:
        if width is None:
            return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        return nn.Sequential(
            Conv2dNormActivation(in_channels, width, 3, 2, activation_layer=nn.ReLU6),
            nn.Conv2d(width, out_channels, kernel_size, padding=kernel_size // 2),
        )

    def fuse_for_inference_(self) -> None:
        """Run the loc and conf branches, which read the same input, as one convolution (one per layer of
        a head_width branch), with the L2Norm's scales folded into it: fewer, larger calls. Inference only,
        after BN folding (called by leanvision.deploy.fuse_for_inference); a branch with unfolded BN stays
        as it is."""
        if isinstance(self.loc, nn.Conv2d):
            merged = stack_convs([self.loc, self.conf])
        elif all(isinstance(b[0][1], nn.Identity) for b in (self.loc, self.conf)):  # BN folded
            first = stack_convs([self.loc[0][0], self.conf[0][0]])
            second = stack_convs([self.loc[1], self.conf[1]], split_input=True)
            merged = nn.Sequential(first, nn.ReLU6(), second) if first and second else None
        else:
            merged = None
        if merged is None:
            return
        del self.loc, self.conf
        self.merged = merged
        if isinstance(self.l2norm, L2Norm) and self.l2norm.weight is not None:  # a scale per input channel
            reader = merged if isinstance(merged, nn.Conv2d) else merged[0]
            with torch.no_grad():
                reader.weight.mul_(self.l2norm.weight.view(1, -1, 1, 1))
            self.l2norm.weight = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.l2norm(x)
        if self.merged is None:
            loc, conf = self.loc(x), self.conf(x)
        else:
            loc, conf = self.merged(x).split((4, self.background_maxout + 1), 1)
        if self.background_maxout > 1:
            m = self.background_maxout
            conf = torch.cat([conf[:, :m].amax(1, keepdim=True), conf[:, m:]], 1)
        return loc, conf


def _locations_last(maps: list[torch.Tensor]) -> torch.Tensor:
    """Maps [B, k, h, w] as one [B, sum of h w, k], locations row-major, map after map; each map is taken
    out of `maps` and freed once copied (so no map is alive twice: RAM that streaming inference counts)."""
    batch, channels = maps[0].shape[:2]
    out = maps[0].new_empty(batch, sum(m.shape[2] * m.shape[3] for m in maps), channels)
    start = 0
    while maps:
        m = maps.pop(0)
        size = m.shape[2] * m.shape[3]
        out[:, start : start + size].view(batch, *m.shape[2:], channels).copy_(m.permute(0, 2, 3, 1))
        start += size
        del m
    return out


def make_blocks(rows: Sequence[Row], in_channels: int) -> tuple[list[nn.Module], int]:
    """The blocks of table rows (operator, t, c, n, s), n per row, the first of each with stride s."""
    blocks = []
    for op, t, c, n, s in rows:
        if op not in OPERATORS:
            raise InvalidArgumentError(f"unknown operator {op!r} in {rows}; expected one of {OPERATORS}")
        for i in range(n):
            stride = s if i == 0 else 1
            if op == "bottleneck":
                blocks.append(InvertedResidual(in_channels, c, stride, expand_ratio=t))
            elif op == "dwsep":
                blocks.append(DepthwiseSeparable(in_channels, c, stride, dw_act=nn.ReLU6, pw_act=nn.ReLU6))
            else:
                kernel = 3 if op == "conv3x3" else 1
                blocks.append(Conv2dNormActivation(in_channels, c, kernel, stride, activation_layer=nn.ReLU6))
            in_channels = c
    return blocks, in_channels


class RNNPoolFace(nn.Module):
    """S3FD-style detector: stem convs -> RNNPoolLayer (8x8 patches, stride 4) -> blocks, heads per source.

    torchvision's detection interface: in eval mode `model(images)` takes a list of [C, H, W] tensors (0-1
    pixels; sizes may differ, they are padded at the bottom/right) or a [B, C, H, W] batch and returns one
    dict per image {boxes [N, 4] x1, y1, x2, y2 pixels, scores [N], labels [N] (1: face)}; in training
    mode `model(images, targets)` (targets: dicts with "boxes" [N, 4] pixels, optional "labels", all 1)
    returns {"loss_box_reg", "loss_classifier"}. `head_outputs(x)` gives the raw outputs of a normalised
    batch, EdgeML's 'train' phase output.

    `sources` lists the maps after the RNNPool the heads read; `stem_source` one on the stem output
    (before the RNNPool). `rnn_sparsity`: fractions of W and U kept, for RNN1 and RNN2 (masks, see
    FastGRNNCell). Images are normalised with `image_mean` / `image_std` (default: EdgeML's).
    """

    head_output_names = ("loc", "conf", "priors")

    def __init__(
        self,
        sources: Sequence[Source],
        hidden_size: int,
        in_chans: int = 3,
        stem_widths: Sequence[int] = (),
        stem_source: Source | None = None,
        rnn_sparsity: tuple[tuple[float, float], tuple[float, float]] | None = None,
        steps: Sequence[int] = VGA["steps"],
        anchor_sizes: Sequence[int] = VGA["anchor_sizes"],
        score_thresh: float = VGA["score_thresh"],
        nms_thresh: float = 0.3,
        pre_nms_top_k: int = 5000,
        post_nms_top_k: int = 750,
        variances: Sequence[float] = VARIANCES,
        match_thresholds: Sequence[float] = THRESHOLDS,
        neg_pos_ratio: int = 3,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        num_sources = len(sources) + (stem_source is not None)
        if not len(steps) == len(anchor_sizes) == num_sources:
            raise InvalidArgumentError(
                f"{num_sources} sources need as many steps and anchor sizes, got {list(steps)} and "
                f"{list(anchor_sizes)}"
            )
        self.in_chans = in_chans
        self.steps, self.anchor_sizes, self.variances = tuple(steps), tuple(anchor_sizes), tuple(variances)
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.pre_nms_top_k, self.post_nms_top_k = pre_nms_top_k, post_nms_top_k
        self.match_thresholds, self.neg_pos_ratio = tuple(match_thresholds), neg_pos_ratio
        default_mean = RGB_MEAN if in_chans == 3 else GRAY_MEAN
        self.image_mean = tuple(image_mean if image_mean is not None else default_mean)
        self.image_std = tuple(image_std if image_std is not None else (PIXEL_STD,) * in_chans)
        self.normalize = ImageNormalize(self.image_mean, self.image_std)

        stem, channels = [], in_chans
        for i, width in enumerate(stem_widths):
            stem.append(
                Conv2dNormActivation(channels, width, 3, 2 if i == 0 else 1, activation_layer=nn.ReLU6)
            )
            channels = width
        self.stem = nn.Sequential(*stem)
        heads = []
        if stem_source is not None:
            heads.append(self._head(channels, stem_source, len(heads)))
        self.rnnpool = RNNPoolLayer(channels, hidden_size, hidden_size, patch_size=8, stride=4)
        if rnn_sparsity is not None:
            for cell, (w_kept, u_kept) in zip((self.rnnpool.pool.rnn1, self.rnnpool.pool.rnn2), rnn_sparsity):
                cell.w_sparsity, cell.u_sparsity = w_kept, u_kept
                cell.sparsify()
        blocks, channels = [], self.rnnpool.out_channels
        self.taps = []  # number of blocks run before each source
        for source in sources:
            new, channels = make_blocks(source.rows, channels)
            blocks += new
            self.taps.append(len(blocks))
            heads.append(self._head(channels, source, len(heads)))
        self.features = nn.Sequential(*blocks)
        self.heads = nn.ModuleList(heads)
        self.has_stem_source = stem_source is not None
        init_like_torchvision(self)

    @staticmethod
    def _head(channels: int, source: Source, index: int) -> DetectionHead:
        maxout = MAXOUT_BACKGROUND if index == 0 else 1
        return DetectionHead(channels, source.kernel_size, source.l2norm, source.head_width, maxout)

    def head_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw outputs of a normalised batch x [B, C, H, W]: loc [B, P, 4], conf [B, P, 2] (logits) and
        the priors [P, 4] (normalised cx, cy, w, h)."""
        if x.ndim != 4:
            raise InvalidArgumentError(
                f"{model_name(self)} expects a batch [B, C, H, W], got {list(x.shape)}"
            )
        self._check_channels(x.shape[1])
        image_size, outputs = (x.shape[2], x.shape[3]), []
        x = stem = self.stem(x)
        x = self.rnnpool(x)
        if self.has_stem_source:  # after the RNNPool: the memory analysis fuses the stem convs into it
            outputs.append(self.heads[0](stem))
        for i, block in enumerate(self.features, 1):
            x = block(x)
            if i in self.taps:
                outputs.append(self.heads[len(outputs)](x))
        sizes = [tuple(loc.shape[2:]) for loc, _ in outputs]
        priors = prior_boxes(sizes, image_size, self.steps, self.anchor_sizes, x.device)
        locs, confs = [loc for loc, _ in outputs], [conf for _, conf in outputs]
        del outputs, x  # the maps' only references are in locs and confs, which _locations_last empties
        return _locations_last(locs), _locations_last(confs), priors

    def forward(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        targets: Sequence[dict[str, torch.Tensor]] | None = None,
    ) -> list[dict[str, torch.Tensor]] | dict[str, torch.Tensor]:
        x = self.batch_images(images)
        image_size = (x.shape[2], x.shape[3])
        loc, conf, priors = self.head_outputs(x)
        if not self.training:
            return detect(
                loc, conf, priors, image_size, self.score_thresh, self.nms_thresh, self.pre_nms_top_k,
                self.post_nms_top_k, self.variances,
            )  # fmt: skip
        if targets is None or len(targets) != len(x):
            raise InvalidArgumentError(
                f"{model_name(self)} in training mode needs one target dict per image "
                f"({len(x)} images, got {'no targets' if targets is None else len(targets)})"
            )
        boxes, valid = target_boxes(targets, image_size, x.device)
        return multibox_loss(
            loc, conf, priors, boxes, valid, self.match_thresholds, self.variances, self.neg_pos_ratio
        )

    def batch_images(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Normalised batch [B, C, H, W] of 0-1 images; a list is zero-padded (after normalisation, as
        torchvision does) at the bottom/right to its largest height and width: padded with the mean pixel,
        then normalised by `self.normalize` (a module, which streaming moves into its patch groups)."""
        if isinstance(images, torch.Tensor):
            if images.ndim != 4:
                raise InvalidArgumentError(
                    f"{model_name(self)} takes a [B, C, H, W] batch or a list of [C, H, W] images, "
                    f"got a tensor of shape {list(images.shape)}"
                )
            self._check_channels(images.shape[1])
            return self.normalize(images)
        if not images:
            raise InvalidArgumentError(f"{model_name(self)} got an empty list of images")
        for image in images:
            if not isinstance(image, torch.Tensor) or image.ndim != 3:
                got = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
                raise InvalidArgumentError(f"{model_name(self)} takes [C, H, W] images, got {got}")
            self._check_channels(image.shape[0])
        height, width = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
        if all(tuple(i.shape[1:]) == (height, width) for i in images):  # nothing to pad
            return self.normalize(torch.stack(list(images)) if len(images) > 1 else images[0][None])
        batch = images[0].new_empty(len(images), self.in_chans, height, width)
        batch[:] = batch.new_tensor(self.image_mean).view(-1, 1, 1)
        for out, image in zip(batch, images):
            out[:, : image.shape[1], : image.shape[2]] = image
        return self.normalize(batch)

    def _check_channels(self, channels: int) -> None:
        if channels == self.in_chans:
            return
        kind = {1: "1-channel (grayscale)", 3: "3-channel (RGB)"}
        expected = kind.get(self.in_chans, f"{self.in_chans}-channel")
        hint = (
            "; convert with torchvision.transforms.v2.Grayscale() (0.299 R + 0.587 G + 0.114 B)"
            if self.in_chans == 1
            else ""
        )
        raise InvalidArgumentError(
            f"{model_name(self)} takes {expected} images, got {channels} channels{hint}"
        )

    def load_pretrained(self, path: str | Path) -> RNNPoolFace:
        """Load our state_dict or a checkpoint saved by EdgeML's train.py (see `checkpoint`)."""
        return load_face_checkpoint(self, path)


def _rows(*rows: Row) -> tuple[Row, ...]:
    return rows


FACE_C = (
    Source(_rows(("bottleneck", 1, 24, 1, 1), ("bottleneck", 6, 24, 1, 1)), L2NORM_SCALES[0], kernel_size=5),
    Source(_rows(("bottleneck", 6, 32, 3, 2)), L2NORM_SCALES[1], kernel_size=5),
    Source(_rows(("bottleneck", 6, 64, 4, 2)), L2NORM_SCALES[2], kernel_size=5),
    Source(_rows(("bottleneck", 6, 96, 3, 2)), kernel_size=1),
    Source(_rows(("bottleneck", 6, 160, 2, 2)), kernel_size=1),
    Source(_rows(("bottleneck", 6, 320, 1, 2)), kernel_size=3),
)
FACE_QUANT = (
    Source(_rows(("bottleneck", 2, 16, 4, 1)), L2NORM_SCALES[1]),
    Source(_rows(("bottleneck", 2, 24, 4, 2)), L2NORM_SCALES[2]),
    Source(_rows(("bottleneck", 2, 32, 2, 2))),
    Source(_rows(("bottleneck", 2, 64, 1, 2))),
    Source(_rows(("bottleneck", 2, 96, 1, 2))),
)
FACE_QVGA_MONO = (
    Source(_rows(("bottleneck", 2, 32, 4, 1)), L2NORM_SCALES[0]),
    Source(_rows(("bottleneck", 2, 32, 4, 1)), L2NORM_SCALES[1]),
    Source(_rows(("bottleneck", 2, 96, 3, 2)), L2NORM_SCALES[2]),
    Source(_rows(("bottleneck", 2, 128, 3, 1))),
)
FACE_M4 = (
    Source(_rows(("bottleneck", 2, 32, 1, 1)), L2NORM_SCALES[0]),
    Source(_rows(("bottleneck", 2, 32, 1, 1)), L2NORM_SCALES[1]),
    Source(_rows(("bottleneck", 2, 64, 1, 2)), L2NORM_SCALES[2]),
    Source(_rows(("bottleneck", 2, 64, 1, 1))),
)
FACE_B = (  # paper Table 12
    Source(_rows(("conv3x3", 1, 24, 4, 1)), L2NORM_SCALES[0]),
    Source(
        _rows(("conv3x3", 1, 96, 1, 2), ("conv1x1", 1, 32, 1, 1), ("bottleneck", 6, 32, 3, 1)),
        L2NORM_SCALES[1],
    ),
    Source(_rows(("bottleneck", 6, 64, 3, 2)), L2NORM_SCALES[2]),
    Source(_rows(("bottleneck", 6, 128, 2, 2))),
    Source(_rows(("bottleneck", 6, 160, 1, 2))),
    Source(_rows(("bottleneck", 6, 320, 1, 2))),
)
FACE_A = (  # paper Table 13
    Source(_rows(("dwsep", 1, 16, 4, 1)), L2NORM_SCALES[0]),
    Source(_rows(("dwsep", 1, 16, 1, 2), ("bottleneck", 1, 16, 3, 1)), L2NORM_SCALES[1]),
    Source(_rows(("bottleneck", 1, 24, 3, 2)), L2NORM_SCALES[2]),
    Source(_rows(("bottleneck", 1, 32, 2, 2))),
    Source(_rows(("bottleneck", 2, 128, 1, 2))),
    Source(_rows(("bottleneck", 2, 160, 1, 2))),
)


def rnnpool_face_c(**kwargs) -> RNNPoolFace:
    """RNNPool-Face-C (EdgeML RPool_Face_C): RNNPool (h = 16) on the 640x480 RGB image, 15 MBConvs.

    As EdgeML's code, not the paper's Table 11 / F.2 text: [1,24,1,1] + [6,24,1,1] (Table 11: t=6, n=2)
    and 5x5 / 1x1 / 3x3 heads (F.2: "two 3x3 convolutional kernels").
    """
    return RNNPoolFace(FACE_C, hidden_size=16, **{**VGA, **kwargs})


def rnnpool_face_quant(**kwargs) -> RNNPoolFace:
    """RNNPool-Face-Quant (EdgeML RPool_Face_Quant, paper Table 14): two ConvBNReLU6 (3 -> 4, stride 2;
    4 -> 4), RNNPool h = 8 (32 channels as Table 14; Section 5.3 and F.2 say h = 4), 12 MBConvs.

    The first head runs on the stride-2 stem output through its own strided ConvBNReLU6 (4 -> 8).
    """
    return RNNPoolFace(
        FACE_QUANT, hidden_size=8, stem_widths=(4, 4), stem_source=Source((), L2NORM_SCALES[0], head_width=8),
        **{**VGA, **kwargs},
    )  # fmt: skip


def rnnpool_face_qvga_mono(**kwargs) -> RNNPoolFace:
    """EdgeML's RPool_Face_QVGA_monochrome (the C reference's face-2): 320x240 grayscale, ConvBNReLU6
    (1 -> 4, stride 2), RNNPool h = 16, 14 MBConvs, 4 sources at strides 8, 8, 16, 16 (config_qvga)."""
    return RNNPoolFace(FACE_QVGA_MONO, hidden_size=16, stem_widths=(4,), **{"in_chans": 1, **QVGA, **kwargs})


def rnnpool_face_m4(**kwargs) -> RNNPoolFace:
    """RNNPool-Face-M4 (EdgeML RPool_Face_M4, paper Table 15): as QVGA-mono with 4 MBConvs; RNNPool's
    W1 keeps 50% of its weights and U1, W2, U2 30% (masks, recomputed by `sparsify()`; EdgeML only
    enforces them while fine-tuning: loading an EdgeML checkpoint sets the masks to ones, so its weights
    run as saved)."""
    return RNNPoolFace(
        FACE_M4, hidden_size=16, stem_widths=(4,), rnn_sparsity=((0.5, 0.3), (0.3, 0.3)),
        **{"in_chans": 1, **QVGA, **kwargs},
    )  # fmt: skip


def rnnpool_face_b(**kwargs) -> RNNPoolFace:
    """RNNPool-Face-B, from paper Table 12 (no code exists): RNNPool h = 6 (24 channels) on the image,
    4 conv3x3 24, conv3x3 96 stride 2, conv1x1 32, then MBConv stacks; heads after the conv3x3 24 stack
    (F.2: "after the second row") and after each MBConv stack: strides 4 ... 128 as S3FD.

    Our choices where the paper is silent, all as EdgeML's other models: convs are ConvBNReLU6, patches
    8x8 at stride 4, heads one 3x3 conv each, L2Norm on the first three sources, max-out background on
    the first. The table as printed has 1,250,424 parameters (its MBConv stacks alone 1.17M), 11.6% more
    than Table 4's 1.12M; its MACs (1.21G) and peak RAM (1.76 MB) do match Table 4.
    """
    return RNNPoolFace(FACE_B, hidden_size=6, **{**VGA, **kwargs})


def rnnpool_face_a(**kwargs) -> RNNPoolFace:
    """RNNPool-Face-A, from paper Table 13 (no code exists): RNNPool with 16 output channels, so h = 4
    (F.2's h = 16 would give 64), 5 depthwise-separable 3x3 + 1x1 blocks (ConvBNReLU6 each, no
    residual), then MBConv stacks; heads as RNNPool-Face-B (and the same choices). The table as printed
    has 118,102 parameters and 130M MACs against Table 4's 0.06M and 0.10G: its last two rows (t = 2)
    alone hold 88,704 parameters (with t = 1 there the network would have 56,310). Peak RAM matches."""
    return RNNPoolFace(FACE_A, hidden_size=4, **{**VGA, **kwargs})


_TABLE4 = "RNNPool Table 4 (WIDER FACE val, 640x480 RGB)"
_VGA_CONFIG = dict(input_size=(3, 480, 640), mean=RGB_MEAN, std=(PIXEL_STD,) * 3)
_QVGA_CONFIG = dict(input_size=(1, 240, 320), mean=GRAY_MEAN, std=(PIXEL_STD,))
DETECTORS = {
    "rnnpool_face_c": (
        rnnpool_face_c,
        _VGA_CONFIG,
        dict(source=_TABLE4, peak_ram="6.44 MB", params_m=1.52, madds_g=1.80, map=(0.92, 0.89, 0.70)),
    ),
    "rnnpool_face_b": (
        rnnpool_face_b,
        _VGA_CONFIG,
        dict(source=_TABLE4, peak_ram="1.76 MB", params_m=1.12, madds_g=1.18, map=(0.87, 0.84, 0.67)),
    ),
    "rnnpool_face_a": (
        rnnpool_face_a,
        _VGA_CONFIG,
        dict(source=_TABLE4, peak_ram="1.17 MB", params_m=0.06, madds_g=0.10, map=(0.77, 0.75, 0.53)),
    ),
    "rnnpool_face_quant": (
        rnnpool_face_quant,
        _VGA_CONFIG,
        dict(source=_TABLE4, peak_ram="225 KB", params_m=0.07, madds_g=0.12, map=(0.80, 0.78, 0.53)),
    ),
    "rnnpool_face_qvga_mono": (rnnpool_face_qvga_mono, _QVGA_CONFIG, {}),
    "rnnpool_face_m4": (
        rnnpool_face_m4,
        _QVGA_CONFIG,
        dict(source="RNNPool Table 5 (SCUT-HEAD)", peak_ram="188 KB", madds_m=70, map=0.58),
    ),
}
for _name, (_builder, _config, _paper) in DETECTORS.items():
    register_model(_name, _builder, paper=_paper, **_config)
