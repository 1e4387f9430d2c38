"""The "min" convention: least peak memory without recomputation (RNNPool paper Appendix D, E.1).

The network's blocks and layers (`memory_blocks.group_ops`) are partitioned into contiguous segments so
that the most expensive segment is as cheap as possible (Appendix E.1.2); the peak is that segment's
cost. A segment of up to MAX_SEGMENT groups runs row by row (Claim 4): the input is held whole and
freed row by row as the output fills, and each stored intermediate map keeps k' = RF - S of its rows,
RF being the rows one output row needs from it and S the rows it advances per output row:

    max(in + k'_in * w_out * c_out, out + k'_in * w_in * c_in) + sum over maps of c * k' * w.

Receptive fields and strides come from the traced convolutions and pools. Only convolution and
pooling outputs are stored: BN, activations, adds and concatenations are applied on the fly. A
single block may instead use its layer-convention schedule (E.2) when that is cheaper, so "min" never
exceeds "layer". Assumptions, as in the paper: padding rows are not counted; squeeze-excitation gates
(global pools inside a block) are taken as available (E.1.2 treats EfficientNet's MBConv as
MobileNetV2's); an RNNPool block runs patch by patch and is a segment of its own.
"""

from __future__ import annotations

from leanvision.analysis.memory_blocks import Group, layer_cost
from leanvision.analysis.memory_trace import Graph, Op
from leanvision.analysis.ops import CONCAT_OPS, CONV_OPS, ELEMENTWISE_OPS, GLOBAL_POOL_OPS, POOL_OPS, VIEW_OPS

MAX_SEGMENT = 8  # groups per row-by-row segment (longer ones never helped on the paper's networks)
ROW_LOCAL_OPS = ELEMENTWISE_OPS | VIEW_OPS | CONCAT_OPS


def min_steps(graph: Graph, groups: list[Group]) -> list[tuple[str, str, int, str]]:
    """The cheapest partition: (name, kind, elements, detail) per segment, in order."""
    best = [0] + [-1] * len(groups)
    choice = [0] * (len(groups) + 1)
    costs: dict[tuple[int, int], tuple[int, str]] = {}
    readers: dict[str, set[str]] = {name: {"(output)"} for name in graph.outputs}
    for op in graph.ops:
        for name in op.inputs:
            readers.setdefault(name, set()).add(op.name)
    for j in range(1, len(groups) + 1):
        for i in range(max(0, j - MAX_SEGMENT), j):
            cost = _segment_cost(graph, groups[i:j], readers)
            if cost is None:
                continue
            costs[i, j] = cost
            if best[j] < 0 or max(best[i], cost[0]) < best[j]:
                best[j], choice[j] = max(best[i], cost[0]), i
    steps, j = [], len(groups)
    while j > 0:
        i = choice[j]
        name = groups[i].name if j - i == 1 else f"{groups[i].name} .. {groups[j - 1].name}"
        kind = groups[i].kind if j - i == 1 else "segment"
        steps.append((name, kind, *costs[i, j]))
        j = i
    return steps[::-1]


def _segment_cost(graph: Graph, segment: list[Group], readers: dict[str, set[str]]) -> tuple[int, str] | None:
    """Cost of running `segment` as one partition (None if it cannot run row by row)."""
    rows = None if any(g.kind == "rnnpool" for g in segment) else _row_by_row(graph, segment, readers)
    if len(segment) > 1:
        return rows
    layer = layer_cost(graph, segment[0])
    return rows if rows is not None and rows[0] < layer[0] else layer


