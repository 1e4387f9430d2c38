"""Row runs: maps computed as their input rows arrive equal the layers computed on whole maps, however the
rows are cut, and ResNet18-RNNPool's pool feeds its layer3 row by row."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.efficientnet import MBConv, MBConvConfig
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock

import leanvision
from conftest import randomize_
from leanvision.analysis.measured import measure_peak
from leanvision.deploy.lean_blocks import ConvStep, InPlaceConv, NormalizedConv, _Rows, conv_zero_padded
from leanvision.deploy.row_runs import FUSED_STEP_ROWS, ChainRun, PoolIntoBlocks, ResidualRun, RowBlock
from leanvision.deploy.streamed_rnnpool import StreamedRNNPool
from leanvision.deploy.streaming import stream
from leanvision.layers import ImageNormalize, RNNPoolLayer


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def _fed_in_pieces(x: torch.Tensor, pieces: int) -> list[_Rows]:
    """The rows of x top to bottom, `pieces` rows at a time (the last piece what is left)."""
    return [_Rows(x[:, :, r : r + pieces], r, x.shape[2]) for r in range(0, x.shape[2], pieces)]


def _stitched(bands: list[_Rows]) -> torch.Tensor:
    """Bands of rows, which must follow each other from row 0, as one map."""
    assert [band.start for band in bands] == [0, *(b.start + b.tensor.shape[2] for b in bands[:-1])]
    return torch.cat([band.tensor for band in bands], 2)


@pytest.mark.parametrize("pieces", [1, 2, 5])
@pytest.mark.parametrize("max_rows", [None, 1, 3])
def test_a_chain_run_fed_rows_equals_the_chain(pieces, max_rows):
    g = torch.Generator().manual_seed(pieces)
    convs = [
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.Conv2d(6, 6, 3, padding=2, dilation=2),
        nn.Conv2d(6, 5, (4, 3), stride=(1, 2), padding=(1, 1)),
    ]
    for conv in convs:
        conv.weight.data = torch.randn(conv.weight.shape, generator=g) * 0.3
    layers = [InPlaceConv(ConvStep(conv, None, nn.ReLU())) for conv in convs]
    x = torch.randn(1, 4, 23, 9, generator=g)
    with torch.no_grad():
        expected = nn.Sequential(*layers)(x)
        run, bands, held = ChainRun(layers, x.shape[2]), [], None
        for rows in _fed_in_pieces(x, pieces):
            held = rows if held is None else _Rows(torch.cat([held.tensor, rows.tensor], 2), held.start, 23)
            while True:
                done = list(run.done)
                y = run.feed(held, max_rows)
                bands += [y] if y is not None else []
                if run.done == done:
                    break
            first = run.first_needed - held.start
            held = _Rows(held.tensor[:, :, max(first, 0) :], max(run.first_needed, held.start), 23)
        _close(_stitched(bands), expected)


def _basic_block(stride: int, seed: int) -> BasicBlock:
    down = None
    if stride > 1:
        down = nn.Sequential(nn.Conv2d(8, 12, 1, stride=stride, bias=False), nn.BatchNorm2d(12))
    return randomize_(BasicBlock(8, 12 if down else 8, stride=stride, downsample=down), seed=seed)


def _residual_blocks() -> list[nn.Module]:
    return [
        _basic_block(1, seed=1),
        _basic_block(2, seed=2),
        randomize_(InvertedResidual(8, 8, 1, expand_ratio=6), seed=3),  # shortcut
        randomize_(InvertedResidual(8, 12, 2, expand_ratio=2), seed=4),
        randomize_(InvertedResidual(8, 5, 1, expand_ratio=1), seed=5),  # no expansion
    ]


@pytest.mark.parametrize("index", range(len(_residual_blocks())))
@pytest.mark.parametrize("pieces, step", [(1, 1), (1, 2), (2, 3), (3, 1), (17, 2)])
@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("band_bytes", [None, 2048])
def test_a_residual_run_fed_rows_equals_the_block(index, pieces, step, kernel, band_bytes):
    """Inverted residuals run as one fused step (ChunkedBottleneck.rows), by the numba kernel or (kernel
    False) by its torch path, which pads the band's edge rows itself; with little band RAM, a step's
    expanded channels run in groups that fit it."""
    block = _residual_blocks()[index]
    x = torch.randn(1, 8, 17, 10, generator=torch.Generator().manual_seed(step))
    row_block = RowBlock.of(block, x.shape[3], band_bytes)
    assert (row_block.fused is not None) == isinstance(block, InvertedResidual)
    if row_block.fused is not None:
        groups = len(row_block.fused.chunks)
        assert groups > 1 if band_bytes and index in (2, 3) else groups == 1  # expanded 48 and 16 channels
        assert (
            band_bytes is None or groups == 1 or row_block.fused.rows_bytes(FUSED_STEP_ROWS, 10) <= band_bytes
        )
    if not kernel and row_block.fused is not None:
        row_block.fused.kernel_config = None
    with torch.no_grad():
        run = ResidualRun(row_block, x.shape[2], step)
        bands = [band for rows in _fed_in_pieces(x, pieces) for band in run.feed(rows)]
        assert max(band.tensor.shape[2] for band in bands) <= step  # the last rows no larger a band
        _close(_stitched(bands), block(x))
        with pytest.raises(AssertionError, match="row 0 of the map is next"):
            ResidualRun(RowBlock.of(block), 17, step).feed(_Rows(x[:, :, 1:], 1, 17))


def test_blocks_a_row_run_cannot_compute_are_refused():
    se = MBConv(MBConvConfig(6, 3, 1, 16, 16, 1), 0.0, nn.BatchNorm2d)  # its SE needs the whole map
    assert RowBlock.of(se) is None and RowBlock.of(nn.Conv2d(3, 3, 1)) is None


def test_pool_into_blocks_equals_the_pool_and_the_blocks():
    prefix = [nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU()]
    pool = randomize_(RNNPoolLayer(8, 4, 2, patch_size=(4, 4), stride=(2, 2)), seed=1)
    blocks = [_basic_block(2, seed=2), randomize_(BasicBlock(12, 12), seed=3)]
    x = torch.randn(2, 3, 41, 38, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = nn.Sequential(*prefix, pool, *blocks)(x)
        fused = PoolIntoBlocks(StreamedRNNPool(prefix, pool, 3), [RowBlock.of(b) for b in blocks])
        _close(fused(x), expected)


def test_resnet18_rnnpool_feeds_its_pool_rows_to_layer3_0():
    """The pool's output (128x28x28, the layer convention's whole figure) is never whole: its rows feed
    layer3.0, which leaves the RAM to pool whole patch rows in bands (each stem row computed once; fed
    layer3.1 too, the pool would have room for groups of a few patches only). The largest tensor alive
    at the streamed peak is a 256x14x14 map."""
    model = leanvision.create_model("resnet18_rnnpool").eval()
    streamed = stream(model, (3, 224, 224))
    fused = [m for m in streamed.modules() if isinstance(m, PoolIntoBlocks)]
    assert len(fused) == 1 and len(fused[0].blocks) == 1 and fused[0].pool.banded is not None
    measured = measure_peak(streamed, torch.randn(1, 3, 224, 224))
    assert max(t.nbytes for t in measured.live_at_peak) == 256 * 14 * 14 * 4


@pytest.mark.parametrize("kernel, stride, dilation", [(1, 1, 1), (3, 1, 1), (3, 2, 1), (4, 3, 2), (3, 2, 2)])
def test_a_conv_zero_padded_by_its_own_padding_equals_one_of_a_padded_copy(kernel, stride, dilation):
    layer = InPlaceConv(ConvStep(nn.Conv2d(3, 4, kernel, stride=stride, dilation=dilation), None, nn.ReLU()))
    x = torch.randn(1, 3, 11, 12, generator=torch.Generator().manual_seed(kernel))
    with torch.no_grad():
        for pads in itertools.product((0, 1, 2), repeat=4):
            _close(conv_zero_padded(layer, x, pads), layer(F.pad(x, pads), padding=(0, 0)))


@pytest.mark.parametrize("kernel, stride, dilation", [(1, 1, 1), (3, 1, 1), (3, 2, 1), (4, 3, 2)])
def test_a_normalized_conv_of_the_raw_image_equals_the_conv_of_the_normalised_image(kernel, stride, dilation):
    """For every padding pattern (each even and uneven one, which pads a copy with the mean) and twice
    (the second from the constant maps kept per shape): the layers the NormalizedConv stands for, run on
    a zero-padded normalised copy."""
    torch.manual_seed(kernel)
    conv, bn = nn.Conv2d(3, 4, kernel, stride=stride, dilation=dilation, bias=False), nn.BatchNorm2d(4)
    randomize_(bn)
    normalize = ImageNormalize((0.48, 0.46, 0.41), (0.004, 0.25, 1.5))
    reference = nn.Sequential(conv, bn, nn.ReLU6()).eval()
    fused = NormalizedConv(normalize, ConvStep(conv, bn.eval(), nn.ReLU6()))
    x = torch.rand(1, 3, 11, 12)
    with torch.no_grad():
        for _ in range(2):
            for pads in itertools.product((0, 1, 2), repeat=4):
                _close(conv_zero_padded(fused, x, pads), reference(F.pad(normalize(x), pads)))
