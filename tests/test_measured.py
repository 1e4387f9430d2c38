"""measure_peak: the bytes of tensors alive during a call, on chains of ops whose sizes are known."""

from __future__ import annotations

import pytest
import torch

from leanvision.analysis.measured import measure_peak
from leanvision.deploy import onednn

N = 1000  # fp32 elements: 4,000 bytes


def test_a_chain_counts_what_is_alive_together():
    def chain(x: torch.Tensor) -> torch.Tensor:
        a = x.repeat(4)  # 16,000 new bytes
        v = a.view(2, -1)  # a view: no new storage
        v.mul_(2)  # in place: none either
        b = v.sum(0)  # 8,000, while a is alive: 24,000
        del a, v
        c = b + 1  # 8,000 more, a is gone: 16,000
        return c

    peak = measure_peak(chain, torch.ones(N))
    assert peak.peak_bytes == 6 * 4 * N
    assert peak.peak_op == "sum" and [t.nbytes for t in peak.live_at_peak] == [16 * N, 8 * N]


def test_inputs_and_views_of_them_are_not_counted():
    weight = torch.ones(N)
    assert measure_peak(lambda x: (x.view(10, -1).t(), weight.add_(1)), torch.ones(N)).peak_bytes == 0


def test_a_freed_tensor_no_longer_counts():
    def loop(x: torch.Tensor) -> None:
        y = x * 2
        for _ in range(5):
            y = y * 2  # the old y lives until the new one is made: two at a time

    assert measure_peak(loop, torch.ones(N)).peak_bytes == 2 * 4 * N


def test_a_forward_pass_counts_activations_not_weights():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    with torch.no_grad():
        peak = measure_peak(lambda x: torch.relu(conv(x)), torch.ones(1, 3, 10, 10))
    assert peak.peak_bytes == 2 * 8 * 10 * 10 * 4  # the conv output and the relu output


@pytest.mark.skipif(not onednn.private_ops_usable(), reason="needs oneDNN's private ops (CPU)")
def test_a_tensor_without_storage_counts_to_the_end_of_the_call():
    """oneDNN's opaque tensors (a convolution's weight packed on first use) have no storage whose freeing
    the meter could watch: counted from the op that makes them to the end."""
    weight = torch.randn(16, 8, 3, 3)

    def pack(x: torch.Tensor) -> None:
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            weight, [1, 1], [1, 1], [1, 1], 1, list(x.shape)
        )
        assert packed.is_mkldnn
        del packed
        (x + 1).sum()

    assert measure_peak(pack, torch.ones(1, 8, 5, 5)).peak_bytes >= weight.numel() * 4
