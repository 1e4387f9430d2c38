"""Lean forms of blocks, for streaming inference (eval mode, batch 1; larger batches image by image):
each computes its block's output while holding the block's input, its output and one group of work.

- ChunkedBottleneck: inverted-residual / MBConv / ReXNet / depthwise-separable blocks channel group by
  channel group (expand -> depthwise for a group of the expanded channels, then that group's share of the
  projection added into the output): the layer convention's "input + output";
- BandedBasicBlock: ResNet's BasicBlock band of output rows by band (recomputing the halo rows);
- StreamedDenseBlock: DenseNet's dense block written into one preallocated output;
- BandedTransition, ChunkedMaxPool: DenseNet's transition in row bands; max pools in channel groups;
- InPlaceConv: conv -> BN -> activation with BN and activation in place on the conv's output.
`lean_module(module, input_shape, band_bytes)` gives the lean form of a module, or None.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair
from torchvision.models import densenet
from torchvision.models.efficientnet import MBConv
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock
from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation

from leanvision.deploy.regions import Span, conv_out
from leanvision.errors import InvalidArgumentError
from leanvision.layers import LinearBottleneck


@dataclass(frozen=True)
class ConvStep:
    """A convolution, the BatchNorm after it (or None) and the activation after that."""

    conv: nn.Conv2d
    bn: nn.BatchNorm2d | None
    act: nn.Module

    def affine(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-channel (offset, scale, shift) of the conv bias and eval-mode BN, applied to the convolution
        without its bias as (y + offset) * scale + shift: the order of BN's own (y - mean) * ... + beta.

        Kept apart from the weights, not folded into them: folding (and scaling before subtracting the
        mean) reorders the rounding, which moves the outputs beyond 1e-5 of the eager model's."""
        conv, bn = self.conv, self.bn
        bias = conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)
        if bn is None:
            return bias, torch.ones_like(bias), torch.zeros_like(bias)
        return _norm_affine(bn, bias)


