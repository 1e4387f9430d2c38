"""fuse_for_inference (BN folding, layout) and benchmark(): results, side effects and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import leanvision
from conftest import randomize_
from leanvision.bench import BenchResult, benchmark, calibrate_batchnorm
from leanvision.deploy.fold import PointwiseConv, fold_batchnorm_, fuse_for_inference
from leanvision.layers.conv import stack_convs
from leanvision.models.face import DetectionHead, L2Norm


def n_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name", ["rexnet_100", "rexnet_lite_100", "mobilenetv2_100", "rexnet_plain"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_fused_model_matches_and_leaves_the_input_alone(name, channels_last):
    model = randomize_(leanvision.create_model(name))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)
    model.train()
    before = copy.deepcopy(model.state_dict())
    batchnorms = n_batchnorms(model)

    fused = fuse_for_inference(model, channels_last=channels_last)

    assert not fused.training and n_batchnorms(fused) == 0
    full_convs = [
        m for m in fused.modules() if isinstance(m, nn.Conv2d) and m.groups == 1 and m.kernel_size != (1, 1)
    ]
    assert full_convs and all(  # (1x1 and depthwise weights are contiguous in both layouts)
        m.weight.is_contiguous(memory_format=torch.channels_last) == channels_last for m in full_convs
    )
    with torch.no_grad():
        torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            fused(x.contiguous(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-5
        )
    assert model.training and n_batchnorms(model) == batchnorms
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_fold_rule_skips_what_it_cannot_fold():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, track_running_stats=False),  # normalises by batch statistics even in eval
        nn.ReLU(),
        nn.BatchNorm2d(4),  # fed by an activation, not a conv
        nn.Conv2d(4, 6, 1, bias=True),  # the one foldable pair, conv bias included
        nn.BatchNorm2d(6),
    )
    randomize_(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        assert fold_batchnorm_(model) == 1
        assert [type(m) for m in model[1::2]] == [nn.BatchNorm2d, nn.BatchNorm2d, nn.Identity]
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_models_without_batchnorm_are_copied_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    x = torch.randn(1, 3, 8, 8)
    expected = model(x)
    fused = fuse_for_inference(model)
    assert fused is not model and model.training
    torch.testing.assert_close(fused(x), expected)


def test_benchmark_fields():
    result = benchmark(
        "rexnet_100", batch_size=2, input_size=(3, 64, 64), warmup=1, min_iters=3, min_seconds=0.0
    )
    assert isinstance(result, BenchResult)
    assert result.model == "rexnet_100" and result.batch_size == 2 and result.device == "cpu"
    assert result.input_size == (3, 64, 64) and result.threads == torch.get_num_threads()
    assert result.iterations >= 3 and not (result.compile or result.deploy or result.channels_last)
    assert 0 < result.p10_ms <= result.median_ms <= result.p90_ms
    assert result.images_per_s == pytest.approx(2e3 / result.median_ms)
    assert result.to_dict()["median_ms"] == result.median_ms


def test_benchmark_deploy_threads_and_modules():
    threads = torch.get_num_threads()
    model = leanvision.create_model("rexnet_plain", num_classes=10)
    result = benchmark(
        model, input_size=(3, 32, 32), threads=1, deploy=True, warmup=0, min_iters=1, min_seconds=0.0
    )
    assert result.threads == 1 and torch.get_num_threads() == threads
    assert result.deploy and result.channels_last and result.model == "rexnet_plain"
    assert model.training and n_batchnorms(model) > 0  # the caller's module is not touched
    assert benchmark(nn.Conv2d(3, 4, 3), warmup=0, min_iters=1, min_seconds=0.0).model == "Conv2d"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(batch_size=0), "batch_size"),
        (dict(threads=0), "threads"),
        (dict(input_size=(3, 0, 64)), "input_size"),
        (dict(min_iters=0), "min_iters"),
        (dict(device="tpu"), "device"),
        (dict(device="meta"), "device"),
    ],
)
def test_benchmark_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        benchmark("rexnet_100", **kwargs)


def test_benchmark_model_kwargs_need_a_name():
    with pytest.raises(TypeError, match="model name"):
        benchmark(nn.Identity(), num_classes=10)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_benchmark_cuda_unavailable():
    with pytest.raises(ValueError, match="cuda"):
        benchmark("rexnet_100", device="cuda")


@pytest.mark.slow
def test_benchmark_compile():
    result = benchmark(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()),
        input_size=(3, 16, 16),
        compile=True,
        warmup=0,
        min_iters=2,
        min_seconds=0.0,
    )
    assert result.compile and result.iterations >= 2


@pytest.mark.parametrize("size", [4, 16, 32])  # 16 and 64 pixels run as a GEMM, 1024 as a convolution
@pytest.mark.parametrize("channels_last", [True, False])
def test_pointwise_conv_equals_conv2d_on_both_paths(size, channels_last):
    conv = nn.Conv2d(12, 20, 1)
    fused = fuse_for_inference(nn.Sequential(conv), channels_last=channels_last)
    assert type(fused[0]) is PointwiseConv and fused[0].state_dict().keys() == conv.state_dict().keys()
    x = torch.randn(1, 12, size, size)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), conv(x), rtol=1e-5, atol=1e-5)


def test_only_plain_pointwise_convs_are_replaced():
    fused = fuse_for_inference(leanvision.create_model("rexnet_100"))
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    pointwise = [m for m in convs if type(m) is PointwiseConv]
    assert all(m.kernel_size == (1, 1) and m.groups == 1 for m in pointwise)
    assert all(m.kernel_size != (1, 1) for m in convs if type(m) is nn.Conv2d)
    assert len(pointwise) == 15 + 16 + 2 * 13 + 1  # expand, project, SE fc1/fc2, head conv


def test_calibrate_batchnorm_sets_batch_statistics_and_restores_momentum():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.1))
    calibrated = calibrate_batchnorm(model, input_size=(3, 8, 8))
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # the batch it draws
    with torch.no_grad():
        conv_out = model[0](x)
    torch.testing.assert_close(model[1].running_mean, conv_out.mean((0, 2, 3)))
    assert calibrated is model and not model.training and model[1].momentum == 0.1


def test_stack_convs_compute_the_convs_side_by_side():
    torch.manual_seed(0)
    x, y = torch.randn(2, 5, 9, 11), torch.randn(2, 4, 9, 11)
    shared = [nn.Conv2d(5, 3, 3, 2, 1), nn.Conv2d(5, 4, 3, 2, 1)]
    same_shape = [nn.Conv2d(5, 3, 3, padding=1), nn.Conv2d(5, 3, 3, padding=1)]
    mixed = [nn.Conv2d(5, 3, 3, padding=1), nn.Conv2d(4, 2, 3, padding=1)]
    with torch.no_grad():
        stacked = stack_convs(shared)
        torch.testing.assert_close(stacked(x), torch.cat([c(x) for c in shared], 1))
        grouped = stack_convs(same_shape, split_input=True)
        assert grouped.groups == 2
        xx = torch.cat([x, x.flip(1)], 1)
        expected = torch.cat([same_shape[0](x), same_shape[1](x.flip(1))], 1)
        torch.testing.assert_close(grouped(xx), expected)
        diagonal = stack_convs(mixed, split_input=True)
        assert diagonal.groups == 1 and diagonal.in_channels == 9
        torch.testing.assert_close(diagonal(torch.cat([x, y], 1)), torch.cat([mixed[0](x), mixed[1](y)], 1))
    assert stack_convs([nn.Conv2d(5, 3, 3), nn.Conv2d(5, 3, 1)]) is None  # another kernel
    assert stack_convs([nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, groups=2)]) is None
    assert stack_convs([nn.Conv2d(5, 3, 3, bias=False), nn.Conv2d(5, 3, 3)]) is None
    assert stack_convs([nn.Conv2d(5, 3, 3), nn.Conv2d(4, 3, 3)]) is None  # a shared input needs one width


FACE_DETECTORS = [
    "rnnpool_face_a", "rnnpool_face_b", "rnnpool_face_c", "rnnpool_face_quant", "rnnpool_face_qvga_mono",
    "rnnpool_face_m4",
]  # fmt: skip


@pytest.mark.parametrize("name", FACE_DETECTORS)
def test_face_detector_deploy_form_merges_its_heads(name):
    """fuse_for_inference runs each head's loc and conf branches as one convolution, its L2Norm's scales
    folded in (DetectionHead.fuse_for_inference_): the same raw outputs as the eager model."""
    model = randomize_(leanvision.create_model(name))
    calibrate_batchnorm(model, (model.in_chans, 96, 128))
    fused = fuse_for_inference(model)
    heads = [m for m in fused.modules() if isinstance(m, DetectionHead)]
    assert heads and all(h.merged is not None and not hasattr(h, "loc") for h in heads)
    scaled = [h.l2norm for h in heads if isinstance(h.l2norm, L2Norm)]
    assert scaled and all(n.weight is None for n in scaled)  # folded into the merged convolutions
    image = torch.rand(model.in_chans, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = model.batch_images([image])
        for ours, eager in zip(fused.head_outputs(x), model.head_outputs(x)):
            torch.testing.assert_close(ours, eager, rtol=0, atol=1e-4 * float(eager.abs().max()))
