"""Measured peak memory: the bytes of tensors really alive while a function runs.

`measure_peak(fn, *args)` runs `fn` under a TorchDispatchMode that sees every aten op. Each op output
whose storage is new (not one of the op's inputs, not already counted: views and in-place results share
their input's storage) is counted from the op that made it until its storage is freed. Tensors that
existed before the call (inputs, weights, buffers) are not counted, nor is memory a kernel allocates for
itself without making a tensor of it (oneDNN workspaces; the numba FastGRNN training sweep's per-thread
block of (C + 4h) x 128 floats; the streaming sweep takes its scratch as tensors, which are counted). The
meter lets the numba kernels run (`lets_kernels_run`), so what it measures is what runs outside it. The
peak is taken after each op, so a tensor freed during the call but alive at some op counts there.
A tensor without a storage (oneDNN's opaque layout, e.g. a convolution's weight packed on first use) is
counted from the op that made it to the end of the call: its freeing cannot be watched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass(frozen=True)
class LiveTensor:
    """One storage alive at the peak: the op that made it, its shape and its bytes."""

    op: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class MeasuredPeak:
    """Peak bytes of tensors alive during a call, the op after which it was reached, and what held it."""

    peak_bytes: int = 0
    peak_op: str = ""
    live_at_peak: list[LiveTensor] = field(default_factory=list)
    ops: int = 0


class PeakMeter(TorchDispatchMode):
    """Counts the storages that ops create, until they are freed; see the module docstring."""

    lets_kernels_run = True  # it watches tensors, not ops: kernels that bypass aten may run under it

    def __init__(self) -> None:
        super().__init__()
        self.result = MeasuredPeak()
        self.live_bytes = 0
        self._live: dict[int, tuple[StorageWeakRef, LiveTensor]] = {}

    def _drop_freed(self) -> None:
        for key in [key for key, (ref, _) in self._live.items() if ref.expired()]:
            self.live_bytes -= self._live.pop(key)[1].nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._drop_freed()
        inputs = {
            StorageWeakRef(t.untyped_storage()).cdata
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and not t.is_mkldnn
        }
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            if t.is_mkldnn:  # no storage to watch: alive to the end
                self.live_bytes += t.numel() * t.element_size()
                continue
            ref = StorageWeakRef(t.untyped_storage())
            if ref.cdata in inputs or ref.cdata in self._live:
                continue
            tensor = LiveTensor(name, tuple(t.shape), t.untyped_storage().nbytes())
            self._live[ref.cdata] = (ref, tensor)
            self.live_bytes += tensor.nbytes
        self.result.ops += 1
        if self.live_bytes > self.result.peak_bytes:
            self.result.peak_bytes, self.result.peak_op = self.live_bytes, name
            self.result.live_at_peak = sorted((t for _, t in self._live.values()), key=lambda t: -t.nbytes)
        return out


def measure_peak(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> MeasuredPeak:
    """Run fn(*args, **kwargs) once and return the peak bytes of the tensors it created and held."""
    meter = PeakMeter()
    with meter:
        fn(*args, **kwargs)
    return meter.result
