"""Streaming RNNPool-Face-Quant, whose first head reads the stem map: the stem, the RNNPool and that head
run patch row by patch row (BandedHead), and the streamed detector equals the eager one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import leanvision
from conftest import randomize_
from leanvision.analysis.measured import measure_peak
from leanvision.deploy.lean_blocks import _Rows
from leanvision.deploy.rewrite import module_calls
from leanvision.deploy.row_runs import PoolIntoBlocks
from leanvision.deploy.streamed_rnnpool import BandedHead, HeadOutputs
from leanvision.deploy.streaming import _head_on_prefix, _heads_beside, stream
from leanvision.errors import InvalidArgumentError
from leanvision.layers import RNNPoolLayer
from leanvision.models.face.nets import DetectionHead


def _close(streamed: torch.Tensor, eager: torch.Tensor) -> None:
    """max |streamed - eager| <= 1e-5 relative to the largest output."""
    assert streamed.shape == eager.shape
    assert (streamed - eager).abs().max() <= 1e-5 * eager.abs().max()


@pytest.mark.parametrize(
    "head",
    [
        dict(l2norm=10.0, head_width=8, background_maxout=3),  # Quant's first head: strided ConvBNReLU6 first
        dict(kernel_size=5, l2norm=8.0),  # Face-C's: one 5x5 conv per branch
    ],
)
@pytest.mark.parametrize("bands", [(1,), (3, 1, 4), (7,)])  # rows fed at a time, cycled; overlapping
@pytest.mark.parametrize("step_rows", [1, 5])  # the head computes once this many new rows are held
def test_banded_head_equals_the_head(head, bands, step_rows):
    head = randomize_(DetectionHead(4, **head))
    x = torch.randn(1, 4, 23, 19, generator=torch.Generator().manual_seed(len(bands)))
    with torch.no_grad():
        run, start, step = BandedHead(head, step_rows).start(x, 23, 19), 0, 0
        while start < 23:
            stop = min(start + bands[step % len(bands)], 23)
            overlap = max(start - step % 2, 0)  # every other band repeats a row fed before
            run.feed(_Rows(x[:, :, overlap:stop], overlap, 23))
            start, step = stop, step + 1
        for got, expected in zip(run.outputs, head(x)):
            _close(got, expected)
    with pytest.raises(AssertionError, match="skipped"):
        BandedHead(head).start(x, 23, 19).feed(_Rows(x[:, :, 2:], 2, 23))
    with pytest.raises(InvalidArgumentError, match="step_rows must be >= 1"):
        BandedHead(head, step_rows=0)


def test_a_head_fused_for_inference_is_refused():
    """fuse_for_inference_ merges the branches and folds the L2Norm's scales: BandedHead reads the head
    as built, and says so."""
    head = randomize_(DetectionHead(4, kernel_size=5, l2norm=8.0))
    head.fuse_for_inference_()
    assert head.merged is not None
    with pytest.raises(InvalidArgumentError, match="before fuse_for_inference"):
        BandedHead(head)


def _banded_outputs(banded: BandedHead, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    run = banded.start(x, *x.shape[2:])
    run.feed(_Rows(x, 0, x.shape[2]))
    return run.outputs


def test_a_banded_heads_branches_run_as_one_chain_where_they_stack():
    """Quant's first head: loc and conf each a strided ConvBNReLU6 then a conv, stacked level by level
    into one chain (the L2Norm's scales folded into the first convs); where the branches differ (here
    their activations) they run as two chains. Both equal the head."""
    head = randomize_(DetectionHead(4, l2norm=10.0, head_width=8, background_maxout=3))
    x = torch.randn(1, 4, 23, 19, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stacked = BandedHead(head, step_rows=4)
        assert len(stacked.branches) == 1 and stacked.l2norm.weight is None and head.l2norm.weight is not None
        for got, expected in zip(_banded_outputs(stacked, x), head(x)):
            _close(got, expected)
        head.conf[0][2] = nn.ReLU()
        apart = BandedHead(head, step_rows=4)
        assert len(apart.branches) == 2
        for got, expected in zip(_banded_outputs(apart, x), head(x)):
            _close(got, expected)


def test_the_plan_counts_the_head_outputs_a_detector_holds():
    """Quant keeps its first head's loc and conf (450 KiB) from the pool's loop on and each later head's
    from its call on: the budget of every plan then sits at its second head's peak (input, L2Norm copy,
    outputs), and the plan of least budget feeding fewest blocks feeds the first block only."""
    model = leanvision.create_model("rnnpool_face_quant").eval()
    calls, _, _ = module_calls(model, torch.randn(1, 3, 480, 640))
    first = next(i for i, call in enumerate(calls) if isinstance(call.module, RNNPoolLayer))
    head = _head_on_prefix(calls, first)
    beside = _heads_beside(calls, first, head)
    assert head.outputs_bytes == 6 * 120 * 160 * 4
    assert beside["features.0"] == beside["heads.1"] == 6 * 120 * 160 * 4
    assert beside["features.4"] == 6 * (120 * 160 + 60 * 80) * 4


def test_streamed_quant_makes_no_stem_map():
    """The stem layers and the first head are Identity / HeadOutputs in the rebuilt network: the stem map is
    never made (equality with eager: test_streaming.py::test_streamed_detector_equals_eager)."""
    streamed = stream(randomize_(leanvision.create_model("rnnpool_face_quant")), (3, 96, 128))
    assert isinstance(streamed.net.heads[0], HeadOutputs)
    stem_layers = [m for m in streamed.net.stem.modules() if not list(m.children())]
    assert all(isinstance(m, nn.Identity) for m in (streamed.net.normalize, *stem_layers))


def test_streamed_quant_never_holds_a_stem_resolution_map():
    """At 640x480 the stem map is 1.17 MiB, the pooled map 600 KiB and the first head's stride-4 maps
    600 KiB each: the streamed stem + RNNPool + first head + the first block after the pool (fed the
    pool's rows, PoolIntoBlocks) hold their outputs (the block's, 300 KiB; loc and conf, 450 KiB) and a
    chunk of stem rows' work (the stem rows, the head's rows, the block's held rows): within 1.3x the
    layer convention's 900 KiB, which counts none of the detector's outputs. The next three blocks run in
    channel groups within the peak the second head reaches anyway (its input, its L2Norm's copy, its
    outputs and the first head's: 1162.5 KiB); with random weights NMS then decodes 5000 candidates,
    about as much."""
    model = randomize_(leanvision.create_model("rnnpool_face_quant"))
    x = torch.rand(1, 3, 480, 640, generator=torch.Generator().manual_seed(0))
    streamed = stream(model, (3, 480, 640))
    assert isinstance(streamed.net.rnnpool, PoolIntoBlocks) and len(streamed.net.rnnpool.blocks) == 1
    fed_and_head = (16 * 60 * 80 + 6 * 120 * 160) * 4
    with torch.no_grad():
        pool = measure_peak(streamed.net.rnnpool, x)
        whole, eager = measure_peak(streamed, x), measure_peak(model, x)
    assert pool.peak_bytes <= 1.3 * 900 * 1024 < fed_and_head + 450 * 1024
    assert max(t.nbytes for t in pool.live_at_peak) == 16 * 60 * 80 * 4  # the pooled map is never whole
    assert whole.peak_bytes <= 1.3 * 900 * 1024 and whole.peak_bytes < eager.peak_bytes / 7


class _StemReadAfterPool(nn.Module):
    """A conv, an RNNPoolLayer on its map, and a second conv reading that map again after the pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = RNNPoolLayer(8, 4, 4, patch_size=4, stride=2)
        self.side = nn.Conv2d(8, 2, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = self.conv(x)
        pooled = self.pool(stem)
        return pooled.mean((1, 2, 3)) + self.side(stem).mean((1, 2, 3))


def test_a_prefix_map_read_after_the_pool_by_other_than_a_detection_head_is_refused():
    with pytest.raises(InvalidArgumentError, match="read again after it"):
        stream(randomize_(_StemReadAfterPool()).eval(), (3, 16, 16))
