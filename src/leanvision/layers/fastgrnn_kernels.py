"""Numba CPU kernels of the FastGRNN sweep (sigmoid gate, tanh update): one fused pass over all steps.

Sequences are feature-major, x [T, C, N], and advance in blocks of up to LANES: every inner loop runs over
the sequences of a block (contiguous, SIMD), and a block's state and pre-activations stay in cache across
its T steps. Blocks are cut into a few contiguous tasks per thread; the backward recomputes each block's
forward, sums its parameter gradients per task and adds the tasks up at the end (no races, and results
independent of scheduling).

float32 uses a rational tanh (Eigen's, |error| < 3e-7) that vectorises; float64 uses libm, so that float64
gradcheck sees exact nonlinearities.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

# Sequences per block. The lane loops must have a run-time trip count: LLVM fully unrolls short constant
# ones and then vectorises across the wrong axis (gathers).
LANES = 128
TASKS_PER_THREAD = 4
# No nnan/ninf: NaN and inf inputs must propagate as in torch. error_model="numpy" drops the division by
# zero checks, which would keep LLVM from vectorising the nonlinearities.
JIT = dict(cache=True, fastmath={"contract", "reassoc", "nsz", "arcp"}, error_model="numpy")

# tanh(x) ~ x P(x^2) / Q(x^2) on [-7.905, 7.905] (Eigen's generic_fast_tanh_float), +-1 beyond.
_CLAMP = np.float32(7.90531110763549805)
_P1, _P3, _P5, _P7, _P9, _P11, _P13 = map(
    np.float32,
    (
        4.89352455891786e-03,
        6.37261928875436e-04,
        1.48572235717979e-05,
        5.12229709037114e-08,
        -8.60467152213735e-11,
        2.00018790482477e-13,
        -2.76076847742355e-16,
    ),
)
_Q0, _Q2, _Q4, _Q6 = map(
    np.float32, (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)
)
_HALF32 = np.float32(0.5)


def _tanh(x):
    """tanh, specialised per float type (numba overload)."""


def _sigmoid(x):
    """sigmoid, specialised per float type (numba overload)."""


def _tanh_float32(x):
    x = min(max(x, -_CLAMP), _CLAMP)
    x2 = x * x
    p = x * (_P1 + x2 * (_P3 + x2 * (_P5 + x2 * (_P7 + x2 * (_P9 + x2 * (_P11 + x2 * _P13))))))
    return p / (_Q0 + x2 * (_Q2 + x2 * (_Q4 + x2 * _Q6)))


@overload(_tanh, inline="always")
def _tanh_overload(x):
    if x == types.float32:
        return _tanh_float32
    return lambda x: math.tanh(x)


@overload(_sigmoid, inline="always")
def _sigmoid_overload(x):
    if x == types.float32:
        return lambda x: _HALF32 + _HALF32 * _tanh(_HALF32 * x)
    return lambda x: 1.0 / (1.0 + math.exp(-x))


@contextlib.contextmanager
def parallel(threads: int) -> Iterator[int]:
    """Run kernels on `threads` threads (at most numba's pool); yields the number of tasks to cut work into.

    Tasks (contiguous runs of blocks) are handed out dynamically, a few per thread: on a shared machine a
    thread that loses its core then holds up less of the work.
    """
    threads = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    with numba.parallel_chunksize(1):
        yield TASKS_PER_THREAD * threads


@njit(**JIT)
def _chunk(index: int, chunks: int, blocks: int) -> tuple[int, int]:  # pragma: no cover
    return index * blocks // chunks, (index + 1) * blocks // chunks


@njit(**JIT)
def _copy(dst, src):  # pragma: no cover
    """dst[...] = src for 2-d arrays, row by row: numba's own slice assignment does not vectorise."""
    for r in range(src.shape[0]):
        d, s = dst[r], src[r]
        for lane in range(src.shape[1]):
            d[lane] = s[lane]


@njit(**JIT)
def _matmul(a, src, dst, width):  # pragma: no cover
    """dst[:, :width] = a @ src[:, :width] for a small a [I, M]; four rows of src per pass over dst."""
    rows, inner = a.shape
    full = inner - inner % 4
    for i in range(rows):
        out = dst[i]
        out[:width] = 0
        for m in range(0, full, 4):
            a0, a1, a2, a3 = a[i, m], a[i, m + 1], a[i, m + 2], a[i, m + 3]
            s0, s1, s2, s3 = src[m], src[m + 1], src[m + 2], src[m + 3]
            for lane in range(width):
                out[lane] += a0 * s0[lane] + a1 * s1[lane] + a2 * s2[lane] + a3 * s3[lane]
        for m in range(full, inner):
            am, sm = a[i, m], src[m]
            for lane in range(width):
                out[lane] += am * sm[lane]


@njit(**JIT)
def _step(weight_t, bias_gate, bias_update, coef, xh, pre, zc, h_out, width):  # pragma: no cover
    """One step of a block: xh [C + h, lanes] holds the inputs above the incoming state.

    Writes the gate z and update c into zc [2, h, lanes] and the outgoing state into h_out [h, lanes]
    (which may be xh's state rows).
    """
    channels, zeta, nu = xh.shape[0] - len(pre), coef[0], coef[1]
    _matmul(weight_t, xh, pre, width)
    # Loops over few arrays each: LLVM vectorises a loop only below a few run-time aliasing checks.
    for j in range(len(pre)):
        bg, bu, p, z, c = bias_gate[j], bias_update[j], pre[j], zc[0, j], zc[1, j]
        for lane in range(width):
            z[lane] = _sigmoid(p[lane] + bg)
            c[lane] = _tanh(p[lane] + bu)
        h_in, h = xh[channels + j], h_out[j]
        for lane in range(width):
            h[lane] = z[lane] * h_in[lane] + (zeta - zeta * z[lane] + nu) * c[lane]


@njit(parallel=True, **JIT)
def sweep_forward(x, weight_t, bias_gate, bias_update, coef, final, tasks):  # pragma: no cover
    """FastGRNN from zeros over x [T, C, N]; writes the final states into `final` [h, N].

    weight_t = [W; U]^T [h, C + h], bias_* [h], coef = [sigmoid(zeta), sigmoid(nu)].
    """
    steps, channels, n = x.shape
    hidden = len(weight_t)
    blocks = -(-n // LANES)
    chunks = min(tasks, blocks)
    for chunk in prange(chunks):
        xh = np.empty((channels + hidden, LANES), x.dtype)  # the step's inputs above its incoming state
        pre = np.empty((hidden, LANES), x.dtype)
        zc = np.empty((2, hidden, LANES), x.dtype)
        first, last = _chunk(chunk, chunks, blocks)
        for block in range(first, last):
            lo = block * LANES
            width = min(LANES, n - lo)
            xh[channels:] = 0
            for t in range(steps):
                _copy(xh[:channels, :width], x[t, :, lo : lo + width])
                _step(weight_t, bias_gate, bias_update, coef, xh, pre, zc, xh[channels:], width)
            _copy(final[:, lo : lo + width], xh[channels:, :width])


@njit(parallel=True, **JIT)
def sweep_forward_indexed(
    x, index, weight_t, bias_gate, bias_update, coef, final, xh, pre, zc
):  # pragma: no cover
    """sweep_forward over sequences read in place from x [C, S]: step t of sequence n is x[:, index[t, n]].

    The caller's scratch is one task's per thread: xh [tasks, C + h, lanes], pre [tasks, h, lanes] and
    zc [tasks, 2, h, lanes], so that the kernel allocates nothing (streaming inference counts it).
    """
    steps, n = index.shape
    channels, lanes = len(x), xh.shape[2]
    blocks = -(-n // lanes)
    chunks = min(len(xh), blocks)
    for chunk in prange(chunks):
        block_xh, block_pre, block_zc = xh[chunk], pre[chunk], zc[chunk]
        first, last = _chunk(chunk, chunks, blocks)
        for block in range(first, last):
            lo = block * lanes
            width = min(lanes, n - lo)
            block_xh[channels:] = 0
            for t in range(steps):
                columns = index[t, lo : lo + width]
                for c in range(channels):
                    src, dst = x[c], block_xh[c]
                    for lane in range(width):
                        dst[lane] = src[columns[lane]]
                state = block_xh[channels:]
                _step(weight_t, bias_gate, bias_update, coef, block_xh, block_pre, block_zc, state, width)
            _copy(final[:, lo : lo + width], block_xh[channels:, :width])


@njit(parallel=True, **JIT)
def sweep_backward(grad_final, x, weight_t, bias_gate, bias_update, coef, grad_x, tasks):  # pragma: no cover
    """Backward of `sweep_forward` from the gradient of the final states [h, N].

    Each block's forward is recomputed into scratch (nothing is stored per step between the passes).
    Writes the input gradients into `grad_x` [T, C, N]; returns the gradients of weight_t's transpose
    [C + h, h], of the two biases (stacked, [2, h]) and of coef [2].
    """
    steps, channels, n = x.shape
    hidden = len(weight_t)
    rows = channels + hidden
    weight = np.ascontiguousarray(weight_t.T)
    zeta, nu = coef[0], coef[1]
    zero, one = x.dtype.type(0), x.dtype.type(1)
    blocks = -(-n // LANES)
    chunks = min(tasks, blocks)
    acc_weight = np.zeros((chunks, rows, hidden), x.dtype)
    acc_bias = np.zeros((chunks, 2, hidden), x.dtype)
    acc_coef = np.zeros((chunks, 2), x.dtype)
    for chunk in prange(chunks):
        xh = np.empty((steps + 1, rows, LANES), x.dtype)  # as in sweep_forward, for every step
        zc = np.empty((steps, 2, hidden, LANES), x.dtype)
        pre = np.empty((hidden, LANES), x.dtype)
        grad = np.empty((hidden, LANES), x.dtype)  # of the outgoing state of the current step
        dpre = np.empty((3, hidden, LANES), x.dtype)  # of the shared, the gate and the update pre-activation
        grad_xh = np.empty((rows, LANES), x.dtype)
        first, last = _chunk(chunk, chunks, blocks)
        for block in range(first, last):
            lo = block * LANES
            width = min(LANES, n - lo)
            xh[0, channels:] = 0
            for t in range(steps):
                _copy(xh[t, :channels, :width], x[t, :, lo : lo + width])
                _step(weight_t, bias_gate, bias_update, coef, xh[t], pre, zc[t], xh[t + 1, channels:], width)
            _copy(grad[:, :width], grad_final[:, lo : lo + width])
            for t in range(steps - 1, -1, -1):
                sum_zeta, sum_nu = zero, zero
                for j in range(hidden):
                    g, h, z, c = grad[j], xh[t, channels + j], zc[t, 0, j], zc[t, 1, j]
                    d_pre, d_gate, d_update = dpre[0, j], dpre[1, j], dpre[2, j]
                    for lane in range(width):
                        d_gate[lane] = g[lane] * (h[lane] - zeta * c[lane]) * z[lane] * (one - z[lane])
                    for lane in range(width):
                        gc = g[lane] * c[lane]
                        d_update[lane] = (zeta - zeta * z[lane] + nu) * (g[lane] - gc * c[lane])
                        sum_zeta += gc - gc * z[lane]
                        sum_nu += gc
                    for lane in range(width):
                        d_pre[lane] = d_gate[lane] + d_update[lane]
                    for lane in range(width):
                        g[lane] *= z[lane]
                acc_coef[chunk, 0] += sum_zeta
                acc_coef[chunk, 1] += sum_nu
                _matmul(weight, dpre[0], grad_xh, width)
                _copy(grad_x[t, :, lo : lo + width], grad_xh[:channels, :width])
                for j in range(hidden):
                    g, g_h = grad[j], grad_xh[channels + j]
                    for lane in range(width):
                        g[lane] += g_h[lane]
                for j in range(hidden):
                    d_gate, d_update = dpre[1, j], dpre[2, j]
                    sum_gate, sum_update = zero, zero
                    for lane in range(width):
                        sum_gate += d_gate[lane]
                        sum_update += d_update[lane]
                    acc_bias[chunk, 0, j] += sum_gate
                    acc_bias[chunk, 1, j] += sum_update
                for k in range(rows):
                    src = xh[t, k]
                    for j in range(hidden):
                        d_pre = dpre[0, j]
                        dot = zero
                        for lane in range(width):
                            dot += src[lane] * d_pre[lane]
                        acc_weight[chunk, k, j] += dot
    return acc_weight.sum(axis=0), acc_bias.sum(axis=0), acc_coef.sum(axis=0)
