"""Streaming inference: run an RNNPool network in the RAM that its memory analysis reports.

`stream(model, input_size)` returns a StreamedModel, an inference-only copy of `model` with the same output,
in which
- the layers before the first RNNPoolLayer and the layer itself run patch group by patch group
  (StreamedRNNPool): for each group of neighbouring patches of one patch row, the stem layers compute only
  the input region those patches read (receptive fields, recomputing the overlap of neighbouring groups),
  RNN1 and RNN2 pool it, and the pooled values are written into the output map. No map of the stem's
  resolution is ever whole. A detection head that also reads the stem's output (RNNPool-Face-Quant's first
  head) runs in the same patch rows, from the same stem rows (BandedHead, RNNPool Appendix E.2.3): neither
  the stem map nor the head's intermediate maps are ever whole;
- inverted-residual blocks (torchvision's InvertedResidual, leanvision's LinearBottleneck without SE and
  DepthwiseSeparable) run channel group by channel group (ChunkedBottleneck): expand -> depthwise for a
  group of the expanded channels, then that group's share of the projection is added into the output. The
  expanded map is never whole: the block holds its input, its output and one group, the layer
  convention's "input + output";
- the residual blocks of the stage that reads the pool's output (ResNet BasicBlocks; inverted residuals
  whose expanded rows fit a band) are fed its rows as the pool makes them, each block's rows to the next
  (row_runs.PoolIntoBlocks): the pool's output is never whole. All of them are fed (the least RAM) unless
  feeding fewer leaves the RAM to pool whole patch rows in bands (_choose: each stem row computed once);
- other ResNet basic blocks, DenseNet dense blocks and transitions, GoogLeNet inception blocks, max pools: the
  other forms of lean_blocks; a map larger than the input of the layer that makes it and the output of
  the one that reads it is never whole: the two run as one, in row bands (fusion.py);
- every other layer runs as it is.
Batch 1 is the target; larger batches run image by image. StreamedRNNPool is in streamed_rnnpool.py, the
lean blocks in lean_blocks.py, the probe-and-rebuild machinery in rewrite.py.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torchvision.models.googlenet import BasicConv2d

from leanvision.deploy.fold import check_built_model
from leanvision.deploy.fusion import fused_runs, make_fused
from leanvision.deploy.lean_blocks import BandedBasicBlock, ChunkedBottleneck, lean_module
from leanvision.deploy.rewrite import (
    Chain,
    InferenceOnly,
    ModuleCall,
    computes,
    eval_copy,
    flatten_sequentials,
    lean_calls,
    make_lean,
    module_calls,
    set_module,
)
from leanvision.deploy.row_runs import PoolIntoBlocks, RowBlock
from leanvision.deploy.streamed_rnnpool import HeadOutputs, StreamedRNNPool, banded_rows, patches_per_group
from leanvision.errors import InvalidArgumentError
from leanvision.layers import RNNPoolLayer
from leanvision.models.face.nets import DetectionHead

if TYPE_CHECKING:
    from leanvision.deploy.patch_based import PatchBasedModel


def _prefix_layers(calls: list[ModuleCall]) -> list[tuple[str, nn.Module]]:
    """(name, layer) of the leaf modules called before the RNNPoolLayer, in order, with torchvision's
    GoogLeNet BasicConv2d (conv, BN, then a functional ReLU) spelled out as its three layers."""
    layers, inside = [], ()
    for name, module in ((call.name, call.module) for call in calls):
        if not name or name.startswith(inside):
            continue
        if isinstance(module, BasicConv2d):
            layers += [(f"{name}.conv", module.conv), (f"{name}.bn", module.bn), (name, nn.ReLU())]
            inside = (name + ".",)
        elif not list(module.children()) and not isinstance(module, nn.Sequential):  # an empty one: nothing
            layers.append((name, module))
    return layers


def _head_on_prefix(calls: list[ModuleCall], first: int) -> ModuleCall | None:
    """The call of a DetectionHead after the RNNPoolLayer (calls[first]) on a map of the pool's input
    shape: a detector's head on the stem output, which StreamedRNNPool computes in its patch rows."""
    pool_call = calls[first]
    return next(
        (
            call
            for call in calls[first + 1 :]
            if isinstance(call.module, DetectionHead) and call.input_shape == pool_call.input_shape
        ),
        None,
    )


