"""Streaming inference: StreamedRNNPool and ChunkedBottleneck equal the layers they replace, a StreamedModel
equals the eager model, and the streamed MobileNetV2-RNNPool really runs in the layer convention's RAM."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual

import leanvision
from conftest import randomize_
from leanvision.analysis.measured import measure_peak
from leanvision.analysis.memory import peak_memory
from leanvision.bench import calibrate_batchnorm
from leanvision.deploy.fusion import lean_chain
from leanvision.deploy.lean_blocks import (
    ChunkedBottleneck,
    banded_inception,
    bottleneck_parts,
    chunked_bottleneck,
    lean_module,
)
from leanvision.deploy.rewrite import Chain, raw_forward
from leanvision.deploy.streamed_rnnpool import StreamedRNNPool
from leanvision.deploy.streaming import stream
from leanvision.errors import InvalidArgumentError
from leanvision.layers import LinearBottleneck, RNNPoolLayer
from leanvision.models.mobilenet import DepthwiseSeparable


def _close(streamed: torch.Tensor, eager: torch.Tensor) -> None:
    """max |streamed - eager| <= 1e-5 relative to the largest output."""
    assert streamed.shape == eager.shape
    assert (streamed - eager).abs().max() <= 1e-5 * eager.abs().max()


@pytest.mark.parametrize("padding", ["edgeml", "valid", "same"])
@pytest.mark.parametrize("size, group", [((37, 45), 1), ((40, 33), 3), ((29, 64), 100)])
def test_streamed_rnnpool_equals_the_prefix_and_the_layer(padding, size, group):
    g = torch.Generator().manual_seed(size[0] + group)
    prefix = [
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4),
        nn.SiLU(),
    ]
    pool = randomize_(RNNPoolLayer(8, 6, 5, patch_size=(5, 4), stride=(3, 2), padding=padding))
    for conv in prefix[::2]:
        conv.weight.data = torch.randn(conv.weight.shape, generator=g) * 0.3
    x = torch.randn(2, 3, *size, generator=g)
    with torch.no_grad():
        eager = pool(nn.Sequential(*prefix)(x))
        streamed = StreamedRNNPool(prefix, pool, patches_per_group=group)
        _close(streamed(x), eager)
        streamed.regroup(group + 1, x[:1])
        _close(streamed(x), eager)
    with pytest.raises(InvalidArgumentError, match="patches_per_group must be >= 1"):
        streamed.regroup(0, x)


def _blocks() -> list[nn.Module]:
    return [
        InvertedResidual(16, 16, 1, expand_ratio=6),  # shortcut
        InvertedResidual(16, 24, 2, expand_ratio=6),
        InvertedResidual(16, 8, 1, expand_ratio=1),  # no expansion
        LinearBottleneck(16, 27, 1, expansion=6),  # ReXNet's partial shortcut
        LinearBottleneck(16, 16, 2, expansion=1),
        DepthwiseSeparable(16, 32, 2, dw_act=nn.ReLU, pw_act=nn.SiLU),
    ]


@pytest.mark.parametrize("index", range(len(_blocks())))
@pytest.mark.parametrize("band_bytes", [1, 3000, 10**6])  # one channel per group, some, all
def test_chunked_bottleneck_equals_the_block(index, band_bytes):
    block = randomize_(_blocks()[index], seed=index)
    x = torch.randn(2, 16, 13, 11, generator=torch.Generator().manual_seed(index))
    with torch.no_grad():
        _close(chunked_bottleneck(block, (13, 11), band_bytes)(x), block(x))


STREAMED = [
    ("mobilenetv2_rnnpool", (3, 224, 224)),
    ("mobilenetv2_rnnpool", (3, 130, 197)),  # rectangular, sizes that no stride divides
    ("mobilenetv2_035_vww_rnnpool", (3, 96, 160)),
    ("mobilenetv1_rnnpool", (3, 101, 96)),
    ("rexnet_100_lowres_rnnpool", (3, 32, 32)),
    ("googlenet_rnnpool", (3, 97, 112)),  # BasicConv2d's functional ReLU, spelled out as a layer
    ("resnet18_rnnpool", (3, 72, 80)),
    ("densenet121_rnnpool", (3, 64, 72)),  # dense blocks written into one output (StreamedDenseBlock)
]


@pytest.mark.parametrize("name, size", STREAMED)
def test_streamed_model_equals_eager(name, size):
    model = randomize_(leanvision.create_model(name))
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _close(stream(model, size)(x), model(x))


@pytest.mark.parametrize("name, size", STREAMED[::2])
def test_streamed_model_is_as_exact_as_eager_with_calibrated_batchnorm(name, size):
    """With BN statistics of real activations, fp32 itself is ~1e-4 off (means large against deviations):
    then no reordering of a sum stays within 1e-5 of eager, and the reference is the float64 model. Eager
    runs image by image, as the streamed model does (oneDNN rounds a batch's convolutions differently:
    resnet18_rnnpool's eager error is 6.8e-6 at batch 2, 1.4e-5 image by image, the streamed 1.4e-5)."""
    torch.manual_seed(0)
    model = calibrate_batchnorm(leanvision.create_model(name), size)
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
        eager = torch.cat([model(image[None]) for image in x]).double()
        streamed = stream(model, size)(x).double()
    assert (streamed - exact).abs().max() <= 1.5 * (eager - exact).abs().max() + 1e-7 * exact.abs().max()


def test_streamed_mobilenetv2_rnnpool_runs_in_the_layer_conventions_ram():
    model = calibrate_batchnorm(leanvision.create_model("mobilenetv2_rnnpool"))
    layer = peak_memory(model, input_size=(3, 224, 224), convention="layer", dtype_bytes=4).peak_bytes
    x = torch.randn(1, 3, 224, 224)
    streamed = measure_peak(stream(model, (3, 224, 224)), x)
    with torch.no_grad():
        eager = measure_peak(model, x)
    assert layer == 28 * 28 * 64 * 4 + 14 * 14 * 64 * 4  # paper Table 1: 0.24 MB
    # eager holds full-resolution stem maps: 3.2-6.4 MB measured (the numba sweeps' own scratch not counted)
    assert streamed.peak_bytes <= 1.3 * layer < eager.peak_bytes / 8


def test_bad_input_is_refused():
    model = leanvision.create_model("mobilenetv2_035_vww_rnnpool")
    with pytest.raises(InvalidArgumentError, match="eval mode"):
        stream(model.train(), (3, 96, 96))
    model.eval()
    with pytest.raises(InvalidArgumentError, match="no RNNPoolLayer"):
        stream(leanvision.create_model("mobilenetv2_035_vww").eval(), (3, 96, 96))
    with pytest.raises(InvalidArgumentError, match="band_bytes"):
        stream(model, (3, 96, 96), band_bytes=0)
    with pytest.raises(InvalidArgumentError, match="input_size"):
        stream(model, (96, 96))
    with pytest.raises(InvalidArgumentError, match="must be >= 32"):
        stream(model, (3, 8, 8))  # the patches would not fit the stem's 4x4 map
    streamed = stream(model, (3, 96, 96))
    with pytest.raises(InvalidArgumentError, match="inference only"):
        streamed.train()(torch.randn(1, 3, 96, 96))


def _se_blocks() -> list[nn.Module]:
    from torchvision.models.efficientnet import MBConv, MBConvConfig
    from torchvision.models.resnet import BasicBlock, conv1x1

    return [
        MBConv(MBConvConfig(6, 3, 1, 16, 16, 1), 0.0, nn.BatchNorm2d),  # SE, shortcut
        MBConv(MBConvConfig(1, 5, 2, 16, 24, 1), 0.0, nn.BatchNorm2d),  # SE, no expansion
        LinearBottleneck(16, 20, 1, expansion=6, se_channels=8),
        BasicBlock(16, 16),
        BasicBlock(16, 32, 2, downsample=nn.Sequential(conv1x1(16, 32, 2), nn.BatchNorm2d(32))),
    ]


@pytest.mark.parametrize("index", range(len(_se_blocks())))
@pytest.mark.parametrize("band_bytes", [1, 3000, 10**6])
def test_squeeze_excite_and_basic_blocks_stream_exactly(index, band_bytes):
    block = randomize_(_se_blocks()[index], seed=index)
    x = torch.randn(2, 16, 13, 11, generator=torch.Generator().manual_seed(index))
    lean = lean_module(block, x.shape, band_bytes)
    assert lean is not None and type(lean).__name__ in ("ChunkedBottleneck", "BandedBasicBlock")
    with torch.no_grad():
        _close(lean(x), block(x))


@pytest.mark.parametrize("index", range(3))  # the blocks with a squeeze-excite
@pytest.mark.parametrize("group, mean_group", [(1, 5), (7, 3), (5, 1000), (1000, 1)])
def test_the_squeeze_excites_first_pass_may_run_in_other_groups(index, group, mean_group):
    block = randomize_(_se_blocks()[index], seed=index)
    x = torch.randn(2, 16, 13, 11, generator=torch.Generator().manual_seed(index))
    lean = ChunkedBottleneck(**bottleneck_parts(block), group=group, mean_group=mean_group)
    with torch.no_grad():
        _close(lean(x), block(x))


@pytest.mark.parametrize("index", range(len(_blocks()) + 3))
@pytest.mark.parametrize("band_bytes", [1, 3000, 20000])
def test_a_chunked_bottleneck_holds_its_output_and_group_bytes(index, band_bytes):
    """group_bytes is what the block holds beside its input and output (measured, the input not counted):
    the streaming budget counts it as the peak the other executors may fill."""
    block = randomize_([*_blocks(), *_se_blocks()[:3]][index], seed=index)
    x = torch.randn(1, 16, 13, 11, generator=torch.Generator().manual_seed(index))
    lean = chunked_bottleneck(block, (13, 11), band_bytes)
    with torch.no_grad():
        out_bytes = lean(x).numel() * 4
        assert measure_peak(lean, x).peak_bytes == out_bytes + lean.group_bytes(13, 11)


@pytest.mark.parametrize("patches", [1, 3, 8, 19])
def test_a_streamed_rnnpool_holds_at_most_its_output_and_group_bytes(patches):
    """group_bytes bounds what a patch group holds (the sweeps' scratch included), so groups fit budgets."""
    prefix = [nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU6()]
    pool = randomize_(RNNPoolLayer(8, 6, 5, patch_size=(4, 4), stride=(2, 2), padding="same"))
    x = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(patches))
    streamed = StreamedRNNPool(prefix, pool, patches_per_group=patches)
    streamed.regroup(patches, x)
    with torch.no_grad():
        out_bytes = streamed(x).numel() * 4
        peak = measure_peak(streamed, x).peak_bytes
    assert (
        out_bytes + 0.9 * streamed.group_bytes(patches) <= peak <= out_bytes + streamed.group_bytes(patches)
    )


