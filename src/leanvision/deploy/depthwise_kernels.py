"""Numba CPU kernel of one channel group of a ChunkedBottleneck: the expansion's BN and activation in place
on the expand GEMM's output, then the depthwise convolution, its BN and activation (and the squeeze-excite's
channel means, or its scaling and the activation after it), in one call.

One call replaces about ten small torch calls (each 3-8 us on small maps, 35-55 us for a small depthwise
F.conv2d), whose arithmetic is tiny. The GEMMs stay with torch: MKL is far faster at them than numba
loops. A group of PARALLEL_TAPS multiply-adds or more runs its channels on the threads
(expand_depthwise_parallel); a smaller one serially: its few microseconds of work cost less than a
parallel launch.

BN is applied as (y + offset) * scale + shift, the order of ConvStep.affine. float32 activations use a
vectorisable exp (Cephes' expf, within 1 ulp); float64 uses libm's.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload
from torch import nn

from leanvision.layers import fastgrnn_kernels

# fastgrnn_kernels' settings with only FMA contraction of the fast-math flags: reassociation would merge
# the exp's two parts of ln 2 (4 ulp instead of 1) and could reorder the BN's (y + offset) * scale + shift;
# no loop here needs it to vectorise.
JIT = {**fastgrnn_kernels.JIT, "fastmath": {"contract"}}

# The activations the kernel computes, by number.
IDENTITY, RELU, RELU6, SILU, HARDSWISH, SIGMOID = range(6)
_ACTIVATIONS = dict(zip((nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Sigmoid), range(6)))
# Columns of the per-channel constants: the expand affine, the depthwise affine, then the depthwise taps.
EXPAND, DEPTHWISE, TAPS = 0, 3, 6

# exp(x) = 2^n exp(r), r = x - n ln 2 in [-ln 2 / 2, ln 2 / 2], ln 2 in two parts (Cephes expf).
_LOG2E, _LN2_HI, _LN2_LO = map(np.float32, (1.44269504088896341, 0.693359375, -2.12194440e-4))
_EXP_HI, _EXP_LO = np.float32(88.3), np.float32(-87.3)  # 2^n stays a normal float
_E = tuple(
    np.float32((1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 0.5))
)


def activation(module: nn.Module) -> int | None:
    """The kernel's number of an activation module, or None for one it does not compute."""
    return _ACTIVATIONS.get(type(module))


def _exp(x):
    """exp, specialised per float type (numba overload)."""


def _activation(v, act):
    """Activation number `act` of v (numba overload)."""


def _exp_float32(x):
    y = min(max(x, _EXP_LO), _EXP_HI)  # NaN stays NaN
    n = np.floor(y * _LOG2E + np.float32(0.5))
    r = y - n * _LN2_HI - n * _LN2_LO
    p = ((((_E[0] * r + _E[1]) * r + _E[2]) * r + _E[3]) * r + _E[4]) * r + _E[5]
    scale = np.int32((np.int32(n) + 127) << 23).view(np.float32)  # 2^n
    return (p * r * r + r + np.float32(1)) * scale


@overload(_exp, inline="always")
def _exp_overload(x):
    if x == types.float32:
        return _exp_float32
    return lambda x: math.exp(x)


@overload(_activation, inline="always")
def _activation_overload(v, act):
    zero, one, three, six = map(np.float32 if v == types.float32 else np.float64, (0, 1, 3, 6))

    def activation(v, act):
        if act == RELU:
            return max(v, zero)
        if act == RELU6:
            return min(max(v, zero), six)
        if act == SILU:
            return v / (one + _exp(-v))
        if act == HARDSWISH:
            return v * min(max(v + three, zero), six) / six
        if act == SIGMOID:
            return one / (one + _exp(-v))
        return v

    return activation


@njit(inline="always", **JIT)
def _affine_as(row, offset, scale, shift, act):  # pragma: no cover
    for i in range(len(row)):
        row[i] = _activation((row[i] + offset) * scale + shift, act)


