"""Peak inference memory (activations only, batch 1) under the conventions papers and runtimes use.

Tools disagree by 2-3x on "peak RAM", so every report names its convention and element size:

- "layer": the Visual Wake Words / RNNPool Appendix E.2 block rules (`memory_blocks`);
- "min": the minimum without recomputation, row-by-row execution (RNNPool Proposition 2, Claims 3-4,
  Appendix E.1; `memory_min`);
- "planner": tensor lifetimes over the traced graph in one greedy-by-size arena, as microcontroller
  runtimes plan it (`memory_planner`); works on any model torch.export can trace.

"layer" and "min" need the block structure; a model with a block of unknown structure gets the planner
and a warning naming the block. Units: KiB = 2^10 and MiB = 2^20 bytes (the RNNPool paper's "MB" is
MiB: 2.29 MB = 112 * 112 * 48 * 4 bytes).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from leanvision.analysis.memory_blocks import group_ops, layer_cost
from leanvision.analysis.memory_min import min_steps
from leanvision.analysis.memory_planner import live_per_op, place_greedy_by_size, plan_buffers
from leanvision.analysis.memory_trace import Graph, input_shape, trace_graph
from leanvision.errors import InvalidArgumentError

CONVENTIONS = ("layer", "min", "planner")
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "uint8": 1}


@dataclass
class Step:
    """One entry of the timeline: what runs and the bytes live meanwhile."""

    name: str
    kind: str
    live_bytes: int
    detail: str = ""


@dataclass
class MemoryReport:
    """Result of `peak_memory`: the peak, where it occurs, the timeline and what was assumed."""

    model: str
    input_size: tuple[int, int, int]
    convention: str
    dtype_bytes: int
    peak_bytes: int
    peak_layer: str
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def timeline(self) -> list[tuple[str, int]]:
        """(step name, live bytes) in execution order."""
        return [(s.name, s.live_bytes) for s in self.steps]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def format_bytes(n: int) -> str:
    """Bytes in KiB, and in MiB from 1 MiB up (both binary)."""
    return f"{n / 2**10:.1f} KiB" + (f" = {n / 2**20:.3f} MiB" if n >= 2**20 else "")


def trace(model_or_name: nn.Module | str, input_size: tuple[int, ...] | int = (3, 224, 224), **model_kwargs):
    """Trace a model (or build a registered one) once, to evaluate several conventions on it."""
    size = input_shape(input_size)
    if isinstance(model_or_name, str):
        from leanvision.models.registry import create_model

        return trace_graph(create_model(model_or_name, **model_kwargs), size, model_or_name)
    if not isinstance(model_or_name, nn.Module):
        raise TypeError(f"expected a model name or an nn.Module, got {type(model_or_name).__name__}")
    if model_kwargs:
        raise TypeError(f"model keyword arguments {sorted(model_kwargs)} need a model name, not a module")
    return trace_graph(model_or_name, size, type(model_or_name).__name__)


def as_graph(
    model_or_name: nn.Module | str | Graph, input_size: tuple[int, ...] | int, **model_kwargs: Any
) -> Graph:
    """A `trace(...)` result as it is; a model or model name traced."""
    if isinstance(model_or_name, Graph):
        return model_or_name
    return trace(model_or_name, input_size, **model_kwargs)


def check_dtype_bytes(dtype_bytes: int) -> None:
    """Raise ValueError unless `dtype_bytes` is an element size we count (1, 2, 4 or 8)."""
    if dtype_bytes not in set(DTYPE_BYTES.values()) | {8}:
        raise InvalidArgumentError(
            f"dtype_bytes must be 1 (int8), 2 (fp16/bf16), 4 (fp32) or 8, got {dtype_bytes!r}"
        )


def peak_memory(
    model_or_name: nn.Module | str | Graph,
    input_size: tuple[int, ...] | int = (3, 224, 224),
    convention: str = "layer",
    dtype_bytes: int = 4,
    inplace_depthwise: bool = False,
    **model_kwargs: Any,
) -> MemoryReport:
    """Peak activation memory of one batch-1 inference under `convention` ("layer", "min", "planner").

    `dtype_bytes` is the element size (4 fp32, 1 int8). `inplace_depthwise` (planner only) lets a
    depthwise convolution overwrite its input, as TinyEngine does. A model name is built with
    `create_model(name, **model_kwargs)`; a `trace(...)` result is reused as it is.
    """
    if convention not in CONVENTIONS:
        raise InvalidArgumentError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    check_dtype_bytes(dtype_bytes)
    graph = as_graph(model_or_name, input_size, **model_kwargs)
    notes = [f"activations only, batch 1, {dtype_bytes} bytes per element; KiB/MiB are 2^10/2^20 bytes"]
    if getattr(graph.model, "memory_scope", None):  # a detector traced up to its raw outputs
        notes.append(f"{graph.label}: {graph.model.memory_scope}")
    if convention in ("layer", "min"):
        groups, unknown = group_ops(graph)
        if unknown:
            message = (
                f"{graph.label}: blocks of unknown structure ({', '.join(unknown)}) combine activations "
                f"in their own forward; the {convention!r} convention needs known blocks, so the planner "
                "convention is used instead"
            )
            warnings.warn(message, stacklevel=2)
            notes.append(message)
            convention = "planner"
    if convention == "layer":
        steps = [Step(g.name, g.kind, *_scaled(layer_cost(graph, g), dtype_bytes)) for g in groups]
        notes.append("layer convention: RNNPool Appendix E.2 block rules; the network input is not counted")
    elif convention == "min":
        steps = [Step(*s[:2], *_scaled(s[2:], dtype_bytes)) for s in min_steps(graph, groups)]
        notes.append("min convention: row-by-row execution without recomputation (Proposition 2, Claim 4)")
    else:
        return _planner_report(graph, dtype_bytes, inplace_depthwise, notes)
    peak = max(steps, key=lambda s: s.live_bytes)
    return MemoryReport(
        graph.label, graph.input_size, convention, dtype_bytes, peak.live_bytes, peak.name, steps, notes
    )


def _scaled(cost: tuple[int, str], dtype_bytes: int) -> tuple[int, str]:
    return cost[0] * dtype_bytes, cost[1]


def _planner_report(
    graph: Graph, dtype_bytes: int, inplace_depthwise: bool, notes: list[str]
) -> MemoryReport:
    buffers = plan_buffers(graph, inplace_depthwise)
    arena = place_greedy_by_size(buffers) * dtype_bytes
    live = live_per_op(graph, buffers)
    steps = [
        Step(
            f"{op.module or '(model)'}:{op.name}", op.kind, n * dtype_bytes, "x".join(map(str, op.shape[1:]))
        )
        for op, n in zip(graph.ops, live)
    ]
    peak = max(steps, key=lambda s: s.live_bytes)
    notes.append(
        f"planner convention: greedy-by-size arena of {format_bytes(arena)}, at most "
        f"{format_bytes(peak.live_bytes)} live at once; input counted; elementwise ops in place; "
        f"depthwise convs {'in place (TinyEngine)' if inplace_depthwise else 'not in place (TFLite Micro)'}"
    )
    return MemoryReport(graph.label, graph.input_size, "planner", dtype_bytes, arena, peak.name, steps, notes)


def plot_timeline(reports: list[MemoryReport], path: str, budget_bytes: int | None = None) -> None:
    """Save live memory per step (KiB), one panel per report, the peak marked and the budget drawn."""
    from leanvision.plotting import new_figure, save_figure

    fig, axes = new_figure(len(reports), 1, figsize=(10, 3 * len(reports)), squeeze=False)
    for ax, report in zip(axes[:, 0], reports):
        live = [s.live_bytes / 2**10 for s in report.steps]
        ax.step(range(len(live)), live, where="mid", label="live memory")
        peak = max(range(len(live)), key=live.__getitem__)
        ax.plot(
            peak, live[peak], "rv", label=f"peak {format_bytes(report.peak_bytes)} at {report.peak_layer}"
        )
        if budget_bytes is not None:
            ax.axhline(
                budget_bytes / 2**10, color="k", linestyle="--", label=f"budget {format_bytes(budget_bytes)}"
            )
        ax.set_title(f"{report.model}: {report.convention} convention, {report.dtype_bytes} B/element")
        ax.set_xlabel("step" if report.convention != "planner" else "operator")
        ax.set_ylabel("KiB")
        ax.legend(loc="upper right", fontsize="small")
    save_figure(fig, path)
