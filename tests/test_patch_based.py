"""Patch-based inference (MCUNetV2-style) of plain CNNs: `stream(model, input_size, split_blocks=K)` equals
the eager model, runs mobilenetv2_100 within 1.3x its min-convention figure, and counts the MACs its
recomputation adds against recompute_cost's."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation

import leanvision
from conftest import randomize_
from leanvision.analysis.measured import measure_peak
from leanvision.analysis.memory import peak_memory
from leanvision.analysis.recompute import recompute_cost
from leanvision.bench import calibrate_batchnorm
from leanvision.deploy import PatchBasedModel, stream
from leanvision.deploy.patch_based import PatchedBlocks
from leanvision.errors import InvalidArgumentError

SIZE = (3, 224, 224)


def _close(streamed: torch.Tensor, eager: torch.Tensor) -> None:
    """max |streamed - eager| <= 1e-5 relative to the largest output."""
    assert streamed.shape == eager.shape
    assert (streamed - eager).abs().max() <= 1e-5 * eager.abs().max()


@pytest.fixture(scope="module")
def mobilenetv2() -> nn.Module:
    return randomize_(leanvision.create_model("mobilenetv2_100"))


@pytest.fixture(scope="module")
def calibrated() -> nn.Module:
    torch.manual_seed(0)
    return calibrate_batchnorm(leanvision.create_model("mobilenetv2_100"), SIZE)


@pytest.mark.parametrize(
    "size, split_blocks, batch",
    [
        (SIZE, 1, 1),
        (SIZE, 3, 2),
        (SIZE, 6, 1),
        ((3, 97, 130), 2, 1),  # rectangular, odd: no stride divides it
        ((3, 97, 130), 4, 2),
        ((3, 97, 130), 8, 1),
    ],
)
def test_patch_based_equals_eager(mobilenetv2, size, split_blocks, batch):
    x = torch.randn(batch, *size, generator=torch.Generator().manual_seed(split_blocks))
    streamed = stream(mobilenetv2, size, split_blocks=split_blocks)
    assert isinstance(streamed, PatchBasedModel) and streamed.split_blocks == split_blocks
    with torch.no_grad():
        _close(streamed(x), mobilenetv2(x))


def test_patch_based_is_as_exact_as_eager_with_calibrated_batchnorm(calibrated):
    """As in test_streaming: with real BN statistics fp32 itself is ~1e-4 off; the reference is float64."""
    x = torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = copy.deepcopy(calibrated).double()(x.double())
        eager, streamed = calibrated(x).double(), stream(calibrated, SIZE, split_blocks=3)(x).double()
    assert (streamed - exact).abs().max() <= 1.5 * (eager - exact).abs().max() + 1e-7 * exact.abs().max()


@pytest.mark.parametrize("patch", [(1, 1), (5, 7), (2, 200)])  # voxels, 2-D patches, bands past the width
def test_given_patches_equal_eager(mobilenetv2, patch):
    x = torch.randn(1, 3, 61, 75, generator=torch.Generator().manual_seed(1))
    streamed = PatchBasedModel(mobilenetv2, (3, 61, 75), split_blocks=4, patch=patch)
    with torch.no_grad():
        _close(streamed(x), mobilenetv2(x))


def test_conv_norm_act_and_depthwise_separable_blocks():
    model = randomize_(leanvision.create_model("mobilenetv1_100"))  # ConvNormAct stem, DepthwiseSeparable
    x = torch.randn(1, 3, 67, 80, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _close(stream(model, (3, 67, 80), split_blocks=4)(x), model(x))


def test_default_split_runs_within_1_3x_the_min_figure(calibrated):
    min_bytes = peak_memory(calibrated, input_size=SIZE, convention="min", dtype_bytes=4).peak_bytes
    x = torch.randn(1, *SIZE, generator=torch.Generator().manual_seed(1))
    streamed = PatchBasedModel(calibrated, SIZE)
    peak = measure_peak(streamed, x).peak_bytes
    with torch.no_grad():
        eager = measure_peak(calibrated, x).peak_bytes
    assert min_bytes == 747264  # 729.75 KiB, features.0.0 .. features.2 row by row
    # the first 3 blocks run in bands of 2 of their 56 output rows, features.1 and .2 as fused steps
    # (661 KiB measured); features.3 then holds its input and output (588 KiB) and one group of its
    # expanded channels
    assert streamed.split_blocks == 3 and streamed.patch == (2, 56)
    blocks = next(m for m in streamed.modules() if isinstance(m, PatchedBlocks)).blocks
    assert [block.fused is not None for block in blocks] == [False, True, True]
    assert peak <= 1.3 * min_bytes < eager / 10  # eager: 10.0 MiB, the 112x112 maps whole


def test_extra_macs_against_recompute_cost(mobilenetv2):
    report = recompute_cost(mobilenetv2, 300 * 1024, SIZE)
    assert report.activation == "features.3 output 56x56x24"  # the output of the first 4 blocks
    voxels = PatchBasedModel(mobilenetv2, SIZE, split_blocks=4, patch=(1, 1))
    bands = stream(mobilenetv2, SIZE, split_blocks=4)
    assert voxels.base_macs == bands.base_macs == report.base_macs  # convolutions and the classifier
    # 1x1 patches are E.3's schedule, each voxel of features.3's output rebuilt from its receptive field;
    # E.3 counts border patches whole, the executor clips them to the maps: a little less (0.97x)
    assert 0.9 * report.extra_macs <= voxels.extra_macs <= report.extra_macs
    # full-width bands recompute only the halo rows that neighbouring bands share: ~0.2x E.3's
    assert 0 < bands.extra_macs < report.extra_macs / 4


class _MaxPoolAfterStem(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(Conv2dNormActivation(3, 8, stride=2), nn.MaxPool2d(2), Conv2dNormActivation(8, 8))


class _FunctionalBetweenBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = Conv2dNormActivation(3, 8), Conv2dNormActivation(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) * 2)


def test_bad_input_is_refused(mobilenetv2):
    for split_blocks in (0, 20):
        with pytest.raises(InvalidArgumentError, match=r"starts with 19 of them, then global_pool"):
            stream(mobilenetv2, SIZE, split_blocks=split_blocks)
    with pytest.raises(InvalidArgumentError, match=r"starts with 1 of them, then 1 \(a MaxPool2d"):
        stream(randomize_(_MaxPoolAfterStem()), (3, 32, 32), split_blocks=2)
    with pytest.raises(InvalidArgumentError, match="not a plain chain"):
        stream(randomize_(_FunctionalBetweenBlocks()), (3, 32, 32), split_blocks=2)
    with pytest.raises(InvalidArgumentError, match="eval mode"):
        stream(leanvision.create_model("mobilenetv2_100").train(), SIZE, split_blocks=2)
    with pytest.raises(InvalidArgumentError, match="patch must be"):
        PatchBasedModel(mobilenetv2, SIZE, split_blocks=2, patch=(0, 4))
    with pytest.raises(InvalidArgumentError, match="budget_bytes"):
        PatchBasedModel(mobilenetv2, SIZE, split_blocks=2, budget_bytes=0)
    streamed = stream(mobilenetv2, (3, 64, 64), split_blocks=2)
    with pytest.raises(InvalidArgumentError, match="inference only"):
        streamed.train()(torch.randn(1, 3, 64, 64))