@njit(**JIT)
def _affine(row, offset, scale, shift, act):  # pragma: no cover
    """row = act((row + offset) * scale + shift), in place: one loop per activation, each with its
    activation a constant (LLVM does not vectorise a loop that switches on it)."""
    if act == RELU:
        _affine_as(row, offset, scale, shift, RELU)
    elif act == RELU6:
        _affine_as(row, offset, scale, shift, RELU6)
    elif act == SILU:
        _affine_as(row, offset, scale, shift, SILU)
    elif act == HARDSWISH:
        _affine_as(row, offset, scale, shift, HARDSWISH)
    elif act == SIGMOID:
        _affine_as(row, offset, scale, shift, SIGMOID)
    else:
        _affine_as(row, offset, scale, shift, IDENTITY)


@njit(inline="always", **JIT)
def _inside(first, stride, size, out_size):  # pragma: no cover
    """The outputs [lo, hi) of a row or column whose input, first + o * stride, is in [0, size)."""
    lo, hi = 0, out_size
    while lo < hi and first + lo * stride < 0:
        lo += 1
    while hi > lo and first + (hi - 1) * stride >= size:
        hi -= 1
    return lo, hi


# Depthwise multiply-adds of a group from which its channels run on several threads: at 50k a group takes
# ~40 us serially, the ~10 us a parallel launch costs then repaid.
PARALLEL_TAPS = 50_000


@njit(inline="always", **JIT)
def _expand_depthwise_channel(c, e, d, consts, config, means, scales):  # pragma: no cover
    """Channel c of expand_depthwise."""
    kh, kw, sh, sw, ph, pw, dh, dw, expand_act, dw_act, post_act, height, width, out_height, out_width = (
        config
    )
    zero = d.dtype.type(0)
    k, src, dst = consts[c], e[c], d[c]
    if expand_act >= 0:
        _affine(src, k[EXPAND], k[EXPAND + 1], k[EXPAND + 2], expand_act)
    dst[:] = 0
    for ky in range(kh):  # tap by tap over the outputs it reaches: each output sums in (ky, kx) order
        y0 = ky * dh - ph  # the input row of output row 0
        top, bottom = _inside(y0, sh, height, out_height)
        for kx in range(kw):
            x0 = kx * dw - pw
            left, right = _inside(x0, sw, width, out_width)
            tap = k[TAPS + ky * kw + kx]
            for oy in range(top, bottom):
                out, at = oy * out_width + left, (oy * sh + y0) * width + left * sw + x0
                for j in range(right - left):
                    dst[np.uint64(out + j)] += tap * src[np.uint64(at + j * sw)]
    _affine(dst, k[DEPTHWISE], k[DEPTHWISE + 1], k[DEPTHWISE + 2], dw_act)
    if means is not None:
        total = zero
        for i in range(len(dst)):
            total += dst[i]
        means[c] = total / len(dst)
    if scales is not None:
        _affine(dst, zero, scales[c], zero, post_act)


@njit(**JIT)
def expand_depthwise(e, d, consts, config, means, scales):  # pragma: no cover
    """One group: e [g, H * W] the expand GEMM's output (BN and activation applied here, in place) or the
    block's input channels; writes the depthwise conv, BN and activation into d [g, H' * W'].

    consts [g, 6 + kh * kw]: per channel the expand (offset, scale, shift), the depthwise ones, the taps.
    config int64 [15]: the depthwise kernel's height and width, stride, padding and dilation (rows, then
    columns each), the activations' numbers expand_act (< 0: e is the block's input, no expand affine),
    dw_act and post_act, then H, W, H', W'. means: None, or [g] that receives d's channel means (the SE's
    first pass); scales: None, or [g] that d is multiplied by, then post_act applied (its second pass).
    Zero padding by bounds, no padded copy. Indices known >= 0 are cast to unsigned: numba's wraparound
    of negative ones would keep LLVM from vectorising.
    """
    for c in range(len(e)):
        _expand_depthwise_channel(c, e, d, consts, config, means, scales)


@njit(parallel=True, **JIT)
def expand_depthwise_parallel(e, d, consts, config, means, scales):  # pragma: no cover
    """expand_depthwise with its channels on numba's threads."""
    for c in prange(len(e)):
        _expand_depthwise_channel(c, e, d, consts, config, means, scales)


def taps(group: int, config: np.ndarray) -> int:
    """The depthwise multiply-adds of a group of `group` channels with `config` (expand_depthwise's)."""
    return group * int(config[0] * config[1] * config[-2] * config[-1])
