"""MACs of holding peak RAM down by recomputation (RNNPool paper Appendix E.3, Table 1 "Memory Optimised").

The paper lowers a base network's layer-convention peak towards its RNNPool version's by rebuilding an
early activation map, Activation-A, voxel by voxel: for each spatial position the input-image patch of
its receptive field is loaded and run forward to one 1x1xC voxel, recomputing the convolution outputs
that overlapping patches share. The rest of the network runs layer by layer.

Following E.3, ConvBlock-A is the block whose RAM is just above the budget: the last block or layer
(BN and activations aside, they run in place) that needs more than the budget, so the peak becomes
ConvBlock-A's RAM. Activation-A is the earliest map, after the last layer as costly as ConvBlock-A,
whose schedule peaks at no more than that: usually the map entering ConvBlock-A, earlier when cheaper
layers precede it (GoogLeNet's inception 3a before 3b). Holding Activation-A counts toward the peak: a
plain layer reading it holds it besides its own output. ConvBlock-B, reported for orientation, is the
costliest block before Activation-A, the peak no longer paid. Should a smaller budget's schedule cost
fewer MACs (a later Activation-A whose patches already span the image, with fewer positions), it is
used, so a smaller budget never costs fewer MACs.

Extra MACs = sum over convolutions before Activation-A of (patch area x positions - map area) x MACs
per output pixel. Patch sizes are receptive fields derived from the traced convolutions and pools
(`memory_min.receptive_fields`); each patch is counted whole up to its map's size, border patches
included, as the paper counts them. Squeeze-excitation gates (global pools inside a block) are taken
as available, as in the "min" convention; the memory of one patch's computation is not counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from leanvision.analysis.memory import as_graph, check_dtype_bytes, format_bytes
from leanvision.analysis.memory_blocks import Group, group_ops, is_pointwise, layer_cost
from leanvision.analysis.memory_min import receptive_fields
from leanvision.analysis.memory_trace import Graph, Op
from leanvision.analysis.ops import CONV_OPS
from leanvision.errors import InvalidArgumentError


@dataclass
class RecomputeReport:
    """Result of `recompute_cost`: MACs with recomputation, the peak reached and the schedule used."""

    model: str
    input_size: tuple[int, int, int]
    dtype_bytes: int
    budget_bytes: int
    peak_bytes: int  # layer-convention peak of the schedule: ConvBlock-A's RAM, just above the budget
    macs: int  # base_macs + extra_macs
    base_macs: int
    extra_macs: int
    activation: str  # Activation-A, rebuilt patch by patch ("" when nothing is recomputed)
    conv_block_a: str  # where the peak now is
    conv_block_b: str  # the costliest block now run patch by patch
    patch: tuple[int, int] | None = None  # image patch (rows, columns) loaded per voxel of Activation-A
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Schedule:
    start: int  # groups[:start] run patch by patch, groups[start:] layer by layer
    peak: int  # elements
    peak_at: int  # the group where the peak occurs
    extra_macs: int
    activation: str = ""
    patch: tuple[int, int] | None = None


def recompute_cost(
    model_or_name: nn.Module | str | Graph,
    budget_bytes: int,
    input_size: tuple[int, ...] | int = (3, 224, 224),
    dtype_bytes: int = 4,
    **model_kwargs: Any,
) -> RecomputeReport:
    """MACs of one batch-1 inference with peak RAM (layer convention) held just above `budget_bytes`.

    Raises ValueError, naming the smallest peak recomputation can reach, for a budget below it.
    """
    from leanvision.analysis.cost import profile

    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0:
        raise InvalidArgumentError(f"budget_bytes must be a positive int, got {budget_bytes!r}")
    check_dtype_bytes(dtype_bytes)
    graph = as_graph(model_or_name, input_size, **model_kwargs)
    groups, unknown = group_ops(graph)
    if unknown:
        raise InvalidArgumentError(
            f"{graph.label}: blocks of unknown structure ({', '.join(unknown)}); recomputation is "
            "planned over the layer convention's known blocks"
        )
    costs = [layer_cost(graph, g)[0] for g in groups]
    layer_by_layer = _Schedule(0, max(costs), costs.index(max(costs)), 0)
    schedules = [layer_by_layer] + [
        s for i in range(1, len(groups)) if (s := _schedule(graph, groups, costs, i)) is not None
    ]
    limit = budget_bytes // dtype_bytes  # elements
    smallest = min(s.peak for s in schedules)
    if limit < smallest:
        raise InvalidArgumentError(
            f"{graph.label}: budget {format_bytes(budget_bytes)} ({budget_bytes} bytes) is below the "
            f"smallest peak recomputation reaches, {format_bytes(smallest * dtype_bytes)} "
            f"({smallest * dtype_bytes} bytes at {dtype_bytes} bytes per element)"
        )
    # E.3's schedule for this budget, or a smaller budget's when that costs fewer MACs (its patches may
    # already cover the image, with fewer positions), so that a smaller budget never costs fewer MACs
    limits = [limit] + sorted({c for c in costs if smallest <= c < limit}, reverse=True)
    candidates = [_e3_schedule(schedules, groups, costs, c) for c in limits]
    chosen = min(candidates, key=lambda s: s.extra_macs)
    notes = [
        f"layer convention, {dtype_bytes} bytes per element; KiB/MiB are 2^10/2^20 bytes",
        "RNNPool Appendix E.3: ConvBlock-A is the last block above the budget; each patch counted whole; "
        "squeeze-excitation gates taken as available",
    ]
    if chosen is not candidates[0]:
        notes.append(
            f"rebuilding {chosen.activation} (a smaller budget's choice) costs fewer MACs than E.3's "
            f"{candidates[0].activation} for this budget"
        )
    before = costs[: chosen.start]
    base_macs = profile(graph.model, graph.input_size).macs
    return RecomputeReport(
        model=graph.label,
        input_size=graph.input_size,
        dtype_bytes=dtype_bytes,
        budget_bytes=budget_bytes,
        peak_bytes=chosen.peak * dtype_bytes,
        macs=base_macs + chosen.extra_macs,
        base_macs=base_macs,
        extra_macs=chosen.extra_macs,
        activation=chosen.activation,
        conv_block_a=groups[chosen.peak_at].name,
        conv_block_b=groups[max(range(len(before)), key=before.__getitem__)].name if before else "",
        patch=chosen.patch,
        notes=notes,
    )


def _e3_schedule(schedules: list[_Schedule], groups: list[Group], costs: list[int], limit: int) -> _Schedule:
    """E.3's schedule for a budget of `limit` elements (at least the smallest peak of `schedules`).

    ConvBlock-A is the last block above the budget, BN and activations aside; Activation-A the earliest
    map after the last layer as costly as ConvBlock-A whose schedule peaks at most at ConvBlock-A's RAM.
    """
    over = [i for i, g in enumerate(groups) if costs[i] > limit and not is_pointwise(g)]
    if not over:
        return schedules[0]
    peak = costs[over[-1]]
    first = 1 + max((i for i in range(over[-1]) if costs[i] >= peak), default=0)
    # the smallest peak's schedule qualifies: it starts after ConvBlock-A and peaks within the budget
    return next(s for s in schedules if s.start >= first and s.peak <= peak)


def _schedule(graph: Graph, groups: list[Group], costs: list[int], start: int) -> _Schedule | None:
    """Rebuild the one map entering groups[start] patch by patch; None if it cannot be done."""
    first = groups[start]
    if is_pointwise(first):
        return None  # Activation-A is taken after the BN and activation
    ops = [op for g in groups[:start] for op in g.ops]
    done = {op.name for op in ops}
    live = {t for g in groups[start:] for op in g.ops for t in op.inputs if t in done}
    live |= done & set(graph.outputs)
    if len(live) != 1:
        return None
    activation = graph.by_name[live.pop()]
    if len(activation.shape) != 4:
        return None
    shapes = {op.name: op.shape for op in ops} | {graph.input_name: (1, *graph.input_size)}
    rows, cols = (receptive_fields(ops, activation.name, shapes, axis) for axis in (0, 1))
    if rows is None or cols is None or graph.input_name not in rows:
        return None  # a layer before it (an RNNPool, a linear) is not local in the image
    _, channels, height, width = activation.shape
    extra = 0
    for op in ops:
        if op.base_kind in CONV_OPS and op.name in rows:
            _, _, op_height, op_width = op.shape
            patch = min(rows[op.name][0], op_height) * min(cols[op.name][0], op_width)
            extra += _macs_per_pixel(op) * (patch * height * width - op_height * op_width)
    held = activation.numel + (sum(graph.numel(t) for t in first.outputs) if first.kind == "layer" else 0)
    producer = next(g.name for g in groups[:start] if any(op is activation for op in g.ops))
    peak = max(held, *costs[start:])
    return _Schedule(
        start,
        peak,
        start if held == peak else costs.index(peak, start),
        extra,
        f"{producer} output {height}x{width}x{channels}",
        (rows[graph.input_name][0], cols[graph.input_name][0]),
    )


def _macs_per_pixel(op: Op) -> int:
    out_channels, in_per_group, kernel_h, kernel_w = op.attrs["weight_shape"]
    return out_channels * in_per_group * kernel_h * kernel_w
