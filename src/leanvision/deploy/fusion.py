"""Consecutive layers fused into one lean module where the map between them is the largest around.

A layer holds its input and its output while it runs. Where a map is larger than the input of the layer
that makes it and the output of the layer that reads it (MobileNetV1-RNNPool's first 28x28 block widens
64 channels to 256, the next halves the map; GoogLeNet's inception 4e before its max pool), the two run
as one module, band of the second one's output rows by band, so that map is never whole: the pair holds
the first one's input, the second one's output and one band.
- blocks of plain CNNs (patch_based.BandBlock: depthwise-separable and inverted-residual blocks, conv ->
  BN -> activation) as PatchedBlocks in full-width bands;
- an inception block and the max pool after it as a BandedInception with that pool.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from leanvision.deploy.lean_blocks import banded_inception
from leanvision.deploy.patch_based import BandBlock, PatchedBlocks, fit_patch
from leanvision.deploy.rewrite import ModuleCall, set_module


def lean_chain(modules: Sequence[nn.Module], input_shape: torch.Size, band_bytes: int) -> nn.Module | None:
    """One module computing `modules` one after the other (on inputs of input_shape) band by band, with
    bands whose maps fit `band_bytes`; None where no lean form covers them."""
    if len(modules) == 2:
        inception = banded_inception(modules[0], input_shape, band_bytes, pool=modules[1])
        if inception is not None:
            return inception
    blocks = [BandBlock.of(module) for module in modules]
    if any(block is None for block in blocks):
        return None
    patch = fit_patch(PatchedBlocks(blocks, (1, 1)), tuple(input_shape[2:]), band_bytes)
    return PatchedBlocks(blocks, patch)


def fused_runs(calls: list[ModuleCall], band_bytes: int) -> list[list[ModuleCall]]:
    """`calls` (consecutive outermost calls) in runs to fuse: a call joins the run before it where it is a
    sibling that takes the run's output, that map is larger than the run's input and the call's output,
    and lean_chain covers the run and the call. Most runs are one call."""
    runs: list[list[ModuleCall]] = []
    for call in calls:
        run = runs[-1] if runs else None
        if (
            run is not None
            and call.input_shape is not None
            and call.input_shape == run[-1].output_shape
            and call.name.rpartition(".")[0] == run[-1].name.rpartition(".")[0]
            and call.input_bytes > max(run[0].input_bytes, call.output_bytes)
            and lean_chain([c.module for c in (*run, call)], run[0].input_shape, band_bytes) is not None
        ):
            run.append(call)
        else:
            runs.append([call])
    return runs


def make_fused(net: nn.Module, runs: list[list[ModuleCall]], band_bytes: int, budget: int) -> None:
    """Put the lean_chain of each run of more than one call into `net` in place of its first call (the
    others become Identity), its bands taking band_bytes or the headroom below `budget` beside the run's
    input and output, whichever is more."""
    for run in (run for run in runs if len(run) > 1):
        group_bytes = max(band_bytes, budget - run[0].input_bytes - run[-1].output_bytes)
        chain = lean_chain([call.module for call in run], run[0].input_shape, group_bytes)
        set_module(net, run[0].name, chain)
        for call in run[1:]:
            set_module(net, call.name, nn.Identity())
