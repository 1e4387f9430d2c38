"""The "planner" convention: tensor lifetimes over the traced graph, placed in one arena.

This is what microcontroller runtimes do. Every operator needs its inputs and its output live at once;
a buffer lives from the operator that writes it to the last operator that reads it (or to the end, for
the network's outputs). Views share their input's buffer. An elementwise operator (BN, activation, add,
mul: what a runtime fuses into the convolution before it) writes in place when an input of its shape is
read for the last time there. With `inplace_depthwise`, a depthwise convolution also overwrites its
input when that input dies there (TinyEngine); it then needs max(input, output), not their sum.

Buffers are placed greedy by size, as TensorFlow Lite Micro's GreedyMemoryPlanner: largest first, each
at the lowest offset free for its whole lifetime. The arena size is the peak; the live bytes per
operator (a lower bound on any arena) make the timeline.
"""

from __future__ import annotations

from dataclasses import dataclass

from leanvision.analysis.memory_trace import Graph, Op
from leanvision.analysis.ops import CONV_OPS, ELEMENTWISE_OPS


@dataclass
class Buffer:
    """One arena allocation: `size` elements live from operator `start` to operator `end` (inclusive)."""

    size: int
    start: int
    end: int
    offset: int = 0


def _is_depthwise(op: Op) -> bool:
    weight = op.attrs.get("weight_shape")
    return op.base_kind in CONV_OPS and weight is not None and op.attrs["groups"] > 1 and weight[1] == 1


def plan_buffers(graph: Graph, inplace_depthwise: bool = False) -> list[Buffer]:
    """The graph's activation buffers with their lifetimes (operator indices), not yet placed."""
    last = len(graph.ops) - 1
    last_read = {name: last for name in graph.outputs}
    for i, op in enumerate(graph.ops):
        for name in op.inputs:
            last_read[name] = max(last_read.get(name, i), i)
    buffers = [Buffer(graph.numel(graph.input_name), 0, last_read.get(graph.input_name, 0))]
    # a buffer's `end` is kept at the last read of any tensor stored in it
    owner = {graph.input_name: buffers[0]}
    for i, op in enumerate(graph.ops):
        reused = _reusable_input(op, owner, i, inplace_depthwise)
        if reused is not None:
            owner[op.name] = owner[reused]
        elif op.numel:
            owner[op.name] = Buffer(op.numel, i, i)
            buffers.append(owner[op.name])
        else:
            continue
        owner[op.name].end = max(owner[op.name].end, last_read.get(op.name, i))
    return buffers


def _reusable_input(op: Op, owner: dict[str, Buffer], index: int, inplace_depthwise: bool) -> str | None:
    """The input whose buffer `op` writes into: its alias, or an input dying here (in-place ops)."""
    if op.alias_of is not None:
        return op.alias_of
    in_place = op.base_kind in ELEMENTWISE_OPS or (inplace_depthwise and _is_depthwise(op))
    if not in_place:
        return None
    for name in op.inputs:
        buffer = owner.get(name)
        if buffer is not None and buffer.end <= index and buffer.size >= op.numel:  # read last here
            return name
    return None


def place_greedy_by_size(buffers: list[Buffer]) -> int:
    """Set each buffer's offset (largest first, lowest free offset); return the arena size."""
    placed: list[Buffer] = []
    for buffer in sorted(buffers, key=lambda b: (-b.size, b.start)):
        offset = 0
        overlapping = [b for b in placed if b.start <= buffer.end and buffer.start <= b.end]
        for other in sorted(overlapping, key=lambda b: b.offset):
            if offset + buffer.size <= other.offset:
                break
            offset = max(offset, other.offset + other.size)
        buffer.offset = offset
        placed.append(buffer)
    return max((b.offset + b.size for b in buffers), default=0)


def live_per_op(graph: Graph, buffers: list[Buffer]) -> list[int]:
    """Elements live while each operator runs."""
    live = [0] * len(graph.ops)
    for buffer in buffers:
        for i in range(buffer.start, buffer.end + 1):
            live[i] += buffer.size
    return live
