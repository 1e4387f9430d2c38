"""The aten operators the analyses know: one table of each operator's kind and MAC rule.

The cost counter (`cost.profile`) and the memory conventions (`memory_trace` and the modules reading
it) both classify operators here. Names are aten base names: no overload and no trailing "_" (an
in-place variant shares its operator's entry). The table holds both levels the analyses see:
torch.export's graph keeps composite operators (conv2d, batch_norm, max_pool2d, layer_norm), while the
dispatcher the cost counter watches runs what they decompose into (convolution, native_batch_norm,
max_pool2d_with_indices, native_layer_norm).

MAC rules take the operator's arguments with tensors replaced by their shapes (FlopCounterMode's
formula convention) and return MACs. Convolutions and mm/addmm/bmm/baddbmm have none here: torch's
own FLOP formulas count them (FLOPs = 2 x MACs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

VIEW = "view"  # output is a view of the first input: no new memory, no work
ELEMENTWISE = "elementwise"  # each output element from the same input elements: fused or run in place
NORM = "norm"  # softmax, layer/group norm: per output element, but statistics over many elements
POOL = "pool"  # windowed pooling (kernel, stride, dilation)
GLOBAL_POOL = "global_pool"  # one value per channel (adaptive pooling, mean)
REDUCE = "reduce"  # sum
CONV = "conv"
MATMUL = "matmul"
CONCAT = "concat"  # a copy: no MACs
ALWAYS_COUNTED = (CONV, MATMUL)  # the other kinds' MACs are counted only with profile(elementwise=True)

MacRule = Callable[..., int]


def per_output_element(*args, out_shape: torch.Size | tuple[torch.Size, ...], **kwargs) -> int:
    """One op per element of the (first) output."""
    return math.prod(out_shape if isinstance(out_shape, torch.Size) else out_shape[0])


def per_input_element(input_shape: torch.Size, *args, **kwargs) -> int:
    """One op per element of the first input (reductions, pools; a matrix-vector product's matrix)."""
    return math.prod(input_shape)


def _addmv(self_shape: torch.Size, mat_shape: torch.Size, *args, **kwargs) -> int:
    return math.prod(mat_shape)


@dataclass(frozen=True)
class OpInfo:
    """What the analyses know of one operator: its kind, and its MACs where torch has no formula."""

    kind: str
    macs: MacRule | None = None


def _entries(kind: str, names: tuple[str, ...], macs: MacRule | None = None) -> dict[str, OpInfo]:
    return {name: OpInfo(kind, macs) for name in names}


OPS: dict[str, OpInfo] = {
    **_entries(
        VIEW,
        (
            "view",
            "reshape",
            "flatten",
            "unflatten",
            "permute",
            "transpose",
            "t",
            "numpy_T",
            "unsqueeze",
            "squeeze",
            "expand",
            "slice",
            "select",
            "narrow",
            "unfold",
            "movedim",
            "chunk",
            "split",
            "split_with_sizes",
            "unbind",
            "alias",
            "detach",
            "contiguous",
            "dropout",  # eval mode: the identity
            "getitem",  # torch.export's element of a multi-output operator (operator.getitem)
            "as_strided",
            "unsafe_view",
            "_unsafe_view",
        ),
    ),
    **_entries(
        ELEMENTWISE,
        (
            "add",
            "sub",
            "rsub",
            "mul",
            "div",
            "addcmul",
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
            "batch_norm",  # eval mode: a per-channel affine map
            "native_batch_norm",
            "_native_batch_norm_legit",
            "_native_batch_norm_legit_no_training",
        ),
        per_output_element,
    ),
    **_entries(
        NORM,
        (
            "softmax",
            "_softmax",
            "log_softmax",
            "_log_softmax",
            "layer_norm",
            "native_layer_norm",
            "group_norm",
            "native_group_norm",
        ),
        per_output_element,
    ),
    **_entries(POOL, ("max_pool2d", "max_pool2d_with_indices", "avg_pool2d"), per_input_element),
    **_entries(
        GLOBAL_POOL,
        ("adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_max_pool2d", "mean"),
        per_input_element,
    ),
    **_entries(REDUCE, ("sum",), per_input_element),
    **_entries(CONV, ("conv2d", "convolution")),
    **_entries(MATMUL, ("mm", "addmm", "bmm", "baddbmm")),
    "mv": OpInfo(MATMUL, per_input_element),
    "addmv": OpInfo(MATMUL, _addmv),
    "dot": OpInfo(MATMUL, per_input_element),
    "cat": OpInfo(CONCAT),
}


def ops_of(*kinds: str) -> frozenset[str]:
    """Names of the operators of the given kinds."""
    return frozenset(name for name, op in OPS.items() if op.kind in kinds)


VIEW_OPS = ops_of(VIEW)
ELEMENTWISE_OPS = ops_of(ELEMENTWISE)
CONV_OPS = ops_of(CONV)
POOL_OPS = ops_of(POOL)
GLOBAL_POOL_OPS = ops_of(GLOBAL_POOL)
CONCAT_OPS = ops_of(CONCAT)