def _norm_affine(
    bn: nn.BatchNorm2d, bias: torch.Tensor | float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(offset, scale, shift) of eval-mode `bn` after a bias: (y + offset) * scale + shift."""
    return bias - bn.running_mean, bn.weight / torch.sqrt(bn.running_var + bn.eps), bn.bias


@dataclass
class _Chunk:
    """One group of expanded channels [start, stop): its slices of the weights and affines."""

    start: int
    stop: int
    expand: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # weight [g, C_in], scale, shift [g, 1]
    depthwise: tuple[
        torch.Tensor, torch.Tensor, torch.Tensor
    ]  # weight [g, 1, k, k], scale, shift [1, g, 1, 1]
    project_weight: torch.Tensor  # [C_out, g]


class ChunkedBottleneck(nn.Module):
    """[1x1 expand, BN, act] -> depthwise, BN, act [-> squeeze-excite -> act] -> 1x1 project, BN, act
    [+ shortcut], one group of expanded channels at a time: each group's share of the projection is added
    into the output, so the expanded and depthwise maps are never whole (batch 1 runs as matrix products).

    `se` maps the depthwise output's channel means [1, C, 1, 1] to its channel scales: the means need
    every group, so with an SE the groups run twice (means first, then scale and project), recomputing
    the expansion and the depthwise conv. `post_se_act` follows the scaling (ReXNet's dw activation).
    `shortcut`: "none", "add" (input + output) or "partial" (the input added to the first input-width
    output channels, ReXNet's zero-padded shortcut).
    """

    def __init__(
        self,
        expand: ConvStep | None,
        depthwise: ConvStep,
        project: ConvStep,
        shortcut: str,
        group: int,
        se: Callable[[torch.Tensor], torch.Tensor] | None = None,
        post_se_act: nn.Module | None = None,
    ) -> None:
        super().__init__()
        dw, pw = depthwise.conv, project.conv
        if (
            dw.groups != dw.in_channels
            or pw.kernel_size != (1, 1)
            or (expand and expand.conv.kernel_size != (1, 1))
        ):
            raise InvalidArgumentError(
                "ChunkedBottleneck needs 1x1 expand and project convs around a depthwise one"
            )
        if shortcut not in ("none", "add", "partial") or group < 1:
            raise InvalidArgumentError(
                f"need shortcut none/add/partial and group >= 1, got {shortcut!r}, {group}"
            )
        self.shortcut, self.stride, self.padding, self.dilation = shortcut, dw.stride, dw.padding, dw.dilation
        self.expand_act = expand.act if expand else nn.Identity()
        self.dw_act, self.project_act = depthwise.act, project.act
        self.se, self.post_se_act = se, post_se_act or nn.Identity()
        with torch.no_grad():
            self.project_affine = tuple(t[:, None].clone() for t in project.affine())
            dw_affine, ex_affine = depthwise.affine(), expand.affine() if expand else None
            self.chunks = []
            for start in range(0, dw.in_channels, group):
                part = slice(start, min(start + group, dw.in_channels))
                expand_part = None
                if expand is not None:
                    weight = expand.conv.weight[part, :, 0, 0]
                    expand_part = (weight.clone(), *(t[part, None].clone() for t in ex_affine))
                depthwise_part = (
                    dw.weight[part].clone(),
                    *(t[None, part, None, None].clone() for t in dw_affine),
                )
                self.chunks.append(
                    _Chunk(
                        part.start, part.stop, expand_part, depthwise_part, pw.weight[:, part, 0, 0].clone()
                    )
                )

    def _depthwise(self, chunk: _Chunk, x: torch.Tensor) -> torch.Tensor:
        """The chunk's expanded channels after the depthwise conv, BN and act: [1, group, H', W']."""
        if chunk.expand is None:
            e = x[:, chunk.start : chunk.stop]
        else:
            weight, offset, scale, shift = chunk.expand
            e = torch.mm(weight, x.view(x.shape[1], -1)).add_(offset).mul_(scale).add_(shift)
            e = self.expand_act(e).view(1, -1, *x.shape[2:])
        weight, offset, scale, shift = chunk.depthwise
        d = F.conv2d(e, weight, None, self.stride, self.padding, self.dilation, len(weight))
        return self.dw_act(d.add_(offset).mul_(scale).add_(shift))

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        scales = None
        if self.se is not None:  # first pass: the channel means the squeeze-excite needs
            means = torch.cat(
                [self._depthwise(chunk, x).mean((2, 3), keepdim=True) for chunk in self.chunks], 1
            )
            scales = self.se(means)
        out = None
        for chunk in self.chunks:
            d = self._depthwise(chunk, x)
            if scales is not None:
                d = d.mul_(scales[:, chunk.start : chunk.stop])
            d = self.post_se_act(d)
            if out is None:
                out_size = d.shape[2:]
                out = torch.mm(chunk.project_weight, d.view(d.shape[1], -1))
            else:
                out.addmm_(chunk.project_weight, d.view(d.shape[1], -1))
            del d
        offset, scale, shift = self.project_affine
        out = self.project_act(out.add_(offset).mul_(scale).add_(shift))
        x2d = x.view(x.shape[1], -1)
        if self.shortcut == "add":
            out += x2d
        elif self.shortcut == "partial":
            out[: x.shape[1]] += x2d
        return out.view(1, -1, *out_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return self._one(x)
        return torch.cat([self._one(image[None]) for image in x])


@dataclass(frozen=True)
class _Rows:
    """Rows [start, start + tensor.shape[2]) of a map `height` rows high."""

    tensor: torch.Tensor
    start: int
    height: int


def _conv_rows(layer: InPlaceConv, rows: _Rows, out: Span, out_height: int) -> _Rows:
    """Rows `out` (inside [0, out_height)) of layer(map), from the rows of the map that `rows` holds."""
    inside, top, bottom = out.through_conv(layer.conv).clip(rows.height)
    if inside.start < rows.start or inside.stop > rows.start + rows.tensor.shape[2]:
        raise AssertionError(f"rows {inside} of the input are needed, {rows.start}.. are held")
    x = F.pad(rows.tensor[:, :, inside.start - rows.start : inside.stop - rows.start], (0, 0, top, bottom))
    return _Rows(layer(x, padding=(0, layer.conv.padding[1])), out.start, out_height)


class BandedBasicBlock(nn.Module):
    """torchvision's BasicBlock (3x3 conv, BN, ReLU, 3x3 conv, BN, + shortcut, ReLU) band of output rows by
    band: each band's first conv covers its rows plus the halo row above and below that the second reads
    (recomputed by the neighbouring bands), so the block holds its input, its output and one band."""

    def __init__(self, block: nn.Module, rows_per_band: int) -> None:
        super().__init__()
        if rows_per_band < 1:
            raise InvalidArgumentError(f"rows_per_band must be >= 1, got {rows_per_band}")
        self.conv1 = InPlaceConv(ConvStep(block.conv1, block.bn1, nn.ReLU()))
        self.conv2 = InPlaceConv(ConvStep(block.conv2, block.bn2, nn.Identity()))
        down = block.downsample
        self.downsample = None if down is None else InPlaceConv(ConvStep(down[0], down[1], nn.Identity()))
        self.rows_per_band = rows_per_band

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[2]
        mid = conv_out(height, self.conv1.conv, 0)
        out = None
        for r0 in range(0, mid, self.rows_per_band):
            band = Span(r0, min(r0 + self.rows_per_band, mid))
            held = _Rows(x, 0, height)
            halo, _, _ = band.through_conv(self.conv2.conv).clip(mid)
            h = _conv_rows(self.conv1, held, halo, mid)
            y = _conv_rows(self.conv2, h, band, mid).tensor
            if self.downsample is None:
                y += x[:, :, band.start : band.stop]
            else:
                y += _conv_rows(self.downsample, held, band, mid).tensor
            if out is None:
                out = x.new_empty(x.shape[0], y.shape[1], mid, y.shape[3])
            out[:, :, band.start : band.stop] = y.relu_()
            del h, y
        return out


class StreamedDenseBlock(nn.Module):
    """torchvision's _DenseBlock (eval mode) with its concatenations made once: the block's output is
    allocated up front, its input copied in, and every dense layer writes its new features into it. A
    layer's BN -> ReLU -> 1x1 conv reads the channels written so far in groups of `group` channels, adding
    each group's share of the 1x1 conv into the bottleneck map, so the block holds its input, its output,
    one bottleneck map and one group (the layer convention's "a dense block costs its output")."""

    def __init__(self, block: nn.Module, group: int) -> None:
        super().__init__()
        if group < 1:
            raise InvalidArgumentError(f"group must be >= 1, got {group}")
        self.group, self.layers = group, []
        with torch.no_grad():
            for layer in block.values():
                norm1 = _norm_affine(layer.norm1)
                norm2 = ConvStep(layer.conv1, layer.norm2, nn.ReLU()).affine()  # norm2 follows conv1
                self.layers.append(
                    (
                        tuple(t[:, None].clone() for t in norm1),
                        layer.conv1.weight[:, :, 0, 0].clone(),
                        tuple(t[None, :, None, None].clone() for t in norm2),
                        layer.conv2,
                    )
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            return torch.cat([self(image[None]) for image in x])
        grown = sum(conv2.out_channels for *_, conv2 in self.layers)
        out = x.new_empty(1, x.shape[1] + grown, *x.shape[2:])
        out[:, : x.shape[1]] = x
        flat, channels = out.view(out.shape[1], -1), x.shape[1]
        for (offset1, scale1, shift1), weight1, (offset2, scale2, shift2), conv2 in self.layers:
            bottleneck = None
            for start in range(0, channels, self.group):
                part = slice(start, min(start + self.group, channels))
                t = (flat[part] + offset1[part]).mul_(scale1[part]).add_(shift1[part]).relu_()
                if bottleneck is None:
                    bottleneck = torch.mm(weight1[:, part], t)
                else:
                    bottleneck.addmm_(weight1[:, part], t)
                del t
            b = bottleneck.view(1, -1, *x.shape[2:]).add_(offset2).mul_(scale2).add_(shift2).relu_()
            new = F.conv2d(b, conv2.weight, None, conv2.stride, conv2.padding, conv2.dilation, conv2.groups)
            del bottleneck, b
            out[:, channels : channels + new.shape[1]] = new
            channels += new.shape[1]
        return out


class BandedTransition(nn.Module):
    """torchvision's DenseNet _Transition (BN, ReLU, 1x1 conv, average pool without padding) band of output
    rows by band, so that neither its BN output nor its conv output is ever whole."""

    def __init__(self, transition: nn.Module, rows_per_band: int) -> None:
        super().__init__()
        if rows_per_band < 1:
            raise InvalidArgumentError(f"rows_per_band must be >= 1, got {rows_per_band}")
        with torch.no_grad():
            norm = _norm_affine(transition.norm)
            self.norm = tuple(t[None, :, None, None].clone() for t in norm)
        self.conv, self.pool, self.rows_per_band = transition.conv, transition.pool, rows_per_band

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (offset, scale, shift), conv, pool = self.norm, self.conv, self.pool
        kernel, stride = _pair(pool.kernel_size)[0], _pair(pool.stride or pool.kernel_size)[0]
        out_height = (x.shape[2] - kernel) // stride + 1
        out = None
        for r0 in range(0, out_height, self.rows_per_band):
            r1 = min(r0 + self.rows_per_band, out_height)
            band = (
                (x[:, :, r0 * stride : (r1 - 1) * stride + kernel] + offset).mul_(scale).add_(shift).relu_()
            )
            y = pool(F.conv2d(band, conv.weight, conv.bias))
            del band
            if out is None:
                out = x.new_empty(x.shape[0], y.shape[1], out_height, y.shape[3])
            out[:, :, r0:r1] = y
        return out


class ChunkedMaxPool(nn.Module):
    """nn.MaxPool2d channel group by channel group: PyTorch's CPU max pool also makes an int64 index map
    (twice the output's bytes at fp32), which is then never whole."""

    def __init__(self, pool: nn.MaxPool2d, group: int) -> None:
        super().__init__()
        if group < 1:
            raise InvalidArgumentError(f"group must be >= 1, got {group}")
        self.pool, self.group = pool, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for start in range(0, x.shape[1], self.group):
            y = self.pool(x[:, start : start + self.group])
            if out is None:
                out = x.new_empty(x.shape[0], x.shape[1], *y.shape[2:])
            out[:, start : start + y.shape[1]] = y
        return out


class InPlaceConv(nn.Module):
    """A convolution -> BN -> activation whose BN and activation run in place on the convolution's output,
    so that only the input and the output are alive (as a folded convolution; see ConvStep.affine)."""

    def __init__(self, step: ConvStep) -> None:
        super().__init__()
        self.conv, self.act = step.conv, copy.deepcopy(step.act)
        if hasattr(self.act, "inplace"):
            self.act.inplace = True
        with torch.no_grad():
            self.affine = tuple(t[None, :, None, None].clone() for t in step.affine())

    @classmethod
    def of(cls, module: nn.Module) -> InPlaceConv | None:
        """For torchvision's Conv2dNormActivation and leanvision's ConvNormAct; None for other modules."""
        from leanvision.layers import ConvNormAct

        if isinstance(module, Conv2dNormActivation):
            return cls(conv_norm_act_step(module))
        if isinstance(module, ConvNormAct):
            return cls(ConvStep(module.conv, module.bn, module.act))
        return None

    def forward(self, x: torch.Tensor, padding: tuple[int, int] | None = None) -> torch.Tensor:
        """`padding` replaces the conv's own (rows, columns) padding, for an x that holds some already."""
        c = self.conv
        padding = c.padding if padding is None else padding
        return self.finish(F.conv2d(x, c.weight, None, c.stride, padding, c.dilation, c.groups))

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """The BN and the activation, in place on y, the convolution's output without its bias."""
        offset, scale, shift = self.affine
        return self.act(y.add_(offset).mul_(scale).add_(shift))


def conv_norm_act_step(cna: nn.Sequential) -> ConvStep:
    """The ConvStep of a torchvision Conv2dNormActivation: [conv, BN?, act?]."""
    layers = list(cna)
    bn = next((m for m in layers[1:] if isinstance(m, nn.BatchNorm2d)), None)
    act = next((m for m in layers[1:] if not isinstance(m, nn.BatchNorm2d)), nn.Identity())
    return ConvStep(layers[0], bn, act)


def bottleneck_parts(block: nn.Module) -> dict | None:
    """ChunkedBottleneck's arguments (but the group) for a bottleneck block, or None for other modules."""
    from leanvision.models.mobilenet import DepthwiseSeparable

    if isinstance(block, (InvertedResidual, MBConv)):
        layers = list(block.conv if isinstance(block, InvertedResidual) else block.block)
        se = next((m._scale for m in layers if isinstance(m, SqueezeExcitation)), None)
        layers = [m for m in layers if not isinstance(m, SqueezeExcitation)]
        if isinstance(block, InvertedResidual):  # [expand]?, depthwise, project conv, BN
            layers = [*layers[:-2], nn.Sequential(*layers[-2:])]
        expand = conv_norm_act_step(layers[0]) if len(layers) == 3 else None
        shortcut = "add" if block.use_res_connect else "none"
        return dict(
            expand=expand,
            depthwise=conv_norm_act_step(layers[-2]),
            project=conv_norm_act_step(layers[-1]),
            shortcut=shortcut,
            se=se,
        )
    if isinstance(block, LinearBottleneck):
        exp, dw, pwl = block.conv_exp, block.conv_dw, block.conv_pwl
        shortcut = "none"
        if block.use_shortcut:
            shortcut = "add" if block.in_channels == block.out_channels else "partial"
        return dict(
            expand=None if exp is None else ConvStep(exp.conv, exp.bn, exp.act),
            depthwise=ConvStep(dw.conv, dw.bn, nn.Identity()),  # the SE (if any) and act_dw follow
            project=ConvStep(pwl.conv, pwl.bn, nn.Identity()),
            shortcut=shortcut,
            se=None if block.se is None else block.se.scale,
            post_se_act=block.act_dw,
        )
    if isinstance(block, DepthwiseSeparable):
        dw, pw = block.conv_dw, block.conv_pw
        return dict(
            expand=None,
            depthwise=ConvStep(dw.conv, dw.bn, dw.act),
            project=ConvStep(pw.conv, pw.bn, pw.act),
            shortcut="none",
        )
    return None


def chunked_bottleneck(
    block: nn.Module, input_hw: tuple[int, int], band_bytes: int
) -> ChunkedBottleneck | None:
    """The ChunkedBottleneck computing eval-mode `block` on inputs of input_hw, in groups of expanded
    channels whose expanded and depthwise maps fit `band_bytes`; None for blocks it does not cover."""
    parts = bottleneck_parts(block)
    if parts is None:
        return None
    (height, width), (sh, sw) = input_hw, parts["depthwise"].conv.stride
    per_channel = 4 * (height * width + -(-height // sh) * -(-width // sw))
    return ChunkedBottleneck(**parts, group=max(1, band_bytes // per_channel))


def banded_basic_block(block: nn.Module, input_shape: torch.Size, band_bytes: int) -> BandedBasicBlock | None:
    """BandedBasicBlock for a torchvision BasicBlock, with bands whose first-conv rows fit `band_bytes`."""
    if not isinstance(block, BasicBlock):
        return None
    conv = block.conv1
    row_bytes = 4 * conv.out_channels * -(-input_shape[3] // conv.stride[1])
    return BandedBasicBlock(block, max(1, band_bytes // row_bytes - 2))


def streamed_dense_block(
    block: nn.Module, input_shape: torch.Size, band_bytes: int
) -> StreamedDenseBlock | None:
    """StreamedDenseBlock for a torchvision _DenseBlock, with channel groups whose maps fit `band_bytes`."""
    if not isinstance(block, densenet._DenseBlock):
        return None
    return StreamedDenseBlock(block, max(1, band_bytes // (4 * input_shape[2] * input_shape[3])))


def banded_transition(
    transition: nn.Module, input_shape: torch.Size, band_bytes: int
) -> BandedTransition | None:
    """BandedTransition for a DenseNet _Transition whose pool is an unpadded AvgPool2d, with bands whose
    conv rows fit `band_bytes`."""
    pool = getattr(transition, "pool", None)
    if not isinstance(transition, densenet._Transition) or not isinstance(pool, nn.AvgPool2d):
        return None
    if _pair(pool.padding) != (0, 0) or pool.ceil_mode:
        return None
    row_bytes = 4 * (transition.conv.in_channels + transition.conv.out_channels) * input_shape[3]
    return BandedTransition(transition, max(1, band_bytes // (row_bytes * _pair(pool.kernel_size)[0])))


def chunked_max_pool(pool: nn.Module, input_shape: torch.Size, band_bytes: int) -> ChunkedMaxPool | None:
    """ChunkedMaxPool for an nn.MaxPool2d (without return_indices), with groups whose indices fit
    `band_bytes`."""
    if not isinstance(pool, nn.MaxPool2d) or pool.return_indices:
        return None
    return ChunkedMaxPool(pool, max(1, band_bytes // (8 * input_shape[2] * input_shape[3])))


def lean_module(module: nn.Module, input_shape: torch.Size, band_bytes: int) -> nn.Module | None:
    """The streaming form of `module` (run on inputs of input_shape), or None to run it as it is."""
    return (
        chunked_bottleneck(module, tuple(input_shape[2:]), band_bytes)
        or banded_basic_block(module, input_shape, band_bytes)
        or streamed_dense_block(module, input_shape, band_bytes)
        or banded_transition(module, input_shape, band_bytes)
        or chunked_max_pool(module, input_shape, band_bytes)
        or InPlaceConv.of(module)
    )
