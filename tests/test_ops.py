"""The operator table shared by the cost counter and the memory trace: each op counted and classified once."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import flop_registry

from leanvision.analysis import ops
from leanvision.analysis.cost import profile
from leanvision.analysis.memory_trace import trace_graph

aten = torch.ops.aten
SIZE = (3, 4, 4)  # inputs [1, 3, 4, 4]: 48 elements


class Sample(nn.Module):
    """Runs one aten operator on the input, with the weights and constants it needs as buffers."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn
        self.register_buffer("channel", torch.ones(3))
        self.register_buffer("vector", torch.ones(4))
        self.register_buffer("rows", torch.ones(12))
        self.register_buffer("mask", torch.rand(1, *SIZE) > 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)


def bn(op):  # the batch-norm family: (input, weight, bias, running_mean, running_var, ...)
    return lambda m, x, *args: op(x, m.channel, m.channel, m.channel, m.channel, *args)


# One call per table operator with a MAC rule, named by that operator (aten called directly, so that the
# traced graph holds it; the cost counter sees it or, for a composite such as batch_norm, its decomposition).
SAMPLES: dict[str, Callable[..., torch.Tensor]] = {
    **{
        name: lambda m, x, name=name: getattr(aten, name)(x)
        for name in (
            "neg",
            "exp",
            "log",
            "sqrt",
            "rsqrt",
            "abs",
            "sign",
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
        )
    },
    **{
        name: lambda m, x, name=name: getattr(aten, name)(x, x)
        for name in ("add", "sub", "mul", "div", "maximum", "minimum")
    },
    "rsub": lambda m, x: aten.rsub(x, 1.0),
    "addcmul": lambda m, x: aten.addcmul(x, x, x, value=0.5),
    "pow": lambda m, x: aten.pow(x, 2),
    "clamp": lambda m, x: aten.clamp(x, -1.0, 1.0),
    "clamp_min": lambda m, x: aten.clamp_min(x, 0.0),
    "clamp_max": lambda m, x: aten.clamp_max(x, 0.0),
    "where": lambda m, x: aten.where(m.mask, x, x),
    "batch_norm": lambda m, x: bn(aten.batch_norm)(m, x, False, 0.1, 1e-5, False),
    "native_batch_norm": lambda m, x: bn(aten.native_batch_norm)(m, x, False, 0.1, 1e-5)[0],
    "_native_batch_norm_legit": lambda m, x: bn(aten._native_batch_norm_legit)(m, x, False, 0.1, 1e-5)[0],
    "_native_batch_norm_legit_no_training": lambda m, x: bn(aten._native_batch_norm_legit_no_training)(
        m, x, 0.1, 1e-5
    )[0],
    "softmax": lambda m, x: aten.softmax(x, 1),
    "_softmax": lambda m, x: aten._softmax(x, 1, False),
    "log_softmax": lambda m, x: aten.log_softmax(x, 1),
    "_log_softmax": lambda m, x: aten._log_softmax(x, 1, False),
    "layer_norm": lambda m, x: aten.layer_norm(x, [4]),
    "native_layer_norm": lambda m, x: aten.native_layer_norm(x, [4], None, None, 1e-5)[0],
    "group_norm": lambda m, x: aten.group_norm(x, 3),
    "native_group_norm": lambda m, x: aten.native_group_norm(x, None, None, 1, 3, 16, 3, 1e-5)[0],
    "max_pool2d": lambda m, x: aten.max_pool2d(x, [2, 2]),
    "max_pool2d_with_indices": lambda m, x: aten.max_pool2d_with_indices(x, [2, 2])[0],
    "avg_pool2d": lambda m, x: aten.avg_pool2d(x, [2, 2]),
    "adaptive_avg_pool2d": lambda m, x: aten.adaptive_avg_pool2d(x, [1, 1]),
    "_adaptive_avg_pool2d": lambda m, x: aten._adaptive_avg_pool2d(x, [2, 2]),
    "adaptive_max_pool2d": lambda m, x: aten.adaptive_max_pool2d(x, [1, 1])[0],
    "mean": lambda m, x: aten.mean(x, [2, 3]),
    "sum": lambda m, x: aten.sum(x, [2, 3]),
    "mv": lambda m, x: aten.mv(x.view(12, 4), m.vector),
    "addmv": lambda m, x: aten.addmv(m.rows, x.view(12, 4), m.vector),
    "dot": lambda m, x: aten.dot(x.view(48), x.view(48)),
}


def test_every_op_with_a_mac_rule_has_a_sample():
    assert set(SAMPLES) == {name for name, op in ops.OPS.items() if op.macs is not None}


def test_table_uses_base_names_and_torch_counts_the_rest():
    assert not [name for name in ops.OPS if name.endswith("_")]
    for name, op in ops.OPS.items():
        if op.kind in ops.ALWAYS_COUNTED and op.macs is None:
            composite = torch._C._dispatch_has_kernel_for_dispatch_key(
                getattr(aten, name).default.name(), "CompositeImplicitAutograd"
            )
            assert composite or getattr(aten, name) in flop_registry, name  # conv2d only reaches torch.export


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_op_is_counted_by_profile(name):
    model, op = Sample(SAMPLES[name]), ops.OPS[name]
    if op.kind == ops.MATMUL:  # always counted: one MAC per element of the matrix
        assert profile(model, SIZE).macs == profile(model, SIZE, elementwise=True).macs == 48
        return
    out = model(torch.randn(1, *SIZE))
    expected = out.numel() if op.macs is ops.per_output_element else 48  # else per input element
    assert profile(model, SIZE).macs == 0
    assert profile(model, SIZE, elementwise=True).macs == expected


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_op_is_classified_the_same_by_the_memory_trace(name):
    graph = trace_graph(Sample(SAMPLES[name]), SIZE, name)
    kinds = {op.base_kind: ops.OPS[op.base_kind].kind for op in graph.ops}
    assert {kind for kind in kinds.values() if kind != ops.VIEW} == {ops.OPS[name].kind}
    if ops.OPS[name].kind == ops.ELEMENTWISE:
        assert name in ops.ELEMENTWISE_OPS and all(k in ops.ELEMENTWISE_OPS | ops.VIEW_OPS for k in kinds)


class FastGRNNUpdate(nn.Module):
    """FastGRNN's state update, z * h + (zeta * (1 - z) + nu) * c, as the RNNPool cells run it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, c, h = x.sigmoid().unbind(1)
        c_scaled = c * 0.5
        return torch.addcmul(c_scaled, z, torch.addcmul(h, c, torch.tensor(0.25), value=-1))


def test_addcmul_model_counted_and_in_place_variants():
    # sigmoid 3 x 16, mul 16, two addcmul 16 each: one op per output element
    assert profile(FastGRNNUpdate(), (3, 4, 4), elementwise=True).macs == 48 + 16 + 2 * 16
    assert profile(FastGRNNUpdate(), (3, 4, 4)).macs == 0
    in_place = Sample(lambda m, x: x.clone().addcmul_(x, x).relu_())
    assert profile(in_place, SIZE, elementwise=True).macs == 2 * 48
    graph = trace_graph(FastGRNNUpdate(), (3, 4, 4), "update")
    assert [op.base_kind for op in graph.ops if op.base_kind in ops.ELEMENTWISE_OPS] == [
        "sigmoid",
        "mul",
        "addcmul",
        "addcmul",
    ]
