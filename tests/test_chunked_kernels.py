"""ChunkedBottleneck's numba kernel (deploy/depthwise_kernels.py) against its torch path, the reference:
geometries, activations, dtypes, squeeze-excite passes; and where the kernel must not run."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops.misc import SqueezeExcitation

from leanvision.analysis.measured import measure_peak
from leanvision.deploy import depthwise_kernels
from leanvision.deploy.lean_blocks import ChunkedBottleneck, ConvStep
from leanvision.errors import InvalidArgumentError

ACTIVATIONS = [nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Sigmoid]
# kernel size, stride, padding, dilation
GEOMETRIES = [
    (3, 1, 1, 1),
    (3, 2, 1, 1),
    (5, 2, 2, 1),
    (5, 1, 2, 1),
    ((3, 5), (2, 1), (1, 2), 1),  # rectangular
    (3, 1, 2, 2),  # dilated
    (3, 2, 0, 1),  # no padding
    (2, 2, 0, 1),  # even kernel
    (7, 3, 1, 1),  # padding smaller than the kernel's reach
]


def _step(conv: nn.Conv2d, act: nn.Module, g: torch.Generator, dtype: torch.dtype) -> ConvStep:
    """conv -> BN -> act with values of unit scale, so that activations see both signs and ReLU6 clips."""
    bn = nn.BatchNorm2d(conv.out_channels).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / conv.weight[0].numel() ** 0.5)
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(bn.weight.shape, generator=g) * 3)
        bn.bias.copy_(torch.randn(bn.bias.shape, generator=g))
    return ConvStep(conv.to(dtype), bn.to(dtype), act)


def _bottleneck(
    expand: bool,
    geometry: tuple = (3, 1, 1, 1),
    acts: tuple[type[nn.Module], type[nn.Module]] = (nn.ReLU6, nn.ReLU6),
    se: bool = False,
    post_se_act: type[nn.Module] = nn.Identity,
    group: int = 3,
    mean_group: int | None = None,
    dtype: torch.dtype = torch.float32,
    channels: int = 10,
) -> ChunkedBottleneck:
    """A bottleneck of random weights, equal in float32 and float64 (the same draws)."""
    g = torch.Generator().manual_seed(channels + group)
    kernel, stride, padding, dilation = geometry
    hidden = 4 * channels if expand else channels
    dw = nn.Conv2d(hidden, hidden, kernel, stride, padding, dilation, groups=hidden)
    se_module = None
    if se:
        se_module = SqueezeExcitation(hidden, 4).eval()
        with torch.no_grad():
            for p in se_module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        se_module.to(dtype)
    return ChunkedBottleneck(
        expand=_step(nn.Conv2d(channels, hidden, 1), acts[0](), g, dtype) if expand else None,
        depthwise=_step(dw, acts[1](), g, dtype),
        project=_step(nn.Conv2d(hidden, 12, 1), nn.Identity(), g, dtype),
        shortcut="none",
        group=group,
        se=None if se_module is None else se_module._scale,
        post_se_act=post_se_act() if se else None,
        mean_group=mean_group,
    )


def _torch_path(lean: ChunkedBottleneck) -> ChunkedBottleneck:
    reference = copy.deepcopy(lean)
    reference.kernel_config = None
    return reference


def _input(channels: int = 10, dtype: torch.dtype = torch.float32, size: tuple[int, int] = (13, 11)):
    return torch.randn(2, channels, *size, generator=torch.Generator().manual_seed(3), dtype=dtype) * 2


def _assert_equal(x: torch.Tensor, *args, **kwargs) -> None:
    """The kernel runs in _bottleneck(*args, **kwargs) of x's dtype, and its result equals the torch
    path's up to rounding: in float32, it is about as close to the float64 torch path's as the float32
    torch path is (the rounding of large intermediates included)."""
    lean = _bottleneck(*args, **kwargs, dtype=x.dtype)
    assert lean.kernel_config is not None
    with torch.no_grad():
        out, reference = lean(x), _torch_path(lean)(x)
        exact = _torch_path(_bottleneck(*args, **kwargs, dtype=torch.float64))(x.double())
    assert out.dtype == reference.dtype == x.dtype
    if x.dtype == torch.float64:
        assert (out - exact).abs().max() <= 1e-13 * exact.abs().max()
    else:
        error, torch_error = ((y.double() - exact).abs().max() for y in (out, reference))
        assert error <= 2 * torch_error + 1e-7 * exact.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("expand", [True, False])
@pytest.mark.parametrize("index", range(len(GEOMETRIES)))
def test_the_kernel_equals_the_torch_path_for_each_geometry(index, expand, dtype):
    acts = (ACTIVATIONS[index % 6], ACTIVATIONS[(index + 2) % 6])
    _assert_equal(_input(dtype=dtype), expand, GEOMETRIES[index], acts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_the_kernel_equals_the_torch_path_for_each_activation(act, dtype):
    _assert_equal(_input(dtype=dtype), True, acts=(act, act))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("expand, post_se_act", [(True, nn.Identity), (True, nn.ReLU6), (False, nn.SiLU)])
@pytest.mark.parametrize("group, mean_group", [(3, None), (1, 7), (7, 2), (100, 1)])
def test_the_kernel_equals_the_torch_path_with_a_squeeze_excite(
    group, mean_group, expand, post_se_act, dtype
):
    """Its first pass writes the channel means, its second scales the maps and applies post_se_act."""
    _assert_equal(
        _input(dtype=dtype), expand, (3, 2, 1, 1), (nn.SiLU, nn.SiLU), True, post_se_act, group, mean_group
    )


@pytest.mark.parametrize("size", [(1, 1), (2, 9), (40, 3)])
def test_the_kernel_equals_the_torch_path_on_tiny_and_thin_maps(size):
    """Maps narrower than the kernel's reach: outputs whose every tap is padding."""
    _assert_equal(_input(size=size), True, (5, 2, 2, 1))


