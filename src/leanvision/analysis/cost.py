"""Cost counter: parameters and multiply-accumulates (MACs), counted at the aten-operator level.

MACs are counted by a TorchDispatchMode that sees every aten operator the forward pass runs, so the
count works on any module, including recurrent cells written with matmuls. One small handler per
operator in `MAC_RULES` (fvcore style): adding an operator is one line. Convolution and matmul-like
operators are always counted; elementwise work (activations, adds, BN, pooling, one op per output
element) only with `elementwise=True`. Each op is attributed to the innermost module running it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from leanvision.errors import InvalidArgumentError

aten = torch.ops.aten


def _conv_macs(args: tuple, out: torch.Tensor) -> int:
    weight, transposed = args[1], args[6]
    if transposed:  # every input element is scattered through Cout/groups * kernel weights
        return args[0].numel() * math.prod(weight.shape[1:])
    return out.numel() * math.prod(weight.shape[1:])


def _mm_macs(a: torch.Tensor, b: torch.Tensor) -> int:
    return a.numel() * b.shape[-1]


MAC_RULES: dict[Any, Callable[[tuple, Any], int]] = {
    aten.convolution: _conv_macs,
    aten.mm: lambda args, out: _mm_macs(args[0], args[1]),
    aten.addmm: lambda args, out: _mm_macs(args[1], args[2]),
    aten.bmm: lambda args, out: _mm_macs(args[0], args[1]),
    aten.baddbmm: lambda args, out: _mm_macs(args[1], args[2]),
    aten.mv: lambda args, out: args[0].numel(),
    aten.addmv: lambda args, out: args[1].numel(),
    aten.dot: lambda args, out: args[0].numel(),
}


def _output_elements(args: tuple, out: Any) -> int:
    return out.numel() if isinstance(out, torch.Tensor) else out[0].numel()


def _input_elements(args: tuple, out: Any) -> int:
    return args[0].numel()


_POINTWISE = [
    "add",
    "sub",
    "mul",
    "div",
    "neg",
    "exp",
    "log",
    "sqrt",
    "rsqrt",
    "pow",
    "abs",
    "sign",
    "clamp",
    "clamp_min",
    "clamp_max",
    "maximum",
    "minimum",
    "where",
    "relu",
    "relu6",
    "hardtanh",
    "sigmoid",
    "tanh",
    "silu",
    "hardswish",
    "hardsigmoid",
    "gelu",
    "elu",
    "leaky_relu",
    "softplus",
    "_softmax",
    "_log_softmax",
    "native_batch_norm",
    "_native_batch_norm_legit",
    "_native_batch_norm_legit_no_training",
    "native_layer_norm",
    "native_group_norm",
]
_REDUCING = [
    "mean",
    "sum",
    "avg_pool2d",
    "max_pool2d_with_indices",
    "_adaptive_avg_pool2d",
    "adaptive_max_pool2d",
]

ELEMENTWISE_RULES: dict[Any, Callable[[tuple, Any], int]] = {
    **{
        getattr(aten, n): _output_elements
        for name in _POINTWISE
        for n in (name, name + "_")
        if hasattr(aten, n)
    },
    **{getattr(aten, name): _input_elements for name in _REDUCING if hasattr(aten, name)},
}


@dataclass
class LayerCost:
    """One row of the per-layer table."""

    name: str
    type: str
    output_shape: list[int] | None
    params: int
    macs: int


@dataclass
class CostReport:
    """Result of `profile`: totals and per-layer rows, with what the MAC count includes."""

    model: str
    input_size: tuple[int, ...]
    params: int
    macs: int
    counted: str
    layers: list[LayerCost] = field(default_factory=list)

    @property
    def flops(self) -> int:
        """FLOPs as 2 x MACs (the convention the count states; papers often print MACs as FLOPs)."""
        return 2 * self.macs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _MacCounter(TorchDispatchMode):
    def __init__(self, rules: dict[Any, Callable[[tuple, Any], int]]) -> None:
        super().__init__()
        self.rules = rules
        self.scope: list[str] = [""]
        self.macs: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        rule = self.rules.get(func.overloadpacket)
        if rule is not None:
            name = self.scope[-1]
            self.macs[name] = self.macs.get(name, 0) + int(rule(args, out))
        return out


def profile(
    model_or_name: nn.Module | str,
    input_size: tuple[int, ...] | int = (3, 224, 224),
    elementwise: bool = False,
    **model_kwargs: Any,
) -> CostReport:
    """Count parameters and MACs of one forward pass at batch 1 (model in eval mode, no gradients).

    `input_size` is (C, H, W) or one int for a square 3-channel image. A model name is built with
    `create_model(name, **model_kwargs)`.
    """
    if isinstance(model_or_name, str):
        from leanvision.models.registry import create_model

        model, label = create_model(model_or_name, **model_kwargs), model_or_name
    else:
        if model_kwargs:
            raise TypeError(f"model keyword arguments {sorted(model_kwargs)} need a model name, not a module")
        model, label = model_or_name, type(model_or_name).__name__
    size = (3, input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if any(s < 1 for s in size):
        raise InvalidArgumentError(f"input_size must be positive (C, H, W), got {size}")
    first = next(model.parameters(), None)
    x = torch.randn(1, *size, device=first.device if first is not None else "cpu")

    rules = {**MAC_RULES, **ELEMENTWISE_RULES} if elementwise else MAC_RULES
    counter = _MacCounter(rules)
    shapes: dict[str, list[int]] = {}
    names = {m: n for n, m in model.named_modules()}

    def enter(module: nn.Module, inputs: Any) -> None:
        counter.scope.append(names[module])

    def leave(module: nn.Module, inputs: Any, output: Any) -> None:
        counter.scope.pop()
        if isinstance(output, torch.Tensor):
            shapes[names[module]] = list(output.shape)

    hooks = [m.register_forward_pre_hook(enter) for m in names] + [
        m.register_forward_hook(leave) for m in names
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

    layers = []
    for module, name in names.items():
        own_params = sum(p.numel() for p in module.parameters(recurse=False))
        macs = counter.macs.get(name, 0)
        if own_params or macs:
            layers.append(
                LayerCost(name or "(model)", type(module).__name__, shapes.get(name), own_params, macs)
            )
    params = sum(p.numel() for p in model.parameters())
    counted = "conv, linear, matmul" + (" + elementwise (1 op per element)" if elementwise else "")
    return CostReport(label, size, params, sum(counter.macs.values()), counted, layers)