def _row_by_row(graph: Graph, segment: list[Group], readers: dict[str, set[str]]) -> tuple[int, str] | None:
    ops = [op for g in segment for op in g.ops]
    inside = {op.name for op in ops}
    inputs = list(dict.fromkeys(t for op in ops for t in op.inputs if t not in inside))
    outputs = [op.name for op in ops if readers.get(op.name, set()) - inside]
    if len(inputs) != 1 or len(outputs) != 1:
        return None
    shapes = {op.name: op.shape for op in ops} | {inputs[0]: _shape(graph, inputs[0])}
    if len(shapes[outputs[0]]) != 4 or len(shapes[inputs[0]]) != 4:
        return None
    fields = receptive_fields(ops, outputs[0], shapes)
    if fields is None or inputs[0] not in fields:
        return None
    (_, c_in, h_in, w_in), (_, c_out, h_out, w_out) = shapes[inputs[0]], shapes[outputs[0]]
    rf, stride = fields[inputs[0]]
    k_in = min(max(rf - stride, 0), h_in)
    held = max(c_in * h_in * w_in + k_in * w_out * c_out, c_out * h_out * w_out + k_in * w_in * c_in)
    stored = [
        op
        for op in ops
        if op.base_kind in CONV_OPS | POOL_OPS and op.name != outputs[0] and op.name in fields
    ]
    rows = sum(_kept_rows(op, fields) * op.shape[1] * op.shape[3] for op in stored)
    detail = f"row by row: {k_in} input rows, {rows} elements of rows kept in {len(stored)} maps"
    return held + rows, detail


def _kept_rows(op: Op, fields: dict[str, tuple[int, int]]) -> int:
    rf, stride = fields[op.name]
    return min(max(rf - stride, 0), op.shape[2])


def _shape(graph: Graph, name: str) -> tuple[int, ...]:
    return (1, *graph.input_size) if name == graph.input_name else graph.by_name[name].shape


def receptive_fields(
    ops: list[Op], output: str, shapes: dict[str, tuple[int, ...]], axis: int = 0
) -> dict[str, tuple[int, int]] | None:
    """(rows of each map one output row needs, rows it advances per output row), None if not row-local.

    `axis` 1 gives columns instead of rows.
    """
    fields = {output: (1, 1)}
    for op in reversed(ops):
        if op.name not in fields or (_is_gate(shapes[op.name]) and op.name != output):
            continue
        if op.base_kind in CONV_OPS | POOL_OPS:
            kernel, stride, dilation = _window(op, axis)
        elif op.base_kind in ROW_LOCAL_OPS and len(shapes[op.name]) == 4:
            kernel, stride, dilation = 1, 1, 1
        elif op.base_kind in GLOBAL_POOL_OPS and op.name == output:  # accumulated row by row
            kernel, stride, dilation = 1, 1, 1
        elif op.base_kind in GLOBAL_POOL_OPS:  # a squeeze-excitation gate: taken as available
            continue
        else:
            return None
        rf, advance = fields[op.name]
        for name in op.inputs:
            if name in shapes and not _is_gate(shapes[name]):
                need = (rf - 1) * stride + dilation * (kernel - 1) + 1
                old = fields.get(name, (0, 0))
                fields[name] = (max(old[0], need), max(old[1], advance * stride))
    return fields


def _is_gate(shape: tuple[int, ...]) -> bool:
    """A squeeze-excitation gate or other per-channel vector: [N, C, 1, 1]."""
    return len(shape) == 4 and shape[2] == 1 and shape[3] == 1


def _window(op: Op, axis: int) -> tuple[int, int, int]:
    """Kernel size, stride and dilation of a convolution or pool along `axis` (0 rows, 1 columns)."""
    if op.base_kind in CONV_OPS:
        kernel = op.attrs["weight_shape"][2 + axis]
    else:
        sizes = op.attrs["kernel_size"]
        kernel = sizes[axis] if len(sizes) > 1 else sizes[0]
    stride = op.attrs.get("stride") or [kernel]
    dilation = op.attrs.get("dilation", [1]) if op.base_kind != "avg_pool2d" else [1]
    return kernel, _along(stride, axis), _along(dilation, axis)


def _along(values: list[int], axis: int) -> int:
    """One axis of a conv/pool argument given as one value or one per axis."""
    return values[axis] if len(values) > 1 else values[0]