@pytest.mark.parametrize("acts", [(nn.SiLU, nn.Sigmoid), (nn.Hardswish, nn.ReLU6)])
def test_extreme_values_saturate_the_activations_as_torch_does(acts):
    """Inputs far beyond the exp's range (|x| >> 88) saturate SiLU and the sigmoid, and NaN stays NaN."""
    x = _input() * 100
    _assert_equal(x, True, acts=acts)
    lean = _bottleneck(True, acts=acts)
    x[0, :, 5, 5] = float("nan")
    with torch.no_grad():
        out, reference = lean(x), _torch_path(lean)(x)
    assert torch.equal(out.isnan(), reference.isnan()) and out[0].isnan().any()


def test_other_activations_take_the_torch_path():
    lean = _bottleneck(True, acts=(nn.ReLU6, nn.GELU))
    assert lean.kernel_config is None
    x = _input()
    with torch.no_grad():
        assert torch.equal(lean(x), _torch_path(lean)(x))


def test_a_post_se_act_without_an_se_is_refused():
    dw = ConvStep(nn.Conv2d(4, 4, 3, groups=4), None, nn.ReLU())
    project = ConvStep(nn.Conv2d(4, 4, 1), None, nn.Identity())
    with pytest.raises(InvalidArgumentError, match="post_se_act"):
        ChunkedBottleneck(None, dw, project, "none", group=2, post_se_act=nn.ReLU())


@pytest.fixture
def kernel_calls(monkeypatch) -> list[int]:
    """Counts the kernel's calls."""
    calls, kernel = [], depthwise_kernels.expand_depthwise

    def counted(*args):
        calls.append(1)
        return kernel(*args)

    monkeypatch.setattr(depthwise_kernels, "expand_depthwise", counted)
    return calls


def test_the_kernel_runs_under_the_peak_meter_but_not_under_a_flop_counter_or_autograd(kernel_calls):
    """The peak meter watches tensors (the kernel's outputs are torch allocations, so it sees them); a
    flop counter must see the convolution; autograd needs the torch ops."""
    lean = _bottleneck(True, group=4)
    x = _input()[:1]
    with torch.no_grad():
        reference = _torch_path(lean)(x)
        measure_peak(lean, x)
        assert len(kernel_calls) == 10  # 40 channels in groups of 4
        with FlopCounterMode(display=False) as counter:
            out = lean(x)
        assert len(kernel_calls) == 10 and counter.get_flop_counts()["Global"][torch.ops.aten.convolution]
        assert torch.equal(out, reference)
    x.requires_grad_(True)
    lean(x).sum().backward()
    assert len(kernel_calls) == 10 and x.grad is not None


