"""Recurrent cells behind one interface: FastGRNN (Kusupati et al. 2018), GRU and LSTM.

The interface splits a step so that callers can hoist the input projection out of their time loop:
`project(x)` maps inputs [..., input_size] to [..., projection_size] (no recurrence, one big GEMM), and
`step(px, state)` advances the recurrence by one step from a projected input. `initial_state(shape)` gives
zeros and `output(state)` the hidden vector. `forward(x, state)` is the usual one-step call.
`sweep(sequences)` runs many equal-length sequences from zeros as one batch and returns their final
hidden vectors (FastGRNN overrides it: a fused numba kernel on CPU, else a feature-major torch loop).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from leanvision.errors import InvalidArgumentError


def quant_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear sigmoid of the reference: clamp((x + 1) / 2, 0, 1)."""
    return ((x + 1) / 2).clamp(0, 1)


def quant_tanh(x: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear tanh of the reference: clamp(x, -1, 1)."""
    return x.clamp(-1, 1)


NONLINEARITIES = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "quantSigm": quant_sigmoid,
    "quantTanh": quant_tanh,
}


def _nonlinearity(name: str):
    if name not in NONLINEARITIES:
        raise InvalidArgumentError(f"unknown nonlinearity {name!r}; expected one of {sorted(NONLINEARITIES)}")
    return NONLINEARITIES[name]


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")


def _split_like(final: torch.Tensor, sequences: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Cut the final hidden vectors [N, hidden] of a batch of sequences [T, ..., input] into [..., hidden]."""
    finals = final.split([math.prod(seq.shape[1:-1]) for seq in sequences])
    return [f.view(*seq.shape[1:-1], -1) for f, seq in zip(finals, sequences)]


# Sequences per block of sweep_forward_indexed by default (streaming's reference path, where its scratch,
# threads x (C + 2h + 2) x lanes floats, counts against the RAM); the whole-map path takes more.
INDEXED_LANES = 32


class RecurrentCell(nn.Module):
    """Base of the cells: `project` + `step`, zero initial state."""

    input_size: int
    hidden_size: int
    state_size: int

    def project(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, px: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def initial_state(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Zeros of shape [*shape, state_size], on `like`'s device and dtype."""
        return like.new_zeros(*shape, self.state_size)

    def output(self, state: torch.Tensor) -> torch.Tensor:
        return state[..., : self.hidden_size]

    def fused_sweep(self, x: torch.Tensor) -> bool:
        """Whether `sweep` over inputs like x runs as one fused kernel (not a loop of torch kernels)."""
        return False

    def compiled_kernel(self, x: torch.Tensor) -> bool:
        """Whether, under torch.compile, an inference sweep over x can run a fused kernel."""
        return False

    def sweep(self, sequences: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Final hidden vectors [..., hidden_size] of input sequences [T, ..., input_size] of one length T.

        Each sequence runs from a zero state; all of them advance together, as one batch.
        """
        inputs = torch.cat([seq.reshape(len(seq), -1, seq.shape[-1]) for seq in sequences], 1)
        state = self.initial_state((inputs.shape[1],), inputs)
        for px in self.project(inputs).unbind(0):
            state = self.step(px, state)
        return _split_like(self.output(state), sequences)

    def sweep_indexed(self, x: torch.Tensor, index: torch.Tensor, lanes: int = INDEXED_LANES) -> torch.Tensor:
        """Final hidden vectors [hidden_size, N] of N sequences read in place from x [input_size, S]:
        step t of sequence n is column index[t, n] of x; all start from zeros. For inference: unlike
        `sweep`, only one step's inputs and the state are alive at a time. `lanes`: the sequences a
        fused kernel advances together (where one runs); its scratch grows with them."""
        state = self.initial_state((index.shape[1],), x)
        for columns in index:
            state = self.step(self.project(x[:, columns].t()), state)
        return self.output(state).t()

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """One step from raw input x [..., input_size]; returns the new state."""
        if x.shape[-1] != self.input_size:
            raise InvalidArgumentError(
                f"{type(self).__name__} expects inputs [..., {self.input_size}], got {list(x.shape)}"
            )
        if state is None:
            state = self.initial_state(tuple(x.shape[:-1]), x)
        return self.step(self.project(x), state)


class FastGRNNCell(RecurrentCell):
    """FastGRNN with the reference numerics (right-multiplied weights, one shared pre-activation):

        pre = x W + h U;  z = gate(pre + b_gate);  c = update(pre + b_update)
        h' = z * h + (sigmoid(zeta) * (1 - z) + sigmoid(nu)) * c

    With the default sigmoid/tanh, `sweep` runs the fused numba kernels of fastgrnn_kernels.py on CPU
    float32/float64 tensors where numba is installed, else feature-major torch kernels with a hand-written
    backward (`_fastgrnn_sweep`; CUDA, other dtypes); other nonlinearities, and compilers, go through `step`.

    `w_rank` / `u_rank` factor W = W1 W2 and U = U1 U2. `w_sparsity` / `u_sparsity` are the fractions of
    weights kept (by magnitude, see `sparsify`); the masks are buffers applied in every forward, so pruned
    weights stay without effect (and without gradient) across training steps until the next `sparsify`.
    Initialisation as the reference: weights 0.1 * randn, biases ones, zeta and nu given as [1, 1].
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        gate_nonlinearity: str = "sigmoid",
        update_nonlinearity: str = "tanh",
        w_rank: int | None = None,
        u_rank: int | None = None,
        w_sparsity: float = 1.0,
        u_sparsity: float = 1.0,
        zeta_init: float = 1.0,
        nu_init: float = -4.0,
    ) -> None:
        super().__init__()
        _check_sizes(input_size=input_size, hidden_size=hidden_size)
        for name, value in (("w_sparsity", w_sparsity), ("u_sparsity", u_sparsity)):
            if not 0 < value <= 1:
                raise InvalidArgumentError(f"{name} is the fraction of weights kept, in (0, 1]; got {value}")
        self.input_size, self.hidden_size, self.state_size = input_size, hidden_size, hidden_size
        self.gate_nonlinearity, self.update_nonlinearity = gate_nonlinearity, update_nonlinearity
        self._gate, self._update = _nonlinearity(gate_nonlinearity), _nonlinearity(update_nonlinearity)
        self._sigmoid_pair = gate_nonlinearity == "sigmoid" and update_nonlinearity == "tanh"
        self.w_rank, self.u_rank = w_rank, u_rank
        self.w_sparsity, self.u_sparsity = w_sparsity, u_sparsity
        self.W, self.W1, self.W2 = self._weight(input_size, hidden_size, w_rank)
        self.U, self.U1, self.U2 = self._weight(hidden_size, hidden_size, u_rank)
        self.bias_gate = nn.Parameter(torch.ones(1, hidden_size))
        self.bias_update = nn.Parameter(torch.ones(1, hidden_size))
        self.zeta = nn.Parameter(torch.full((1, 1), float(zeta_init)))
        self.nu = nn.Parameter(torch.full((1, 1), float(nu_init)))
        self.register_buffer("w_mask", torch.ones(input_size, hidden_size))
        self.register_buffer("u_mask", torch.ones(hidden_size, hidden_size))
        self.sparsify()

    @staticmethod
    def _weight(rows: int, cols: int, rank: int | None):
        if rank is None:
            return nn.Parameter(0.1 * torch.randn(rows, cols)), None, None
        _check_sizes(rank=rank)
        return None, nn.Parameter(0.1 * torch.randn(rows, rank)), nn.Parameter(0.1 * torch.randn(rank, cols))

    def weight_w(self) -> torch.Tensor:
        """The effective input matrix W [input_size, hidden_size] (low-rank product and mask applied)."""
        w = self.W if self.W is not None else self.W1 @ self.W2
        return w * self.w_mask if self.w_sparsity < 1 else w

    def weight_u(self) -> torch.Tensor:
        """The effective recurrent matrix U [hidden_size, hidden_size]."""
        u = self.U if self.U is not None else self.U1 @ self.U2
        return u * self.u_mask if self.u_sparsity < 1 else u

    @torch.no_grad()
    def sparsify(self) -> None:
        """Recompute the masks: keep the largest-magnitude fraction of each effective weight matrix."""
        for mask, weight, keep in (
            (self.w_mask, self.W if self.W is not None else self.W1 @ self.W2, self.w_sparsity),
            (self.u_mask, self.U if self.U is not None else self.U1 @ self.U2, self.u_sparsity),
        ):
            if keep >= 1:
                continue
            k = max(1, math.ceil(keep * weight.numel()))
            threshold = weight.abs().flatten().kthvalue(weight.numel() - k + 1).values
            mask.copy_((weight.abs() >= threshold).to(mask.dtype))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight_w()

    def step(self, px: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        flat = (-1, state.shape[-1])
        pre = torch.addmm(px.reshape(flat), state.reshape(flat), self.weight_u()).view(state.shape)
        z = self._gate(pre + self.bias_gate)
        if self._sigmoid_pair:  # tanh(u) = 2 sigmoid(2u) - 1: torch's CPU tanh is ~2x slower
            c = torch.sigmoid(torch.add(2 * self.bias_update, pre, alpha=2)).mul(2).sub_(1)
        else:
            c = self._update(pre + self.bias_update)
        zeta = torch.sigmoid(self.zeta)
        return _fastgrnn_update(z, c, state, zeta, zeta + torch.sigmoid(self.nu))

    def fused_sweep(self, x: torch.Tensor) -> bool:
        return self._sigmoid_pair and not torch.compiler.is_compiling() and kernel_applies(self.bias_gate, x)

    def sweep_indexed(self, x: torch.Tensor, index: torch.Tensor, lanes: int = INDEXED_LANES) -> torch.Tensor:
        """As RecurrentCell.sweep_indexed; with the numba kernel where it applies (and no gradient is
        needed)."""
        w, u = self.weight_w(), self.weight_u()
        params = (w, u, self.bias_gate, self.bias_update, self.zeta, self.nu)
        if not self.fused_sweep(x) or (
            torch.is_grad_enabled() and any(t.requires_grad for t in (*params, x))
        ):
            return super().sweep_indexed(x, index)
        return kernel_sweep(params, lanes)(x, index)

    def compiled_kernel(self, x: torch.Tensor) -> bool:
        """Whether, under torch.compile, an inference sweep over x can run the numba kernel inside an
        opaque operator (dynamo cannot trace numba); never when exporting, which needs the plain steps."""
        return (
            self._sigmoid_pair
            and NUMBA_INSTALLED
            and not torch.compiler.is_exporting()
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
        )

    def kernel_weights(self) -> list[torch.Tensor]:
        """What the numba kernels compute with: W and U (effective), the two biases, zeta and nu."""
        return [self.weight_w(), self.weight_u(), self.bias_gate, self.bias_update, self.zeta, self.nu]

    def sweep(self, sequences: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if not self._sigmoid_pair or torch.compiler.is_compiling():  # compilers trace the plain steps
            return super().sweep(sequences)
        zeta, nu = torch.sigmoid(self.zeta), torch.sigmoid(self.nu)
        w, u = self.weight_w(), self.weight_u()
        if kernel_applies(w, *sequences):
            args = (w, u, self.bias_gate, self.bias_update, zeta, nu, *sequences)
            if torch.is_grad_enabled() and any(a.requires_grad for a in args):
                final = _FastGRNNKernelSweep.apply(*args)
            else:
                final = _kernel_sweep(*args)[0]
            return _split_like(final.T, sequences)
        weight = torch.cat((w, u)).T
        bias = torch.cat((self.bias_gate, 2 * self.bias_update)).unsqueeze(-1)  # [2, h, 1]
        args = (weight, bias, zeta, nu, *sequences)
        if torch.is_grad_enabled() and any(a.requires_grad for a in args):
            final = _FastGRNNSweep.apply(*args)
        else:
            final = _fastgrnn_sweep(*args)[0][-1, -self.hidden_size :]
        return _split_like(final.T, sequences)


def _gather(sequences: Sequence[torch.Tensor], out: torch.Tensor) -> None:
    """Copy sequences [T, ..., C] side by side into out [T, C, N], feature-major."""
    for seq, part in zip(sequences, out.split([math.prod(seq.shape[1:-1]) for seq in sequences], 2)):
        part.view(*part.shape[:2], *seq.shape[1:-1]).copy_(seq.movedim(-1, 1))


def _scatter(grad: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    """Inverse of `_gather`, for gradients: views [T, ..., C] of grad [T, C, N]."""
    parts = grad.split([math.prod(shape[1:-1]) for shape in shapes], 2)
    return [part.view(*part.shape[:2], *shape[1:-1]).movedim(1, -1) for part, shape in zip(parts, shapes)]


def _fastgrnn_update(
    z: torch.Tensor,
    c: torch.Tensor,
    h: torch.Tensor,
    zeta: torch.Tensor,
    zeta_nu: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """z*h + (zeta*(1-z) + nu)*c, rearranged as (zeta+nu)*c + z*(h - zeta*c): 3 kernels instead of 6."""
    return torch.addcmul(c * zeta_nu, z, torch.addcmul(h, c, zeta, value=-1), out=out)


def _fastgrnn_sweep(
    weight: torch.Tensor, bias: torch.Tensor, zeta: torch.Tensor, nu: torch.Tensor, *sequences: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """FastGRNN (sigmoid, tanh) from zeros over sequences [T, ..., C], batched feature-major: (xh, gates).

    weight = [W; U]^T [h, C + h], bias = [b_gate; 2 b_update] [2, h, 1]. xh [T + 1, C + h, N] holds step
    t's inputs above its incoming state (the last block's state is the final one), so that the shared
    pre-activation x W + h U is one GEMM; gates [T, 2, h, N] keeps the step's sigmoids, of the gate and
    of the doubled update pre-activation (tanh(u) = 2 sigmoid(2u) - 1, torch's CPU tanh is ~2x slower).
    """
    steps, channels = len(sequences[0]), sequences[0].shape[-1]
    hidden, sizes = weight.shape[0], [math.prod(seq.shape[1:-1]) for seq in sequences]
    xh = sequences[0].new_empty(steps + 1, channels + hidden, sum(sizes))
    _gather(sequences, xh[:steps, :channels])
    xh[0, channels:].zero_()
    gates, pre = xh.new_empty(steps, 2, hidden, xh.shape[2]), xh.new_empty(hidden, xh.shape[2])
    zeta2, zeta_nu2 = 2 * zeta, 2 * (zeta + nu)
    for t in range(steps):  # each kernel's first operand is full-size: torch's vectorised fast path
        torch.mm(weight, xh[t], out=pre)
        torch.add(pre, bias[0], out=gates[t, 0])
        torch.add(bias[1], pre, alpha=2, out=gates[t, 1])
        z, s = gates[t].sigmoid_()
        # c = 2 s - 1 = tanh(update pre-activation), passed as c / 2 = s - 0.5 with zeta and nu doubled
        _fastgrnn_update(z, s - 0.5, xh[t, channels:], zeta2, zeta_nu2, out=xh[t + 1, channels:])
    return xh, gates


class _FastGRNNSweep(torch.autograd.Function):
    """`_fastgrnn_sweep` with a hand-written backward: 3 kernels per step instead of ~15 autograd nodes."""

    @staticmethod
    def forward(ctx, weight, bias, zeta, nu, *sequences):
        xh, gates = _fastgrnn_sweep(weight, bias, zeta, nu, *sequences)
        ctx.save_for_backward(weight, zeta, nu, xh, gates)
        ctx.shapes = [seq.shape for seq in sequences]
        return xh[-1, -weight.shape[0] :]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_final):
        weight, zeta, nu, xh, gates = ctx.saved_tensors
        steps, channels = len(gates), ctx.shapes[0][-1]
        z, c, states = gates[:, 0], 2 * gates[:, 1] - 1, xh[:, channels:]
        # d h' / d (gate, update pre-activation), without the incoming gradient: a (1 - a) times
        # (h - zeta c) for the gate, times 2 (zeta (1 - z) + nu) for the doubled update
        local = torch.addcmul(gates, gates, gates, value=-1)
        local[:, 0].mul_(torch.addcmul(states[:-1], c, zeta, value=-1))
        local[:, 1].mul_(torch.mul(z, -2 * zeta).add_(2 * (zeta + nu)))
        local_pre = torch.add(local[:, 0], local[:, 1], alpha=2)  # both share x W + h U
        grad_pre, grad_xh = torch.empty_like(local_pre), torch.empty_like(xh)
        grad_states = grad_xh[:, channels:]  # of each step's outgoing state
        grad_states[-1] = grad_final
        for t in range(steps - 1, -1, -1):
            grad = grad_states[t + 1]
            torch.mm(weight.T, torch.mul(grad, local_pre[t], out=grad_pre[t]), out=grad_xh[t])
            grad_states[t].addcmul_(grad, z[t])
        grad_out = grad_states[1:]
        grad_c = grad_out * c
        grad_nu = grad_c.sum()
        grad_zeta = grad_nu - (grad_c * z).sum()
        grad_weight = torch.bmm(grad_pre, xh[:-1].transpose(1, 2)).sum(0)
        grad_bias = (grad_out.unsqueeze(1) * local).sum((0, 3)).unsqueeze(-1)
        grad_inputs = _scatter(grad_xh[:-1, :channels], ctx.shapes)
        return grad_weight, grad_bias, grad_zeta.view_as(zeta), grad_nu.view_as(nu), *grad_inputs


NUMBA_INSTALLED = importlib.util.find_spec("numba") is not None  # a constant for torch.compile to read


@functools.cache
def _numba_kernels():
    """The numba kernels module (fastgrnn_kernels.py), or None where numba is not installed."""
    try:
        from leanvision.layers import fastgrnn_kernels
    except ImportError:
        return None
    return fastgrnn_kernels


def kernel_applies(weight: torch.Tensor, *sequences: torch.Tensor) -> bool:
    """Whether the numba sweep can run: numba installed, CPU tensors of one float32/float64 dtype.

    Not under a TorchDispatchMode that must see the aten operators, which the kernel bypasses (e.g. the
    MAdds counter of leanvision.analysis.cost); a mode that only watches tensors says so with a true
    `lets_kernels_run` (leanvision.measure_peak's meter).
    """
    return (
        all(getattr(mode, "lets_kernels_run", False) for mode in _get_current_dispatch_mode_stack())
        and weight.dtype in (torch.float32, torch.float64)
        and all(t.device.type == "cpu" and t.dtype == weight.dtype for t in (weight, *sequences))
        and _numba_kernels() is not None
    )


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _kernel_inputs(
    w: torch.Tensor,
    u: torch.Tensor,
    bias_gate: torch.Tensor,
    bias_update: torch.Tensor,
    zeta: torch.Tensor,
    nu: torch.Tensor,
) -> tuple[np.ndarray, ...]:
    """The numba kernels' weight_t = [W; U]^T, biases and coef = [zeta, nu], as numpy arrays."""
    return tuple(
        map(
            _numpy,
            (torch.cat((w, u)).T, bias_gate.view(-1), bias_update.view(-1), torch.cat((zeta, nu)).view(2)),
        )
    )


def pack_params(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """FastGRNNCell.kernel_weights as fastgrnn_kernels.rnnpool_patches takes a cell: one array [h, C + h + 4],
    [W; U]^T, then bias_gate, bias_update, sigmoid(zeta) and sigmoid(nu) as columns."""
    w, u, bias_gate, bias_update, zeta, nu = weights
    hidden = w.shape[1]
    coef = torch.sigmoid(torch.cat((zeta, nu), 1)).expand(hidden, 2)
    return torch.cat((torch.cat((w, u)).T, bias_gate.view(hidden, 1), bias_update.view(hidden, 1), coef), 1)


def premultiplied(params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pack_params' array [h, C + h + 4] as (W [h, C], the packed params of U alone [h, h + 4]): a sweep
    whose inputs are already W x (computed for every input once, where sequences share inputs) reads h
    rows of them instead of C."""
    channels = params.shape[1] - len(params) - 4
    return np.ascontiguousarray(params[:, :channels]), np.ascontiguousarray(params[:, channels:])


def kernel_threads() -> int:
    """The threads a numba kernel runs on: torch's, at most numba's pool (torch's where numba is missing)."""
    kernels = _numba_kernels()
    return torch.get_num_threads() if kernels is None else kernels.usable_threads(torch.get_num_threads())


def _indexed_kernel(x: torch.Tensor, index: torch.Tensor, params: np.ndarray, lanes: int) -> torch.Tensor:
    """The numba sweep_forward_indexed on packed `params` (pack_params) -> final states [h, N], with the
    per-thread scratch allocated here as torch tensors (so that memory meters see it)."""
    kernels, hidden = _numba_kernels(), len(params)
    final = x.new_empty(hidden, index.shape[1])
    with kernels.parallel(torch.get_num_threads()) as tasks:
        lanes = min(lanes, index.shape[1])  # few sequences: less scratch
        threads = min(tasks // kernels.TASKS_PER_THREAD, -(-index.shape[1] // lanes))
        scratch = (
            x.new_empty(threads, len(x) + hidden, lanes),  # a step's inputs above its state
            x.new_empty(threads, hidden, lanes),  # pre-activations
            x.new_empty(threads, 2, lanes),  # a row's gate and update
        )
        kernels.sweep_forward_indexed(
            _numpy(x), index.numpy(), params, final.numpy(), *(t.numpy() for t in scratch)
        )
    return final


def kernel_sweep(
    weights: Sequence[torch.Tensor], lanes: int = INDEXED_LANES
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """FastGRNN's numba sweep_indexed on `weights` (FastGRNNCell.kernel_weights), prepared once: a
    function (x [C, S], index [T, N]) -> final states [h, N]. Inference only."""
    return functools.partial(_indexed_kernel, params=_numpy(pack_params(weights)), lanes=lanes)


def _kernel_sweep(
    w: torch.Tensor,
    u: torch.Tensor,
    bias_gate: torch.Tensor,
    bias_update: torch.Tensor,
    zeta: torch.Tensor,
    nu: torch.Tensor,
    *sequences: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FastGRNN (sigmoid, tanh) from zeros over sequences [T, ..., C] with the numba kernel.

    Returns the final states [h, N] and the kernel's input x [T, C, N] (the sequences side by side).
    """
    kernels = _numba_kernels()
    steps, channels = len(sequences[0]), sequences[0].shape[-1]
    x = w.new_empty(steps, channels, sum(math.prod(seq.shape[1:-1]) for seq in sequences))
    _gather(sequences, x)
    final = w.new_empty(w.shape[1], x.shape[2])
    inputs = _kernel_inputs(w, u, bias_gate, bias_update, zeta, nu)
    with kernels.parallel(torch.get_num_threads()) as tasks:
        kernels.sweep_forward(x.numpy(), *inputs, final.numpy(), tasks)
    return final, x


class _FastGRNNKernelSweep(torch.autograd.Function):
    """`_kernel_sweep` with the numba backward (which recomputes the forward per block of sequences)."""

    @staticmethod
    def forward(ctx, w, u, bias_gate, bias_update, zeta, nu, *sequences):
        final, x = _kernel_sweep(w, u, bias_gate, bias_update, zeta, nu, *sequences)
        ctx.save_for_backward(w, u, bias_gate, bias_update, zeta, nu, x)
        ctx.shapes = [seq.shape for seq in sequences]
        return final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_final):
        w, u, bias_gate, bias_update, zeta, nu, x = ctx.saved_tensors
        kernels = _numba_kernels()
        grad_x = torch.empty_like(x)
        inputs = _kernel_inputs(w, u, bias_gate, bias_update, zeta, nu)
        with kernels.parallel(torch.get_num_threads()) as tasks:
            grads = kernels.sweep_backward(_numpy(grad_final), x.numpy(), *inputs, grad_x.numpy(), tasks)
        grad_weight, grad_bias, grad_coef = map(torch.from_numpy, grads)
        grad_w, grad_u = grad_weight.split((len(w), len(u)))
        grad_gate, grad_update = grad_bias.view(2, 1, -1)
        grad_zeta, grad_nu = grad_coef.view(2, 1, 1)
        return grad_w, grad_u, grad_gate, grad_update, grad_zeta, grad_nu, *_scatter(grad_x, ctx.shapes)


class TorchGatedCell(RecurrentCell):
    """Base of GRUCell and LSTMCell: torch's parameter layout (weight_ih, weight_hh, bias_ih, bias_hh)."""

    torch_cell: type[nn.Module]
    states_per_hidden: int = 1

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        _check_sizes(input_size=input_size, hidden_size=hidden_size)
        self.input_size, self.hidden_size = input_size, hidden_size
        self.state_size = self.states_per_hidden * hidden_size
        reference = self.torch_cell(input_size, hidden_size)  # torch's initialisation
        self.weight_ih, self.weight_hh = reference.weight_ih, reference.weight_hh
        self.bias_ih, self.bias_hh = reference.bias_ih, reference.bias_hh

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight_ih, self.bias_ih)


class GRUCell(TorchGatedCell):
    """GRU with torch.nn.GRUCell's parameters and equations (reset gate applied after the U product)."""

    torch_cell = nn.GRUCell

    def step(self, px: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        gh = nn.functional.linear(state, self.weight_hh, self.bias_hh)
        ir, iz, in_ = px.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return (1 - z) * n + z * state


class LSTMCell(TorchGatedCell):
    """LSTM with torch.nn.LSTMCell's parameters and equations; the state is [h, c] concatenated."""

    torch_cell = nn.LSTMCell
    states_per_hidden = 2

    def step(self, px: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        h, c = state.chunk(2, -1)
        i, f, g, o = (px + nn.functional.linear(h, self.weight_hh, self.bias_hh)).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.cat([torch.sigmoid(o) * torch.tanh(c), c], -1)


CELLS = {"fastgrnn": FastGRNNCell, "gru": GRUCell, "lstm": LSTMCell}


def create_cell(name: str, input_size: int, hidden_size: int, **kwargs) -> RecurrentCell:
    """Build a cell by name: 'fastgrnn', 'gru' or 'lstm'."""
    if name not in CELLS:
        raise InvalidArgumentError(f"unknown cell {name!r}; expected one of {sorted(CELLS)}")
    return CELLS[name](input_size, hidden_size, **kwargs)