def _chained_after_pool(net: nn.Module, calls: list[ModuleCall], first: int) -> nn.Module | None:
    """A copy of `net` whose RNNPool call also runs the siblings called after it that take its output, in a
    chain (the siblings left as Identity), or None if no sibling chains on. A parent's forward such as
    torchvision ResNet's `x = self.layer3(x)` holds its input until the call returns: chained in one
    Chain, the pool's output is freed after the first block that reads it (and a block with a `take`
    method may free its input before it returns, rewrite.Chain). The caller checks that
    the copy computes the same output (the parent's forward might not be a chain)."""
    pool_call = calls[first]
    parent, _, _ = pool_call.name.rpartition(".")
    chain = [pool_call]
    for call in calls[first + 1 :]:
        sibling, _, child = call.name.rpartition(".")
        if sibling != parent or not child:
            continue
        if call.input_shape != chain[-1].output_shape:
            break
        chain.append(call)
    if len(chain) == 1:
        return None
    chained = copy.deepcopy(net)
    modules = [chained.get_submodule(call.name) for call in chain]
    for call in chain[1:]:
        set_module(chained, call.name, nn.Identity())
    set_module(chained, pool_call.name, Chain(*modules))
    return chained


def _heads_beside(calls: list[ModuleCall], first: int, head_call: ModuleCall | None) -> dict[str, int]:
    """The bytes of a detector's head outputs alive while each call after the RNNPoolLayer (calls[first])
    runs, by call name: the head on the pool's input (which the pool's loop computes) and each head that
    returned before the call keep their loc and conf until the detector returns."""
    kept, beside = head_call.outputs_bytes if head_call else 0, {}
    for call in calls[first + 1 :]:
        beside[call.name] = kept
        if isinstance(call.module, DetectionHead) and call is not head_call:
            kept += call.outputs_bytes
    return beside


def _made(call: ModuleCall, calls: Sequence[ModuleCall]) -> int:
    """The bytes a call run as it is makes: its output, or for a detection head the maps its parts make
    (the L2Norm's copy of its input, loc and conf)."""
    if not isinstance(call.module, DetectionHead):
        return call.output_bytes
    return sum(c.output_bytes for c in calls if c.name.rpartition(".")[0] == call.name)


def _peak_budget(
    runs: list[list[ModuleCall]],
    replaced: set[int],
    band_bytes: int,
    pool_bytes: int,
    groups: bool,
    fed: Sequence[ModuleCall] = (),
    calls: Sequence[ModuleCall] = (),
    beside: dict[str, int] | None = None,
) -> int:
    """The peak RAM the executors after the pool reach anyway: each holds its run's input and output at
    once (a detector also the head outputs `beside` it, see _heads_beside), and with `groups` a
    ChunkedBottleneck or BandedBasicBlock one group of about band_bytes beside them (its group_bytes;
    other forms' groups are not counted). The groups of every executor may use the headroom below it at
    no cost. The pool's input is never whole: its output alone counts (`pool_bytes`), or with `fed`, the
    blocks fed the pool's rows, what the pool's loop holds: the containers of those blocks hold nothing
    more."""
    beside = beside or {}

    def held(run: list[ModuleCall]) -> int:
        call, group = run[0], 0
        if any(fed_call.name.startswith(call.name + ".") for fed_call in fed):
            return 0
        if groups and len(run) == 1 and id(call) in replaced:
            lean = lean_module(call.module, call.input_shape, band_bytes)
            if isinstance(lean, (ChunkedBottleneck, BandedBasicBlock)):
                group = lean.group_bytes(*call.input_shape[2:])
        made = _made(call, calls) if len(run) == 1 else run[-1].output_bytes
        return call.input_bytes + made + group + beside.get(call.name, 0)

    return max(pool_bytes, *(held(run) for run in runs if run[-1].output_bytes or run[-1].outputs_bytes))


def _fed_blocks(
    calls: list[ModuleCall], first: int, head_call: ModuleCall | None, band_bytes: int
) -> list[tuple[ModuleCall, RowBlock]]:
    """The calls of the residual blocks of the stage that reads the RNNPoolLayer's (calls[first]) output
    (one after the other, each output the shape of the first's), which the pool then feeds row by row
    (PoolIntoBlocks): those RowBlock computes whose maps for a step of BLOCK_STEP_ROWS rows fit
    `band_bytes` (a chain's rows with their halos, a fused step's work in one group; an inverted
    residual's expanded rows may not fit), with their RowBlocks (a fused one in taller steps, its groups
    fitting band_bytes); none if another layer reads the pool's output first."""
    fed, pool_call = [], calls[first]
    for call in calls[first + 1 :]:
        if call is head_call or type(call.module) in (nn.Identity, nn.Sequential):
            continue
        outers = (pool_call, head_call, *(fed_call for fed_call, _ in fed))
        if any(call.name.startswith(outer.name + ".") for outer in outers if outer):
            continue
        previous = fed[-1][0].output_shape if fed else pool_call.output_shape
        block = RowBlock.of(call.module)
        if (
            block is None
            or call.input_shape != previous
            or (fed and call.output_shape != fed[0][0].output_shape)
        ):
            break
        held, work = block.step_bytes(*call.input_shape[2:])
        if (work if block.fused is not None else held) > band_bytes:
            break
        if block.fused is not None:  # fed in taller steps, its groups fitting the band
            block = RowBlock.of(call.module, call.input_shape[3], band_bytes)
        fed.append((call, block))
    return fed