def test_group_bytes_stays_exact_with_the_kernel(kernel_calls):
    """The kernel allocates nothing beside the torch tensors it writes (tests/test_streaming.py checks
    the blocks of the models the same way)."""
    for lean in (
        _bottleneck(True, group=6),
        _bottleneck(False, (5, 2, 2, 1), se=True, group=4, mean_group=7),
    ):
        x = _input()[:1]
        with torch.no_grad():
            out_bytes = lean(x).numel() * 4
            assert measure_peak(lean, x).peak_bytes == out_bytes + lean.group_bytes(13, 11)
    assert kernel_calls


@pytest.mark.parametrize("expand", [True, False])
def test_the_parallel_kernel_equals_the_serial_one(monkeypatch, expand):
    """A group of PARALLEL_TAPS depthwise multiply-adds or more runs its channels on the threads: the same
    sums per channel, so the same output bit for bit."""
    lean = _bottleneck(expand, (3, 2, 1, 1), (nn.SiLU, nn.ReLU6), se=True, group=5)
    x = _input()[:1]
    monkeypatch.setattr("leanvision.deploy.lean_blocks.kernel_threads", lambda: 2)
    with torch.no_grad():
        monkeypatch.setattr(depthwise_kernels, "PARALLEL_TAPS", 10**12)
        serial = lean(x)
        monkeypatch.setattr(depthwise_kernels, "PARALLEL_TAPS", 0)
        calls = []
        monkeypatch.setattr(
            depthwise_kernels,
            "expand_depthwise_parallel",
            lambda *args, kernel=depthwise_kernels.expand_depthwise_parallel: calls.append(kernel(*args)),
        )
        parallel = lean(x)
    assert calls and torch.equal(parallel, serial)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("geometry", [(3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 2, 1), (3, 1, 2, 2)])
def test_rows_of_a_band_equal_the_block_on_the_whole_map(geometry, kernel):
    """ChunkedBottleneck.rows: every band of output rows, from the input rows they read (the map's
    top padding given as `top`, the bottom's left to it), equals those rows of the block's output, by the
    kernel and by the torch path (up to the GEMMs' rounding, which depends on their width)."""
    lean = _bottleneck(True, geometry, (nn.ReLU6, nn.SiLU), group=40)
    lean = lean if kernel else _torch_path(lean)
    x = _input(size=(11, 9))[:1]
    (k, s, p, d), height = geometry, 11
    with torch.no_grad():
        whole = lean(x)
        for first in range(whole.shape[2]):
            for rows in range(1, whole.shape[2] - first + 1):
                start = first * s - p
                stop = min((first + rows - 1) * s - p + d * (k - 1) + 1, height)
                band = lean.rows(x[:, :, max(start, 0) : stop], max(-start, 0), rows)
                torch.testing.assert_close(band, whole[:, :, first : first + rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("expand", [True, False])
@pytest.mark.parametrize("group", [40, 20, 7])
def test_rows_of_a_band_in_groups_hold_their_rows_bytes(expand, group):
    """A band's rows in one group of the 40 expanded channels or several hold what rows_bytes says: a
    group's expansion and depthwise rows, and with several groups the projection's rows throughout."""
    lean = _bottleneck(expand, group=group if expand else group // 4)
    x = _input(size=(11, 9))[:1]
    band = x[:, :, 2:9]  # rows 3..7 of the output (3x3, stride 1, padding 1), a view as a fed block's
    with torch.no_grad():
        torch.testing.assert_close(lean.rows(band, 0, 5), lean(x)[:, :, 3:8], rtol=1e-5, atol=1e-5)
        assert measure_peak(lean.rows, band, 0, 5).peak_bytes == lean.rows_bytes(5, 9)


def test_rows_refuse_a_block_with_a_shortcut_or_an_se():
    for lean in (_bottleneck(True, se=True), ChunkedBottleneck(*_bottleneck_steps(), "add", group=4)):
        with pytest.raises(InvalidArgumentError, match="without an SE or a shortcut"):
            lean.rows(_input()[:1], 1, 2)


def _bottleneck_steps() -> tuple[ConvStep, ConvStep, ConvStep]:
    g = torch.Generator().manual_seed(0)
    dw = nn.Conv2d(10, 10, 3, 1, 1, groups=10)
    return (
        _step(nn.Conv2d(10, 10, 1), nn.ReLU(), g, torch.float32),
        _step(dw, nn.ReLU(), g, torch.float32),
        _step(nn.Conv2d(10, 10, 1), nn.Identity(), g, torch.float32),
    )
