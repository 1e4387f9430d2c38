"""The traced graph every memory convention reads: aten operators of one batch-1 forward, in order.

`trace_graph` runs `torch.export` (non-strict) and keeps, for each operator, its activation inputs, its
output size, the module that ran it and whether its output shares memory with an input (a view, an
in-place operator). Parameters and buffers are weights, not activations, and are left out.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import fx, nn
from torch.fx.operator_schemas import normalize_function

from leanvision.analysis.ops import CONV_OPS, POOL_OPS, VIEW_OPS
from leanvision.errors import InvalidArgumentError


class TraceError(InvalidArgumentError):
    """The model could not be traced into a static graph."""


@dataclass
class Op:
    """One traced operator."""

    name: str
    kind: str  # aten operator name without overload, e.g. "conv2d", "relu_", "cat"
    stack: tuple[str, ...]  # module paths, outermost first; () for the model's own forward
    inputs: tuple[str, ...]  # names of the activation tensors it reads
    shape: tuple[int, ...]  # output shape ((), for an operator with several outputs)
    alias_of: str | None = None  # the input whose memory the output shares (views, in-place operators)
    attrs: dict[str, Any] = field(default_factory=dict)  # normalized arguments of convolutions and pools

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape else 0

    @property
    def module(self) -> str:
        return self.stack[-1] if self.stack else ""

    @property
    def base_kind(self) -> str:
        return self.kind.rstrip("_")


@dataclass
class Graph:
    """A traced model: its operators in execution order, the input's name and shape, the outputs."""

    label: str
    model: nn.Module
    input_size: tuple[int, int, int]
    input_name: str
    ops: list[Op]
    outputs: tuple[str, ...]

    def modules(self) -> dict[str, nn.Module]:
        return dict(self.model.named_modules())

    def numel(self, name: str) -> int:
        return math.prod(self.input_size) if name == self.input_name else self.by_name[name].numel

    @cached_property
    def by_name(self) -> dict[str, Op]:
        return {op.name: op for op in self.ops}


def input_shape(input_size: tuple[int, ...] | int) -> tuple[int, int, int]:
    """(C, H, W) from a tuple or one int (a square 3-channel image); raises on anything else."""
    size = (3, input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if len(size) != 3 or any(not isinstance(s, int) or s < 1 for s in size):
        raise InvalidArgumentError(
            f"input_size must be (C, H, W) positive ints or one int, got {input_size!r}"
        )
    return size


def trace_graph(model: nn.Module, input_size: tuple[int, int, int], label: str) -> Graph:
    """Trace `model` at batch 1 in eval mode with torch.export; raise TraceError if it cannot be traced.

    A detector (a model with `head_outputs`) is traced up to its raw head outputs: its post-processing
    (score threshold, NMS) is data-dependent and holds no large activation.
    """
    was_training = model.training
    model.eval()
    first = next(model.parameters(), None)
    x = torch.randn(1, *input_size, device=first.device if first is not None else "cpu")
    head_outputs = getattr(model, "head_outputs", None)
    try:
        if head_outputs is not None:
            model.forward = head_outputs  # an instance attribute, removed below
        with torch.no_grad():
            program = torch.export.export(model, (x,), strict=False)
    except Exception as err:  # torch.export raises many types; all mean "no static graph"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TraceError(
            f"cannot trace {label} with torch.export at input {list(input_size)}: {type(err).__name__}: "
            f"{reason}. Memory conventions need one static graph: data-dependent control flow (an `if` "
            "on tensor values) or untraceable Python must be removed from forward()."
        ) from err
    finally:
        if head_outputs is not None:
            del model.forward
        model.train(was_training)
    return _graph_from_program(program, model, input_size, label)


def _graph_from_program(
    program: torch.export.ExportedProgram, model: nn.Module, input_size: tuple[int, int, int], label: str
) -> Graph:
    user_inputs = program.graph_signature.user_inputs
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    input_name = next(n.name for n in placeholders if n.name in user_inputs)
    activations = {input_name}
    ops = []
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        op = _op_from_node(node, activations)
        if op is not None:
            activations.add(op.name)
            ops.append(op)
    output = next(n for n in program.graph.nodes if n.op == "output")
    outputs = tuple(n.name for n in output.all_input_nodes if n.name in activations)
    return Graph(label, model, input_size, input_name, ops, outputs)


def _kind(node: fx.Node) -> str:
    if node.target is operator.getitem:
        return "getitem"
    schema = getattr(node.target, "_schema", None)
    return schema.name.split("::")[-1] if schema is not None else str(node.target)


def _op_from_node(node: fx.Node, activations: set[str]) -> Op | None:
    inputs = tuple(dict.fromkeys(n.name for n in node.all_input_nodes if n.name in activations))
    if not inputs:
        return None  # works on weights or constants only
    kind = _kind(node)
    value = node.meta.get("val")
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else ()
    stack = tuple(path for path, _ in node.meta.get("nn_module_stack", {}).values() if path)
    # an element of a view operator's outputs is a view; of another multi-output operator, a new tensor
    source_is_view = kind == "getitem" and _kind(node.args[0]) in VIEW_OPS
    is_alias = source_is_view or (kind != "getitem" and (kind in VIEW_OPS or kind.endswith("_")))
    alias = inputs[0] if is_alias else None
    attrs = {}
    if kind.rstrip("_") in CONV_OPS | POOL_OPS:
        attrs = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
        attrs = {k: v for k, v in attrs.kwargs.items() if k not in ("input", "bias")}
        attrs["weight_shape"] = tuple(attrs.pop("weight").meta["val"].shape) if "weight" in attrs else None
    return Op(node.name, kind, stack, inputs, shape, alias, attrs)