class _FunctionalPrefix(nn.Module):
    """A conv whose ReLU is applied functionally, then an RNNPoolLayer: module hooks cannot see the ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = RNNPoolLayer(8, 4, 4, patch_size=4, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.conv(x)))


def test_a_prefix_that_is_not_a_chain_of_modules_is_refused():
    model = randomize_(_FunctionalPrefix()).eval()
    with pytest.raises(InvalidArgumentError, match="cannot be streamed"):
        stream(model, (3, 16, 16))


@pytest.mark.parametrize(
    "name, size",
    [
        ("rnnpool_face_c", (3, 96, 128)),
        ("rnnpool_face_m4", (1, 120, 160)),
        ("rnnpool_face_quant", (3, 480, 640)),  # VGA; its first head runs inside the pool (BandedHead)
        ("rnnpool_face_quant", (3, 243, 317)),  # rectangular, no stride divides it
    ],
)
def test_streamed_detector_equals_eager(name, size):
    """On the raw head outputs (NMS is discontinuous); the normalisation runs inside the patch groups."""
    model = randomize_(leanvision.create_model(name))
    images = torch.rand(1, *size, generator=torch.Generator().manual_seed(2))
    streamed = stream(model, size)
    assert isinstance(streamed.net.normalize, nn.Identity)
    with torch.no_grad():
        for got, expected in zip(raw_forward(streamed.net, images), raw_forward(model, images)):
            _close(got, expected)
        smaller = [images[0], images[0, :, : size[1] - 9, : size[2] - 13]]  # padded to one batch
        for got, expected in zip(streamed.net.head_outputs(streamed.net.batch_images(smaller)),
                                 model.head_outputs(model.batch_images(smaller))):  # fmt: skip
            _close(got, expected)
    assert [d["boxes"].shape[1] for d in streamed(torch.rand(2, *size))] == [4, 4]


def test_the_blocks_after_the_pool_run_in_its_call():
    """torchvision ResNet's forward holds each stage's input until the stage returns: chained into the
    pool's call, the RNNPool output is freed after the first block of layer3 instead of after layer3."""
    net = stream(leanvision.create_model("resnet18_rnnpool").eval(), (3, 72, 80)).net
    assert [type(m).__name__ for m in net.maxpool] == [
        "StreamedRNNPool",
        "Identity",
        "Identity",
        *["BandedBasicBlock"] * 4,
        "AdaptiveAvgPool2d",
    ]  # fmt: skip (layer1, layer2 are Identity in ResNet18-RNNPool; layer3, layer4 inlined)
    assert all(isinstance(getattr(net, name), nn.Identity) for name in ("layer3", "layer4", "avgpool"))


