"""Blocks of a traced graph, found from the modules that ran each operator, and the "layer" convention.

A block is the outermost module of a known type around an operator (torchvision's and leanvision's
inverted residuals, residual blocks, inception blocks, dense blocks, RNNPool layers). Operators outside
blocks form one group per leaf module (conv, BN, activation, pool, ...). An operator that a non-block
module with children runs itself and that combines two activations (an add, a concatenation) means a
block of unknown structure: `group_ops` lists those modules.

Layer convention (RNNPool paper Appendix E.2, the Visual Wake Words rules): an inverted bottleneck
costs input + output (its expansion is computed channel by channel), a residual block max(input,
output), an inception block input + all path outputs but the largest, a dense block its output, any
other layer its output (the largest activation map). An RNNPool block is computed patch by patch
together with the chain of convolutions (and their BN/activation) that feeds it, so their outputs are
never stored: the chain costs the RNNPool output only (one stem conv in the RNNPool classifiers, both of
RNNPool-Face-Quant's, App. E.2.3). The network input is not counted.

Detectors (models with `head_outputs`, traced up to those): a detection head (RNNPool-Face's L2Norm,
loc/conf convs and max-out background; SSDLite's per-level heads; the R-CNNs' RPN head) costs its
outputs, like a layer; the map it reads is counted where it was made, and the heads' outputs are
concatenated in the detector's own forward (App. E.2.3 counts neither the image nor RNNPool-Face-Quant's
stem map, which its first head also reads). A feature pyramid (FPN) holds its inputs and its outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torchvision.models import densenet, efficientnet, mobilenetv2, mobilenetv3, resnet
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.ssd import SSDScoringHead
from torchvision.models.googlenet import Inception
from torchvision.ops import FeaturePyramidNetwork

from leanvision.analysis.memory_trace import Graph, Op
from leanvision.analysis.ops import CONV_OPS, ELEMENTWISE_OPS, VIEW_OPS
from leanvision.errors import InvalidArgumentError
from leanvision.layers.inverted_residual import LinearBottleneck
from leanvision.layers.rnnpool import RNNPool, RNNPoolLayer
from leanvision.models.face import DetectionHead
from leanvision.models.ssdlite import AfterExpansion

BLOCK_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "inverted_residual": (
        mobilenetv2.InvertedResidual,
        mobilenetv3.InvertedResidual,
        efficientnet.MBConv,
        efficientnet.FusedMBConv,
        LinearBottleneck,
        AfterExpansion,
    ),
    "residual": (resnet.BasicBlock, resnet.Bottleneck),
    "inception": (Inception,),
    "dense_block": (densenet._DenseBlock,),
    "rnnpool": (RNNPoolLayer, RNNPool),
    "detection_head": (DetectionHead, SSDScoringHead, RPNHead),
    "feature_pyramid": (FeaturePyramidNetwork,),
}


def block_kind(module: nn.Module) -> str | None:
    """The block kind of a module ("inverted_residual", "residual", ...), None if it is not a block."""
    return next((kind for kind, types in BLOCK_TYPES.items() if isinstance(module, types)), None)


@dataclass
class Group:
    """Consecutive operators of one block or one layer, with the activations it reads and leaves."""

    name: str
    kind: str  # a BLOCK_TYPES key, or "layer"
    ops: list[Op]
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    fused: list[str] = field(default_factory=list)  # layers computed inside this group (RNNPool's conv)


def group_ops(graph: Graph) -> tuple[list[Group], list[str]]:
    """Blocks and layers in execution order, and the modules whose structure is unknown."""
    modules = graph.modules()
    groups: list[Group] = []
    unknown: list[str] = []
    # a detector's own forward only concatenates its heads' outputs
    own_ops_known = hasattr(graph.model, "head_outputs")
    for op in graph.ops:
        block = next((p for p in op.stack if block_kind(modules[p])), None)
        if block is not None:
            name, kind = block, block_kind(modules[block])
        else:
            name, kind = op.module or "(model)", "layer"
            has_children = next(modules[op.module].children(), None) is not None
            combines = has_children and len(op.inputs) > 1 and not (own_ops_known and not op.module)
            if combines and name not in unknown:
                unknown.append(name)
        if groups and groups[-1].name == name:
            groups[-1].ops.append(op)
        else:
            groups.append(Group(name, kind, [op]))
    _set_boundaries(graph, groups)
    return _fuse_rnnpool_inputs(groups), unknown


def _set_boundaries(graph: Graph, groups: list[Group]) -> None:
    owner = {op.name: i for i, group in enumerate(groups) for op in group.ops}
    read_outside: set[str] = set(graph.outputs)
    for i, group in enumerate(groups):
        inputs = [t for op in group.ops for t in op.inputs if owner.get(t) != i]
        group.inputs = tuple(dict.fromkeys(inputs))
        read_outside.update(inputs)
    for group in groups:
        group.outputs = tuple(op.name for op in group.ops if op.name in read_outside)


def _is_conv(group: Group) -> bool:
    return group.kind == "layer" and any(op.base_kind in CONV_OPS for op in group.ops)


def is_pointwise(group: Group) -> bool:
    return group.kind == "layer" and all(op.base_kind in ELEMENTWISE_OPS | VIEW_OPS for op in group.ops)


def _fuse_rnnpool_inputs(groups: list[Group]) -> list[Group]:
    """Merge into each RNNPool block the chain of conv (+ BN/activation) layers that feeds it."""
    fused: list[Group] = []
    for group in groups:
        if group.kind == "rnnpool":
            chain = []
            while fused and set(group.inputs if not chain else chain[-1].inputs) <= set(fused[-1].outputs):
                if not (is_pointwise(fused[-1]) or _is_conv(fused[-1])):
                    break
                chain.append(fused.pop())
            while chain and not _is_conv(chain[-1]):  # BN/activation not fed by a chained conv: keep them
                fused.append(chain.pop())
            group.fused = [g.name for g in reversed(chain)]
        fused.append(group)
    return fused


def layer_cost(graph: Graph, group: Group) -> tuple[int, str]:
    """Elements the layer convention holds while `group` runs, and how they were counted."""
    size_in = sum(graph.numel(t) for t in group.inputs)
    size_out = sum(graph.numel(t) for t in group.outputs)
    shapes_in, shapes_out = _shapes(graph, group.inputs), _shapes(graph, group.outputs)
    if group.kind in ("inverted_residual", "feature_pyramid"):
        return size_in + size_out, f"input {shapes_in} + output {shapes_out}"
    if group.kind == "residual":
        return max(size_in, size_out), f"max(input {shapes_in}, output {shapes_out})"
    if group.kind == "inception":
        paths = _inception_paths(graph, group)
        kept = sorted(paths, key=graph.numel)[:-1]
        return size_in + sum(graph.numel(p) for p in kept), (
            f"input {shapes_in} + smallest path outputs {_shapes(graph, tuple(kept))}"
        )
    if group.kind == "rnnpool" and group.fused:
        return size_out, f"output {shapes_out} (patch by patch with {', '.join(group.fused)})"
    return size_out, f"output {shapes_out}"


def _inception_paths(graph: Graph, group: Group) -> tuple[str, ...]:
    last = graph.by_name[group.outputs[-1]]
    while last.alias_of is not None and last.base_kind != "cat":
        last = graph.by_name[last.alias_of]
    if last.base_kind != "cat":
        raise InvalidArgumentError(
            f"inception block {group.name} does not end in a concatenation of its paths"
        )
    return last.inputs


def _shapes(graph: Graph, names: tuple[str, ...]) -> str:
    return " + ".join(_hwc(graph, n) for n in names) or "-"


def _hwc(graph: Graph, name: str) -> str:
    shape = graph.input_size if name == graph.input_name else graph.by_name[name].shape[1:]
    if len(shape) == 3:
        return f"{shape[1]}x{shape[2]}x{shape[0]}"
    return "x".join(map(str, shape))
