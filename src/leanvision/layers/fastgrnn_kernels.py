"""Numba CPU kernels of the FastGRNN sweep (sigmoid gate, tanh update): one fused pass over all steps.

Sequences are feature-major, x [T, C, N], and advance in blocks of up to LANES: every inner loop runs over
the sequences of a block (contiguous, SIMD), and a block's state and pre-activations stay in cache across
its T steps. Blocks are cut into a few contiguous tasks per thread; the backward recomputes each block's
forward, sums its parameter gradients per task and adds the tasks up at the end (no races, and results
independent of scheduling).

float32 uses a rational tanh (Eigen's, |error| < 3e-7) that vectorises; float64 uses libm, so that float64
gradcheck sees exact nonlinearities.

`rnnpool_rows` is RNNPool inference of a band of rows of a group of patches (RNN1, then RNN2 on its
summaries) in one call, for streaming: each cell's parameters come packed as one array [h, C + h + 4]
(`pack_params`'s layout: [W; U]^T, then bias_gate, bias_update, sigmoid(zeta) and sigmoid(nu) as columns),
and its scratch as arrays that the caller allocates (streaming counts them).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from types import FunctionType

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
    threads = set_threads(threads)
    with numba.parallel_chunksize(1):
        yield TASKS_PER_THREAD * threads


def usable_threads(threads: int) -> int:
    """`threads`, at least 1 and at most numba's pool."""
    return max(1, min(threads, numba.config.NUMBA_NUM_THREADS))


def set_threads(threads: int) -> int:
    """Run parallel kernels on usable_threads(threads) threads; returns how many."""
    threads = usable_threads(threads)
    numba.set_num_threads(threads)
    return threads


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
    for j in range(len(pre)):
        z, c, h_in = zc[0, j], zc[1, j], xh[channels + j]
        _update_row(pre[j], bias_gate[j], bias_update[j], zeta, nu, z, c, h_in, h_out[j], width)


@njit(**JIT)
def _advance(params, xh, pre, zc, width):  # pragma: no cover
    """`_step` for inference, on packed params [h, K + 4]: the state rows of xh [C + h, lanes] (below
    the step's inputs) become the next state; zc [2, lanes] holds one row's gate and update at a time.
    With K = C + h, params hold [W; U]^T; with K = h (inputs premultiplied, rnn_cells.premultiplied) only
    U^T, and xh's first h rows hold the step's W x."""
    hidden, rows, k = len(pre), xh.shape[0], params.shape[1] - 4
    _matmul(params[:, :k], xh[rows - k :], pre, width)
    for j in range(rows - k):  # W x computed before the sweep
        p, wx = pre[j], xh[j]
        for lane in range(width):
            p[lane] += wx[lane]
    zeta, nu = params[0, k + 2], params[0, k + 3]
    for j in range(hidden):
        h = xh[rows - hidden + j]
        _update_row(pre[j], params[j, k], params[j, k + 1], zeta, nu, zc[0], zc[1], h, h, width)


