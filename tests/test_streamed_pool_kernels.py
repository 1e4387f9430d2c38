"""The streaming pool's fused kernel (PatchRowPool): the same numbers as the cells' sweep_indexed, the slow
reference path, and StreamedRNNPool's groups hold exactly what group_bytes says."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import randomize_
from leanvision.analysis.measured import measure_peak
from leanvision.deploy.streamed_rnnpool import StreamedRNNPool, patches_per_group
from leanvision.layers import RNNPoolLayer, rnn_cells
from leanvision.layers.rnnpool import PatchRowPool

pytest.importorskip("numba")

# (C, h1, h2, patch, stride, patches): square and rectangular patches (one RNN1 sweep, or rows and columns
# apart), stride below, at and above the patch, one patch and more sequences than a block
GEOMETRIES = [
    (8, 6, 5, (4, 4), (2, 2), 9),
    (3, 4, 6, (5, 4), (3, 2), 7),
    (4, 5, 3, (3, 5), (3, 6), 4),
    (32, 16, 16, (6, 6), (4, 4), 1),
    (16, 8, 8, (6, 6), (4, 4), 27),
]


def _reference(layer: RNNPoolLayer, region: torch.Tensor, patches: int) -> torch.Tensor:
    """The pooled [4 h2, n] of a padded region through StreamedRNNPool's reference path (sweep_indexed)."""
    out = region.new_empty(layer.out_channels, patches)
    StreamedRNNPool([], layer, patches)._pool_patches(region, out)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels, h1, h2, patch, stride, patches", GEOMETRIES)
def test_the_kernel_computes_the_reference_sweeps(channels, h1, h2, patch, stride, patches, dtype):
    """Bit for bit the numba sweep_indexed (the same step) where the kernel reads the region itself; to
    rounding where it reads RNN1's W x (C > h1: one GEMM, then U h per step) and for the torch steps."""
    layer = randomize_(RNNPoolLayer(channels, h1, h2, patch, stride)).to(dtype)
    width = (patches - 1) * stride[1] + patch[1]
    region = torch.randn(1, channels, patch[0], width, generator=torch.Generator().manual_seed(3)).to(dtype)
    out = torch.full((layer.out_channels, patches + 2), float("nan"), dtype=dtype)
    with torch.no_grad():
        kernel = PatchRowPool(layer)
        kernel.start()
        inputs = kernel.inputs(region)
        assert inputs.shape[1] == min(channels, h1)
        kernel(inputs, out[:, 1:-1])  # a strided view, as a row of the pool's output
        if channels <= h1:
            assert torch.equal(out[:, 1:-1], _reference(layer, region, patches))
        else:
            torch.testing.assert_close(out[:, 1:-1], _reference(layer, region, patches))
        assert out[:, [0, -1]].isnan().all()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(rnn_cells, "_numba_kernels", lambda: None)
            torch.testing.assert_close(out[:, 1:-1], _reference(layer, region, patches))


@pytest.mark.parametrize("top, left, rows, cols", [(1, 0, 3, 12), (0, 2, 4, 10), (2, 1, 2, 9), (0, 0, 4, 11)])
def test_the_kernel_reads_the_zero_padding_around_a_region(top, left, rows, cols):
    """A region that holds the rows from `top` and the columns from `left` on, the rest zeros."""
    layer = randomize_(RNNPoolLayer(3, 4, 5, 4, 2))
    patches = 5
    padded = torch.zeros(1, 3, 4, (patches - 1) * 2 + 4)
    inner = torch.randn(1, 3, rows, cols)
    padded[:, :, top : top + rows, left : left + cols] = inner
    out = torch.empty(layer.out_channels, patches)
    with torch.no_grad():
        kernel = PatchRowPool(layer)
        kernel.start()
        kernel(kernel.inputs(inner), out, top, left)
        assert torch.equal(out, _reference(layer, padded, patches))


