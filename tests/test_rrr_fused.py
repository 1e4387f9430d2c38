"""FusedConv / FusedRRRNet: the oneDNN path (packed weights, fused add and ReLU) equals the plain one."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import randomize_
from leanvision.deploy import fuse_for_inference, fused_rrr, onednn
from leanvision.deploy.fused_rrr import FusedBlock, FusedConv, FusedRRRNet
from leanvision.models.rrrnet import RRRNet

pytestmark = pytest.mark.skipif(not onednn.private_ops_usable(), reason="needs oneDNN's private ops (CPU)")


@pytest.mark.parametrize("usable", [True, False])
def test_an_unbiased_conv_equals_f_conv2d_with_one_packing_per_shape_and_padding(monkeypatch, usable):
    """conv_unbiased (streaming's band convolutions): the conv without its bias, at a padding of the
    caller's; the plain F.conv2d where the private ops are not usable."""
    if not usable:
        monkeypatch.setattr(onednn, "private_ops_usable", lambda: False)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1).requires_grad_(False)
    packed = onednn.PackedWeights()
    for shape, padding in [((1, 8, 9, 11), (1, 1)), ((1, 8, 9, 11), (0, 1)), ((1, 8, 5, 11), (1, 1))]:
        x = torch.randn(*shape)
        expected = F.conv2d(x, conv.weight, None, conv.stride, padding)
        torch.testing.assert_close(
            onednn.conv_unbiased(conv, x, padding, packed), expected, atol=1e-5, rtol=0
        )
    assert len(packed) == (3 if usable else 0)


def test_packed_weights_keep_at_most_max_shapes():
    conv = nn.Conv2d(4, 6, 3, padding=1).requires_grad_(False)
    packed = onednn.PackedWeights(max_shapes=2)
    for size in (5, 6, 5, 7):  # 5 is used again before 7 arrives, so 6 is the one dropped
        x = torch.randn(1, 4, size, size)
        y = onednn.conv_add_relu(conv, x, None, False, packed)
        torch.testing.assert_close(y, conv(x), atol=1e-5, rtol=0)
    assert len(packed) == 2 and {shape for shape, _ in packed._by_shape} == {
        torch.Size([1, 4, 5, 5]),
        torch.Size([1, 4, 7, 7]),
    }


def test_private_ops_are_used_only_on_checked_releases(monkeypatch):
    onednn.private_ops_usable.cache_clear()
    monkeypatch.setattr(torch, "__version__", "3.0.0")
    try:
        assert not onednn.private_ops_usable()
    finally:
        onednn.private_ops_usable.cache_clear()


@pytest.mark.parametrize("groups, stride, relu", [(1, 1, True), (4, 2, False), (2, 1, False)])
def test_fused_conv_equals_conv_add_relu(groups, stride, relu, monkeypatch):
    conv = nn.Conv2d(8, 12, 3, stride, padding=1, groups=groups).requires_grad_(False)
    x = torch.randn(2, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, 12, 10 // stride, 10 // stride).contiguous(memory_format=torch.channels_last)
    fused = FusedConv(conv, relu)
    for extra in (None, residual):
        y = conv(x) if extra is None else conv(x) + extra
        expected = F.relu(y) if relu else y
        torch.testing.assert_close(fused(x, extra), expected, rtol=0, atol=1e-5)
        assert (fused(x, extra) < 0).any() != relu  # the ReLU is there exactly when asked for
    assert len(fused.packed) == 1  # packed once for this input shape
    monkeypatch.setattr(onednn, "private_ops_usable", lambda: False)  # the plain path
    torch.testing.assert_close(fused(x, residual), F.relu(conv(x) + residual) if relu else conv(x) + residual)


def test_fused_rrrnet_copies_and_other_batch_sizes():
    model = randomize_(RRRNet("resnet18", (1, 1, 1, 1), branches=3, num_classes=5), seed=3)
    fused = FusedRRRNet(model)
    with torch.no_grad():
        for batch in (1, 4):  # one packed weight per input shape
            x = torch.randn(batch, 3, 48, 48, generator=torch.Generator().manual_seed(batch))
            torch.testing.assert_close(fused(x), model(x), rtol=0, atol=1e-5)
        copied = copy.deepcopy(fused)  # packed weights are not copied: the copy packs its own
        assert not copied.top[0].convs[0].packed and fused.top[0].convs[0].packed
        torch.testing.assert_close(copied(x), fused(x), rtol=0, atol=0)
        torch.testing.assert_close(fuse_for_inference(fused)(x), fused(x), rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in fused.parameters())


def test_fused_rrrnet_runs_the_stem_in_chunks(monkeypatch):
    model = randomize_(RRRNet("resnet50", (1, 1, 1, 1), branches=2, num_classes=4), seed=5)
    fused = FusedRRRNet(model)
    x = torch.randn(5, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    # conv1's output is 64 x 20 x 20 fp32 per image: 102,400 bytes
    assert fused.stem_chunk(x) == fused_rrr.STEM_CHUNK_BYTES // 102_400 >= 5
    monkeypatch.setattr(fused_rrr, "STEM_CHUNK_BYTES", 2 * 102_400 + 1)
    assert fused.stem_chunk(x) == 2
    calls = []
    fused.stem.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model.eval()(x), rtol=0, atol=1e-5)
    assert calls == [2, 2, 1]


@pytest.mark.parametrize("groups, stride, size", [(1, 1, 9), (1, 2, 9), (4, 2, 8), (2, 2, 7)])
def test_fused_block_merges_the_projection_into_the_last_conv(groups, stride, size):
    g = torch.Generator().manual_seed(groups * 10 + stride + size)

    def conv(cin: int, cout: int, k: int = 1, s: int = 1) -> nn.Conv2d:
        c = nn.Conv2d(cin, cout, k, s, padding=k // 2, groups=groups).requires_grad_(False)
        c.weight.copy_(torch.randn(c.weight.shape, generator=g) * 0.2)
        c.bias.copy_(torch.randn(c.bias.shape, generator=g) * 0.2)
        return c.to(memory_format=torch.channels_last)

    c1, c2, c3, down = conv(16, 8), conv(8, 8, 3, stride), conv(8, 32), conv(16, 32, 1, stride)
    fused = FusedBlock([c1, c2, c3], down)
    assert fused.shortcut_stride == stride and fused.downsample is None and len(fused.convs) == 3
    x = torch.randn(2, 16, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    expected = F.relu(c3(F.relu(c2(F.relu(c1(x))))) + down(x))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), expected, rtol=0, atol=1e-5)
    unmerged = FusedBlock([c1, conv(8, 32, 3)], down)  # a 3x3 last conv (BasicBlock) keeps its projection
    assert not unmerged.shortcut_stride and unmerged.downsample is not None