@dataclass
class _Plan:
    """How the layers after the pool run when it feeds the blocks `fed`: the runs after it (a fused run as
    one), the calls lean forms replace, what the pool's loop holds beside its groups (`pool_bytes`) and
    the peak that the executors reach anyway (`budget`: the groups take the headroom below it)."""

    fed: list[tuple[ModuleCall, RowBlock]]
    runs: list[list[ModuleCall]]
    replaced: list[ModuleCall]
    pool_bytes: int
    budget: int


def _plan(
    calls: list[ModuleCall],
    first: int,
    head_call: ModuleCall | None,
    fed: list[tuple[ModuleCall, RowBlock]],
    band_bytes: int,
    chain_only: bool,
    beside: dict[str, int],
) -> _Plan:
    """The plan of the layers after the RNNPoolLayer (calls[first]) when it feeds `fed` (`beside`: the
    head outputs a detector holds, _heads_beside)."""
    pool_call = calls[first]
    done = [pool_call, *([head_call] if head_call else []), *(call for call, _ in fed)]
    done_ids = {id(call) for call in done}  # the calls whose work StreamedRNNPool does
    later, replaced = lean_calls([c for c in calls[first + 1 :] if id(c) not in done_ids], done, band_bytes)
    runs = fused_runs(later, band_bytes)  # the calls that run after the pool, a fused run as one
    fused = {id(call) for run in runs if len(run) > 1 for call in run}
    replaced = [call for call in replaced if id(call) not in fused]
    # what the pool's loop holds beside its groups: its output, or the last fed block's output, the rows
    # the fed blocks hold and one block's step; the groups may then use the RAM the pool's output would
    # have taken
    pool_bytes = pool_call.output_bytes
    if fed:
        steps = [block.step_bytes(*call.input_shape[2:]) for call, block in fed]
        pool_bytes = fed[-1][0].output_bytes + sum(held for held, _ in steps) + max(work for _, work in steps)
    pool_bytes += head_call.outputs_bytes if head_call else 0  # the loop makes the head's outputs
    fed_calls = [call for call, _ in fed]
    budget = _peak_budget(
        runs, {id(call) for call in replaced}, band_bytes, pool_bytes, chain_only, fed_calls, calls, beside
    )
    return _Plan(fed, runs, replaced, pool_bytes, max(budget, pool_call.output_bytes))


def _choose(plans: list[_Plan], pool: StreamedRNNPool, valid_width: int, head: bool) -> _Plan:
    """The plan that feeds every block that fits a band (the last: the least RAM), unless plans that feed
    fewer run the pool's stem in whole-row bands within their budget (each stem row computed once, where
    groups of patches recompute their overlap; and each row step of a fed block passes over its weights):
    then of those the one with the least budget, the fewest fed blocks among equals (ResNet18-RNNPool:
    layer3.0 fed and 2-row bands run 1.5x eager, both layer3 blocks fed and groups of 5 patches 4x).
    With a `head` on the pool's input (its stem rows computed whole anyway), the plan of least budget,
    the fewest fed blocks among equals (RNNPool-Face-Quant: its first block fed, the others in channel
    groups within the peak its second head reaches anyway, 1.6x faster than all four fed)."""
    banded = [plan for plan in plans if head or banded_rows(pool, valid_width, plan.budget - plan.pool_bytes)]
    return min(banded, key=lambda plan: plan.budget) if banded else plans[-1]