@pytest.mark.parametrize("padding", ["edgeml", "same"])
def test_the_streamed_pool_equals_its_reference_path(monkeypatch, padding):
    prefix = [nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU()]
    layer = randomize_(RNNPoolLayer(8, 6, 5, patch_size=(5, 4), stride=(3, 2), padding=padding))
    x = torch.randn(1, 3, 41, 50, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        streamed = StreamedRNNPool(prefix, layer, patches_per_group=4)
        fused = streamed(x)  # on RNN1's W x (C = 8 > h1 = 6): the same sums in another order
        monkeypatch.setattr(PatchRowPool, "applies", staticmethod(lambda layer, x: False))
        torch.testing.assert_close(fused, streamed(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("patches", [2, 7, 15])
def test_a_group_holds_exactly_its_group_bytes(patches):
    """A group away from the map's edges holds the group_bytes bound itself (the kernel's scratch
    included): its region, RNN1's summaries and the threads' blocks."""
    prefix = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6()]
    layer = randomize_(RNNPoolLayer(8, 6, 5, patch_size=(4, 4), stride=(2, 2), padding="valid"))
    x = torch.randn(1, 3, 20, 2 * 2 * patches + 2, generator=torch.Generator().manual_seed(patches))
    streamed = StreamedRNNPool(prefix, layer, patches_per_group=patches)
    streamed.regroup(patches, x)
    with torch.no_grad():
        out_bytes = streamed(x).numel() * 4
        assert measure_peak(streamed, x).peak_bytes == out_bytes + streamed.group_bytes(patches)


@pytest.mark.parametrize(
    "patch, stride, padding",
    [
        ((6, 6), (4, 4), "edgeml"),  # two patch rows share rows: their columns advance in one band
        ((5, 4), (2, 3), "same"),  # three share rows; rectangular; zero rows at the top and bottom
        ((3, 5), (4, 2), "valid"),  # rows between the patch rows that no patch reads
    ],
)
def test_whole_patch_rows_in_bands_equal_the_regions(patch, stride, padding):
    """A whole-row group whose stem rows run in bands, each computed once (RNN1's states kept between
    them), computes what the same group computes from each patch row's recomputed region, bit for bit
    (h1 = C: the kernel reads the region itself, not W x, whose GEMMs round by their shapes), whether the
    stem rows are made a band at a time or in longer chunks that bands read until they pass them (a
    chunk that a band runs past is made again from that band's first row)."""
    prefix = [nn.Conv2d(3, 8, 3, stride=1, padding=1), nn.ReLU6()]
    layer = randomize_(RNNPoolLayer(8, 8, 5, patch_size=patch, stride=stride, padding=padding))
    x = torch.randn(1, 3, 37, 45, generator=torch.Generator().manual_seed(2))
    streamed = StreamedRNNPool(prefix, layer, patches_per_group=100)
    with torch.no_grad():
        regions = streamed(x)
        for rows in range(1, min(patch[0], stride[0]) + 1):
            for chunk in (rows, 3 * rows, 2 * patch[0] + 1):
                streamed.banded = 100, rows, chunk
                assert torch.equal(streamed(x), regions)


@pytest.mark.parametrize("stride", [2, 3])
@pytest.mark.parametrize("bands_a_chunk", [1, 2])
def test_a_banded_row_holds_exactly_its_group_bytes(stride, bands_a_chunk):
    """patches_per_group picks whole rows in bands where they fit, in the tallest chunks of stem rows that
    fit; a band then holds what group_bytes says: RNN1's states, its chunk's rows (as the kernel reads
    them) and the kernel's scratch."""
    prefix = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6()]
    layer = randomize_(RNNPoolLayer(8, 6, 5, patch_size=(4, 4), stride=(stride, 2), padding="valid"))
    x = torch.randn(1, 3, 20, 31, generator=torch.Generator().manual_seed(stride))  # 14 patches a row
    streamed = StreamedRNNPool(prefix, layer, patches_per_group=1)
    banded = 14, stride, stride * bands_a_chunk
    streamed.banded = banded
    budget = streamed.group_bytes(14)
    assert patches_per_group(streamed, 14, budget) == 14 and streamed.banded == banded
    streamed.regroup(14, x)
    with torch.no_grad():
        out_bytes = streamed(x).numel() * 4
        assert measure_peak(streamed, x).peak_bytes == out_bytes + streamed.group_bytes(14)
    assert patches_per_group(streamed, 14, budget // 4) < 14 and streamed.banded is None


@pytest.mark.parametrize("stem_rows", [1, 2])
def test_a_band_of_chunked_stem_rows_equals_the_whole_band_in_its_group_bytes(stem_rows):
    """Where the kernel reads W x (C = 8 > h1 = 6), a band's stem rows may run in chunks, each chunk's W x
    written into the band's: the same output (to rounding: GEMMs of other shapes), holding what
    group_bytes says, less than the whole band does."""
    prefix = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6()]
    layer = randomize_(RNNPoolLayer(8, 6, 5, patch_size=(4, 4), stride=(4, 2), padding="valid"))
    x = torch.randn(1, 3, 20, 31, generator=torch.Generator().manual_seed(stem_rows))  # 14 patches a row
    streamed = StreamedRNNPool(prefix, layer, patches_per_group=14)
    streamed.banded = 14, 4, 4
    streamed.regroup(14, x)
    whole_bytes = streamed.group_bytes(14)
    with torch.no_grad():
        whole = streamed(x)
        streamed.banded = 14, 4, stem_rows
        streamed.regroup(14, x)
        torch.testing.assert_close(streamed(x), whole, rtol=1e-6, atol=1e-6)
        assert measure_peak(streamed, x).peak_bytes == whole.numel() * 4 + streamed.group_bytes(14)
    assert streamed.group_bytes(14) < whole_bytes
