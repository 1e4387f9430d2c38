"""Rebuilding an eval-mode network for lean inference (streaming, patch_based): its module calls on a probe
input (with the bytes of their inputs and outputs), the modules lean_module replaces, and the check that
the rebuilt network computes the original's output."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from leanvision.deploy.lean_blocks import lean_module
from leanvision.errors import InvalidArgumentError
from leanvision.layers import RNNPoolLayer


class Chain(nn.Sequential):
    """An nn.Sequential that hands each map to a module with a `take(box)` method as the only reference:
    a one-element list that the module pops, so that it may free its input before it returns (an
    nn.Sequential's loop holds the input until then). Other modules are called as nn.Sequential calls them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        box = [x]
        del x  # the caller still holds the chain's input; later maps are held by the box alone
        for module in self:
            take = getattr(module, "take", None)
            box.append(take(box) if take is not None else module(box.pop()))
        return box.pop()


def flatten_sequentials(module: nn.Module) -> nn.Module:
    """Inline every nn.Sequential directly inside an nn.Sequential or a Chain (same computation). A nested
    one keeps its input referenced by the outer loop until its last module returns: a stage's input map
    would stay alive through the whole stage."""
    for name, child in module.named_children():
        setattr(module, name, flatten_sequentials(child))
    if type(module) in (nn.Sequential, Chain) and any(type(child) is nn.Sequential for child in module):
        flat = []
        for child in module:
            flat.extend(child if type(child) is nn.Sequential else [child])
        return type(module)(*flat)
    return module


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


@dataclass
class ModuleCall:
    """One module call of a forward pass: the bytes of its tensor input and output (0 where the input or
    the output is not one tensor, as some blocks take lists (DenseNet's dense layers), and for an output
    in the input's storage)."""

    name: str
    module: nn.Module
    input_shape: torch.Size | None
    input_bytes: int = 0
    output_bytes: int = 0
    outputs_bytes: int = 0  # of every tensor it returns (a detection head's loc and conf, which it keeps)
    input: torch.Tensor | None = None  # kept up to the first RNNPoolLayer, for the prefix replay
    output_shape: torch.Size | None = None


def _nbytes(t: object) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def raw_forward(model: nn.Module, x: torch.Tensor) -> object:
    """model(x); for a detector (torchvision's convention: it batches and normalises its own images) the
    raw head outputs of the images x, before its NMS, whose output is discontinuous."""
    if hasattr(model, "head_outputs"):
        return model.head_outputs(model.batch_images(x))
    return model(x)


def module_calls(model: nn.Module, x: torch.Tensor) -> tuple[list[ModuleCall], list[torch.Tensor], object]:
    """Every module call of one forward pass, in call order, the outputs of the RNNPoolLayers called and
    the model's output."""
    calls, pooled, handles, running = [], [], [], []  # running: the calls not yet returned, innermost last
    for name, module in model.named_modules():
        if isinstance(module, RNNPoolLayer):
            handles.append(module.register_forward_hook(lambda m, args, out: pooled.append(out)))

        def before(module: nn.Module, args: tuple, name: str = name) -> None:
            first = args[0] if args else None
            shape = first.shape if isinstance(first, torch.Tensor) else None
            kept = (
                first if not pooled and not any(isinstance(c.module, RNNPoolLayer) for c in running) else None
            )
            calls.append(ModuleCall(name, module, shape, _nbytes(first), input=kept))
            running.append(calls[-1])

        def after(module: nn.Module, args: tuple, out: object) -> None:
            first = args[0] if args else None
            same = _nbytes(first) and _nbytes(out) and first.data_ptr() == out.data_ptr()
            call = running.pop()
            call.output_bytes = 0 if same else _nbytes(out)  # in place (or Identity): nothing new
            call.outputs_bytes = sum(map(_nbytes, tree_flatten(out)[0]))
            call.output_shape = out.shape if isinstance(out, torch.Tensor) else None

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        with torch.no_grad():
            output = raw_forward(model, x)
    finally:
        for handle in handles:
            handle.remove()
    return calls, pooled, output


def _same_outputs(got: object, expected: object) -> bool:
    """Whether two model outputs (tensors, or lists/dicts of them) agree to 1e-3 of the largest value: a
    check of structure (a layer fed the wrong map is far off), not of rounding, which BN can make ~1e-4."""
    if got is None:
        return False
    got_leaves, got_spec = tree_flatten(got)
    expected_leaves, expected_spec = tree_flatten(expected)
    if got_spec != expected_spec or any(a.shape != b.shape for a, b in zip(got_leaves, expected_leaves)):
        return False
    return all(
        (a.float() - b.float()).abs().max() <= 1e-3 * b.float().abs().max().clamp_min(1e-12)
        for a, b in zip(got_leaves, expected_leaves)
        if b.numel()
    )


def computes(net: nn.Module, probe: torch.Tensor, expected: object) -> bool:
    """Whether the rebuilt `net` gives the `expected` raw_forward output on `probe` (False also when a
    layer fails on the map it now gets)."""
    try:
        with torch.no_grad():
            return _same_outputs(raw_forward(net, probe), expected)
    except RuntimeError:
        return False


def eval_copy(
    model: nn.Module, input_size: tuple[int, int, int], band_bytes: int | None
) -> tuple[nn.Module, torch.Tensor]:
    """An eval-mode copy of `model` to rebuild and a batch-1 probe input of `input_size`, once the
    arguments every streamed form takes are checked."""
    if any(m.training for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        raise InvalidArgumentError("stream() runs inference: put the model in eval mode (model.eval()) first")
    if len(input_size) != 3 or min(input_size) < 1:
        raise InvalidArgumentError(f"input_size must be (C, H, W) of positive sizes, got {input_size!r}")
    if band_bytes is not None and band_bytes < 1:
        raise InvalidArgumentError(f"band_bytes must be >= 1 (or None), got {band_bytes}")
    probe = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
    return copy.deepcopy(model).eval(), probe


def lean_calls(
    calls: list[ModuleCall], done: Sequence[ModuleCall], band_bytes: int
) -> tuple[list[ModuleCall], list[ModuleCall]]:
    """The outermost of `calls` (none inside `done` or inside a call lean_module replaces), and those of
    them that lean_module replaces."""
    run, replaced = [], []
    for call in calls:
        if any(call.name.startswith(outer.name + ".") for outer in (*done, *replaced)):
            continue
        run.append(call)
        if call.input_shape is not None and lean_module(call.module, call.input_shape, band_bytes):
            replaced.append(call)
    return run, replaced


def make_lean(
    net: nn.Module,
    replaced: list[ModuleCall],
    band_bytes: int,
    budget: int,
    beside: dict[str, int] | None = None,
) -> None:
    """Put the lean form of each replaced call's module into `net`, its groups taking band_bytes or the
    headroom below `budget` beside the call's input and output (and the bytes `beside` it, by call name),
    whichever is more."""
    beside = beside or {}
    for call in replaced:
        group_bytes = max(
            band_bytes, budget - call.input_bytes - call.output_bytes - beside.get(call.name, 0)
        )
        set_module(net, call.name, lean_module(call.module, call.input_shape, group_bytes))


class InferenceOnly(nn.Module):
    """Runs `self.net` without gradients; refuses to run in training mode."""

    net: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise InvalidArgumentError(
                f"a {type(self).__name__} runs inference only: call .eval() (no gradients)"
            )
        with torch.no_grad():
            return self.net(x)