def _inception(in_channels: int = 16) -> nn.Module:
    from torchvision.models.googlenet import Inception

    return Inception(in_channels, 8, 6, 12, 4, 5, 7)


@pytest.mark.parametrize(
    "pool",
    [None, nn.MaxPool2d(2, 2, ceil_mode=True), nn.MaxPool2d(3, 2, ceil_mode=True), nn.MaxPool2d(3, 2, 1)],
)
@pytest.mark.parametrize("size", [(13, 11), (14, 14), (6, 9)])
@pytest.mark.parametrize("band_bytes", [1, 5000, 10**7])  # one row per band, some, all
def test_banded_inception_equals_the_block_and_its_pool(pool, size, band_bytes):
    """GoogLeNet's inception band by band into one output, then (fused) the max pool after it."""
    block = randomize_(_inception(), seed=size[0])
    x = torch.randn(2, 16, *size, generator=torch.Generator().manual_seed(size[1]))
    lean = banded_inception(block, x.shape, band_bytes, pool)
    assert lean is not None and (band_bytes > 1 or lean.rows_per_band == [1] * 4)
    with torch.no_grad():
        _close(lean(x), block(x) if pool is None else pool(block(x)))


@pytest.mark.parametrize("size", [(13, 11), (8, 15)])
@pytest.mark.parametrize("band_bytes", [1, 5000, 10**7])
def test_a_fused_chain_of_blocks_equals_the_blocks(size, band_bytes):
    """MobileNetV1-RNNPool's widening block, then a stride-2 one, as PatchedBlocks in bands of rows."""
    blocks = [
        randomize_(DepthwiseSeparable(8, 32, 1, dw_act=nn.ReLU, pw_act=nn.ReLU), seed=1),
        randomize_(DepthwiseSeparable(32, 16, 2, dw_act=nn.ReLU, pw_act=nn.ReLU), seed=2),
    ]
    x = torch.randn(2, 8, *size, generator=torch.Generator().manual_seed(3))
    lean = lean_chain(blocks, x.shape, band_bytes)
    assert type(lean).__name__ == "PatchedBlocks"
    with torch.no_grad():
        _close(lean(x), blocks[1](blocks[0](x)))
    assert lean_chain([blocks[0], nn.ReLU()], x.shape, band_bytes) is None


