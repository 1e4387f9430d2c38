"""Cost counter: parameters and multiply-accumulates (MACs), counted at the aten-operator level.

MACs are counted by torch's FlopCounterMode, a TorchDispatchMode that sees every aten operator the
forward pass runs, so the count works on any module, including recurrent cells written with matmuls.
Convolutions and matmuls use torch's FLOP formulas (FLOPs = 2 x MACs); what torch has no formula for
(matrix-vector products, elementwise work) comes from the operator table of `analysis.ops`.
Convolution and matmul-like operators are always counted; elementwise work (activations, adds, BN,
pooling, one op per element) only with `elementwise=True`. Each op is attributed to the innermost
module running it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from leanvision.analysis import ops
from leanvision.errors import InvalidArgumentError

aten = torch.ops.aten


def _as_flops(macs: ops.MacRule) -> Callable[..., int]:
    def flops(*args, **kwargs) -> int:
        return 2 * macs(*args, **kwargs)

    return flops


def _flop_formulas(elementwise: bool) -> dict[Any, Callable[..., int]]:
    """FlopCounterMode's `custom_mapping`: FLOPs of the table's operators that torch has no formula for."""
    formulas = {}
    for name, op in ops.OPS.items():
        if op.macs is None or not (elementwise or op.kind in ops.ALWAYS_COUNTED):
            continue
        for variant in (name, name + "_"):  # the operator and its in-place form
            if hasattr(aten, variant):
                formulas[getattr(aten, variant)] = _as_flops(op.macs)
    return formulas


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

    counter = FlopCounterMode(display=False, custom_mapping=_flop_formulas(elementwise))
    names = {m: n for n, m in model.named_modules()}
    scope, flops, settled = [""], dict.fromkeys(names.values(), 0), 0
    shapes: dict[str, list[int]] = {}

    def settle() -> None:  # the FLOPs counted since the last module boundary are the innermost module's
        nonlocal settled
        total = counter.get_total_flops()
        flops[scope[-1]] += total - settled
        settled = total

    def enter(module: nn.Module, inputs: Any) -> None:
        settle()
        scope.append(names[module])

    def leave(module: nn.Module, inputs: Any, output: Any) -> None:
        settle()
        scope.pop()
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
        macs = flops[name] // 2
        if own_params or macs:
            layers.append(
                LayerCost(name or "(model)", type(module).__name__, shapes.get(name), own_params, macs)
            )
    params = sum(p.numel() for p in model.parameters())
    counted = "conv, linear, matmul" + (" + elementwise (1 op per element)" if elementwise else "")
    return CostReport(label, size, params, counter.get_total_flops() // 2, counted, layers)