@njit(**JIT)
def _update_row(p, bg, bu, zeta, nu, z, c, h_in, h, width):  # pragma: no cover
    """One state row of a step from its pre-activations p: gate z, update c, and h from h_in (may be h)."""
    # Loops over few arrays each: LLVM vectorises a loop only below a few run-time aliasing checks. z and c
    # go through memory: in one loop (~20% faster) LLVM rewrites the products with them (fastmath), which
    # rounds differently, enough to move a streamed network's output past its exactness test.
    for lane in range(width):
        z[lane] = _sigmoid(p[lane] + bg)
        c[lane] = _tanh(p[lane] + bu)
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
def sweep_forward_indexed(x, index, params, final, xh, pre, zc):  # pragma: no cover
    """sweep_forward over sequences read in place from x [C, S]: step t of sequence n is x[:, index[t, n]],
    for inference (params packed, `_advance`).

    The caller's scratch is one task's per thread: xh [tasks, C + h, lanes], pre [tasks, h, lanes] and zc
    [tasks, 2, lanes], so that the kernel allocates nothing (streaming inference counts it).
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
                _advance(params, block_xh, block_pre, block_zc, width)
            _copy(final[:, lo : lo + width], block_xh[channels:, :width])


@njit(**JIT)
def _pool_sweep(
    params, src, dst, first, last, rows, patch_row, t0, t1, second, geometry, block, lanes, task, tasks
):  # pragma: no cover
    """Task `task`'s share of sequences first .. last - 1 of `rnnpool_rows` (blocks of at most `lanes`, as
    many per task), advanced over steps t0 .. t1 - 1 in `block` (the task's scratch).

    RNN1 (`second` False, src the band): the first `rows` sequences are row segments, k n + j that of the
    band's row k and patch j (step t reads src[:, k - top, j sw + t - left], final state into held's ring
    slot of that row), the others the columns c of patch row `patch_row` (step t reads its row t, column
    c - left; the state comes from and goes back to its column slot, zeros at step 0); src is zero outside.
    RNN2 (src held [h1, 1, kh n + slots W]): sequence k n + j reads patch j's row summaries of patch row
    `patch_row` forwards (k = 0) and backwards (1), then its column summaries forwards (2) and backwards
    (3), the final state into dst = out[k h2 : (k + 1) h2, j]."""
    kh, kw, sh, sw, n, y0, top, left, slots = geometry
    hidden, channels = len(params), len(src)
    width_p = (n - 1) * sw + kw
    columns = kh * n + patch_row % slots * width_p  # the patch row's column states in held
    ring_rows = patch_row * sh  # its first row
    h_rows = channels + hidden
    xh = block[: h_rows * lanes].reshape(h_rows, lanes)
    pre = block[h_rows * lanes : (h_rows + hidden) * lanes].reshape(hidden, lanes)
    zc = block[(h_rows + hidden) * lanes : (h_rows + hidden + 2) * lanes].reshape(2, lanes)
    height, width_in = src.shape[1], src.shape[2]
    state = xh[channels:]
    count = last - first
    blocks = tasks * -(-count // (tasks * lanes))
    start, stop = _chunk(task, tasks, blocks)
    for index in range(start, stop):
        lo, hi = _chunk(index, blocks, count)
        lo, width = first + lo, hi - lo
        padded = min(lanes, -(-width // 8) * 8)  # whole vectors: a loop's scalar remainder costs ~1.4x
        xh[:, width:padded] = 0
        state[:, :width] = 0
        if not second and t0 > 0:  # columns carried over from the last band (a sweep of columns alone)
            _copy(state[:, :width], dst[:, columns + lo : columns + lo + width])
        for t in range(t0, t1):
            k, j = lo // n, lo % n
            forwards, backwards = (ring_rows + t) % kh * n, (ring_rows + kh - 1 - t) % kh * n
            for lane in range(width):
                if second:
                    y = 0
                    if k < 2:
                        col = (forwards if k == 0 else backwards) + j
                    else:
                        col = columns + j * sw + (t if k == 2 else kw - 1 - t)
                elif lo + lane < rows:
                    y, col = k - top, j * sw + t - left
                else:
                    y, col = ring_rows + t - y0 - top, lo + lane - rows - left
                if 0 <= y < height and 0 <= col < width_in:
                    for c in range(channels):
                        xh[c, lane] = src[c, y, col]
                else:
                    for c in range(channels):
                        xh[c, lane] = 0
                j += 1
                if j == n:
                    k, j = k + 1, 0
            _advance(params, xh, pre, zc, padded)
        lane = 0
        while lane < width:  # the final states, in runs of lanes whose places are side by side
            k, j = (lo + lane) // n, (lo + lane) % n
            if second:
                run = min(n - j, width - lane)
                _copy(dst[k * hidden : (k + 1) * hidden, j : j + run], state[:, lane : lane + run])
            elif lo + lane < rows:
                run, place = min(n - j, width - lane), (y0 + k) % kh * n + j
                _copy(dst[:, place : place + run], state[:, lane : lane + run])
            else:
                run, place = width - lane, columns + lo + lane - rows
                _copy(dst[:, place : place + run], state[:, lane : lane + run])
            lane += run


def _rnnpool_rows(x, out, params1, params2, geometry, held, lanes, tasks, scratch):  # pragma: no cover
    """RNNPool of a group of n patches side by side (patch j in columns j sw .. j sw + kw - 1), band by
    band of rows: RNN1 over the band's rows y0 .. y1 - 1 (of the zero-padded map), then, once they end a
    patch row, RNN2 of that row into out [4 h2, n] (rows forwards, backwards, columns forwards, backwards,
    as rnnpool_map). geometry = (kh, kw, sh, sw, n, y0, y1, top, left, first, last, slots): x holds the
    band [C, rows, columns] from its row `top` and column `left` on (zeros elsewhere).

    RNN1 runs over every row segment of the band, the summaries kept in held [h1, kh n + slots W], in a
    ring of kh rows (row y in slot y % kh), and over the columns of patch rows first .. last across the
    band's rows, their states kept in held's column slots (patch row p in slot p % slots) from band to
    band; the band ends patch row `first` where first sh + kh = y1. A band of one patch row's kh rows
    with a fresh `held` pools it alone. Blocks of `lanes` sequences are cut into `tasks` runs (one per
    thread); scratch holds each task's block of the larger cell: [C + h, lanes] (a step's inputs above
    the state), [h, lanes] (pre-activations) and [2, lanes] (a row's gate and update)."""
    kh, kw, sh, sw, n, y0, y1, top, left, first, last, slots = geometry
    cells = (kh, kw, sh, sw, n, y0, top, left, slots)
    rows, width = (y1 - y0) * n, (n - 1) * sw + kw
    per_task = len(scratch) // tasks
    for task in prange(tasks):
        block = scratch[task * per_task : (task + 1) * per_task]
        for p in range(first, last + 1):
            t0, t1 = max(y0, p * sh) - p * sh, min(y1, p * sh + kh) - p * sh
            if p == first and t0 == 0 and t1 == kw:  # the row segments' steps: one sweep
                _pool_sweep(
                    params1, x, held, 0, rows + width, rows, p, 0, kw, False, cells, block, lanes, task, tasks
                )
                continue
            if p == first:
                _pool_sweep(
                    params1, x, held, 0, rows, rows, p, 0, kw, False, cells, block, lanes, task, tasks
                )
            _pool_sweep(params1, x, held, 0, width, 0, p, t0, t1, False, cells, block, lanes, task, tasks)
    if first * sh + kh != y1:
        return
    pooled = held.reshape(len(held), 1, held.shape[1])
    for task in prange(tasks):
        block = scratch[task * per_task : (task + 1) * per_task]
        if kh == kw:
            _pool_sweep(
                params2, pooled, out, 0, 4 * n, 0, first, 0, kh, True, cells, block, lanes, task, tasks
            )
        else:
            _pool_sweep(
                params2, pooled, out, 0, 2 * n, 0, first, 0, kh, True, cells, block, lanes, task, tasks
            )
            _pool_sweep(
                params2, pooled, out, 2 * n, 4 * n, 0, first, 0, kw, True, cells, block, lanes, task, tasks
            )


def _named(fn, name: str):
    """`fn` as a function called `name`: numba caches compilations by a function's name and first line, not
    by its flags, so that two compilations of one function need two names (else each loads the other's)."""
    named = FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    named.__qualname__ = name
    return named


# The same kernel on numba's threads (the second pass reads what all threads of the first wrote: no fusion
# of the two), and serially for work of one task, which a parallel launch would only delay.
rnnpool_rows = njit(parallel={"fusion": False}, **JIT)(_rnnpool_rows)
rnnpool_rows_serial = njit(**JIT)(_named(_rnnpool_rows, "_rnnpool_rows_serial"))


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