@pytest.mark.parametrize("size", [(14, 14), (13, 10), (7, 5)])
@pytest.mark.parametrize("band_bytes", [1, 3000, 10**7])  # one channel and row per band, some, all
def test_banded_transition_equals_the_transition(size, band_bytes):
    """DenseNet's transition with its average pool before the 1x1 conv, in row bands and channel groups."""
    from torchvision.models.densenet import _Transition

    transition = randomize_(_Transition(24, 12), seed=size[1])
    x = torch.randn(2, 24, *size, generator=torch.Generator().manual_seed(size[0]))
    lean = lean_module(transition, x.shape, band_bytes)
    assert type(lean).__name__ == "BandedTransition"
    with torch.no_grad():
        _close(lean(x), transition(x))


def test_a_chain_hands_a_dense_block_its_only_reference_to_its_input():
    """In a Chain the dense block frees its input once copied into its output; an nn.Sequential holds it."""
    from torchvision.models.densenet import _DenseBlock

    block = randomize_(_DenseBlock(4, 64, 2, 8, 0.0)).eval()
    widen = randomize_(nn.Conv2d(8, 64, 1), seed=1)
    x = torch.randn(1, 8, 12, 12)
    lean = lean_module(block, (1, 64, 12, 12), 1)
    with torch.no_grad():
        expected = block(widen(x))
        _close(Chain(widen, lean)(x), expected)
        chained, sequential = measure_peak(Chain(widen, lean), x), measure_peak(nn.Sequential(widen, lean), x)
    # the Chain's peak is the copy of the input into the output; its dense layers then run beside the output
    assert chained.peak_bytes == (64 + 64 + 2 * 16) * 12 * 12 * 4 < sequential.peak_bytes


LAYER_RATIO = [  # streamed peak / layer figure at the paper input size (224, ReXNet-lowres 32), measured
    ("mobilenetv1_rnnpool", (3, 224, 224), 1.05),  # the 256-channel 28x28 map fused away (PatchedBlocks)
    ("googlenet_rnnpool", (3, 224, 224), 1.25),  # inceptions in row bands, 4e fused with its max pool
    ("densenet121_rnnpool", (3, 224, 224), 1.25),  # dense block 3's input + output, when it copies one in
    ("rexnet_100_lowres_rnnpool", (3, 32, 32), 1.3),
    # the pool's rows fed to layer3 (PoolIntoBlocks; was 2.04: the pool's output beside layer3.0's); 1.25:
    # layer4.0's input + output + band
    ("resnet18_rnnpool", (3, 224, 224), 1.3),
]


@pytest.mark.parametrize("name, size, ratio", LAYER_RATIO)
def test_streamed_networks_run_within_1_3x_the_layer_conventions_ram(name, size, ratio):
    model = leanvision.create_model(name).eval()  # the bytes alive do not depend on the weights' values
    layer = peak_memory(model, input_size=size, convention="layer", dtype_bytes=4).peak_bytes
    streamed = measure_peak(stream(model, size), torch.randn(1, *size))
    assert streamed.peak_bytes <= ratio * layer