class StreamedModel(InferenceOnly):
    """An inference-only copy of an RNNPool network that runs in (about) the RAM its layer-convention
    analysis reports; see the module docstring. Its forward equals the eval-mode model's."""

    def __init__(
        self, model: nn.Module, input_size: tuple[int, int, int], band_bytes: int | None = None
    ) -> None:
        super().__init__()
        net, probe = eval_copy(model, input_size, band_bytes)
        self.input_size = tuple(input_size)
        calls, pooled, expected = module_calls(net, probe)
        first = next((i for i, call in enumerate(calls) if isinstance(call.module, RNNPoolLayer)), None)
        if first is None:
            raise InvalidArgumentError(
                f"{type(model).__name__} has no RNNPoolLayer to stream; for patch-based inference of its "
                "first blocks, pass split_blocks=K"
            )
        pool_call, prefix = calls[first], _prefix_layers(calls[:first])
        head_call = _head_on_prefix(calls, first)
        if band_bytes is None:  # a quarter of the pool's fp32 output, the first map the network keeps whole
            band_bytes = pool_call.output_bytes // 4
        head = None if head_call is None else head_call.module
        streamed_pool = StreamedRNNPool([m for _, m in prefix], pool_call.module, 1, head)
        prefix_input = next((c.input for c in calls if c.name == prefix[0][0]), None) if prefix else None
        with torch.no_grad():  # the prefix's input may be the image after the model's own normalisation
            replayed = streamed_pool(pool_call.input if prefix_input is None else prefix_input)
        if (replayed - pooled[0]).abs().max() > 1e-4 * pooled[0].abs().max():  # e.g. a functional op
            raise InvalidArgumentError(
                f"{type(model).__name__} cannot be streamed: its layers before the RNNPoolLayer are not a "
                "plain chain of modules (convolutions, BatchNorms, activations) that the executor can replay"
            )
        set_module(net, pool_call.name, streamed_pool)
        for name, _ in prefix:
            set_module(net, name, nn.Identity())
        if head_call is not None:
            set_module(net, head_call.name, HeadOutputs(streamed_pool.handoff))
        pool = pool_call.module  # patches a patch row: "edgeml"'s last column replicates the one before
        valid_width = pool.output_size(*pool_call.input_shape[2:])[1] - (pool.padding == "edgeml")
        # A detector keeps maps beside the chain (its sources, its heads' outputs) that a run's input and
        # output do not count: there the budget keeps that slack (no groups counted in it).
        chain_only = isinstance(expected, torch.Tensor)
        fed_blocks = _fed_blocks(calls, first, head_call, band_bytes)
        beside = _heads_beside(calls, first, head_call)
        plans = [
            _plan(calls, first, head_call, fed_blocks[:k], band_bytes, chain_only, beside)
            for k in range(len(fed_blocks) + 1)
        ]
        plan = _choose(plans, streamed_pool, valid_width, head_call is not None)
        fed = [call for call, _ in plan.fed]
        if fed:  # PoolIntoBlocks does their work
            set_module(net, pool_call.name, PoolIntoBlocks(streamed_pool, [block for _, block in plan.fed]))
            for call in fed:
                set_module(net, call.name, nn.Identity())
        budget, pool_bytes = plan.budget, plan.pool_bytes
        if head_call:  # each patch row's stem rows are computed at full width anyway: whole rows
            streamed_pool.banded = banded_rows(
                streamed_pool, valid_width, max(band_bytes, budget - pool_bytes)
            )
            groups = valid_width
        else:
            groups = patches_per_group(streamed_pool, valid_width, max(band_bytes, budget - pool_bytes))
            if chain_only:  # where even one patch exceeds the budget, the pool's least group sets the peak
                budget = max(budget, pool_bytes + streamed_pool.group_bytes(groups))
        streamed_pool.regroup(groups, probe)
        # with a head on the pool's input, the budget is the peak its heads reach (RNNPool-Face-Quant's
        # second head, on its first source): the groups take what is left below it, however little
        make_lean(net, plan.replaced, 1 if head_call else band_bytes, budget, beside)
        make_fused(net, plan.runs, band_bytes, budget)
        chained = _chained_after_pool(net, calls, first)
        if chained is not None and computes(chained, probe, expected):
            net = chained
        elif not computes(net, probe, expected):  # e.g. a prefix map read after the pool
            raise InvalidArgumentError(
                f"{type(model).__name__} cannot be streamed: a map before its RNNPoolLayer is read again "
                "after it (e.g. by a detection head), so it cannot be computed patch by patch and dropped"
            )
        self.net = flatten_sequentials(net).requires_grad_(False)
        self.eval()


def stream(
    model: nn.Module,
    input_size: tuple[int, int, int],
    band_bytes: int | None = None,
    split_blocks: int | None = None,
) -> StreamedModel | PatchBasedModel:
    """`model` (eval mode) as a StreamedModel for inputs of `input_size` (C, H, W), or with `split_blocks`
    as a PatchBasedModel whose first split_blocks blocks run patch by patch (any plain CNN, see
    leanvision.deploy.patch_based).

    `band_bytes`: the least RAM the work of one group (of patches, expanded channels or rows) may take
    beyond the input and output its layer holds (default: a quarter of the RNNPool's fp32 output, or with
    split_blocks of the last patch-based block's). Groups also take the headroom below the peak some executor
    reaches anyway (the largest input + output of a layer after the RNNPool, with the group a
    ChunkedBottleneck there holds beside them where the output is one tensor): larger groups there cost
    no peak RAM and run faster."""
    check_built_model(model, "stream")
    if split_blocks is not None:
        from leanvision.deploy.patch_based import PatchBasedModel

        return PatchBasedModel(model, input_size, split_blocks, band_bytes)
    return StreamedModel(model, input_size, band_bytes)
