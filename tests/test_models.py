"""Model shapes, exact parameter counts and bad-input errors (the shared interface: test_model_interface)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import leanvision
from leanvision.errors import UnknownModelError
from leanvision.models.rexnet import rexnet_channels

# rexnet-reference.md (ReXNet, ReXNet-lite), MobileNetV1/V2 reference counts (torchvision, timm).
EXACT_PARAMS = {
    "rexnet_090": 4_091_257,
    "rexnet_100": 4_796_873,
    "rexnet_130": 7_557_091,
    "rexnet_150": 9_728_593,
    "rexnet_200": 16_366_620,
    "rexnet_220": 19_485_308,
    "rexnet_300": 34_708_792,
    "rexnet_lite_100": 4_740_056,
    "rexnet_lite_130": 6_747_960,
    "rexnet_lite_150": 8_332_296,
    "rexnet_lite_200": 12_966_200,
    "mobilenetv1_100": 4_231_976,
    "mobilenetv2_100": 3_504_872,
    "mobilenetv2_140": 6_108_776,
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS))
def test_exact_parameter_counts(name):
    assert n_params(leanvision.create_model(name)) == EXACT_PARAMS[name]


def test_rexnet_plain_within_5_percent_of_paper():
    # ReXNet paper Table A1: 3.4M params (the 0.56B FLOPs are checked in test_cost.py).
    assert abs(n_params(leanvision.create_model("rexnet_plain")) / 3.4e6 - 1) < 0.05


def test_rexnet_channels_match_reference_notes():
    # x1.0 block outputs from rexnet-reference.md; round() is half-to-even (38.5 -> 38, 128.5 -> 128).
    assert rexnet_channels(1.0) == (
        32,
        [16, 27, 38, 50, 61, 72, 84, 95, 106, 117, 128, 140, 151, 162, 174, 185],
    )
    stem, widths = rexnet_channels(0.9)
    assert stem == 32 and widths[0] == 16  # below x1.0 only the slope scales
    assert widths[-1] == round((16 / 0.9 + 15 * 11.25) * 0.9)


def test_rexnet_residual_pattern_and_se_placement():
    blocks = list(leanvision.create_model("rexnet_100").features)[:16]
    assert [int(b.use_shortcut) for b in blocks] == [0, 0, 1, 0, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1]
    assert [b.se is not None for b in blocks] == [False] * 3 + [True] * 13
    assert all(b.se.fc1.out_channels == b.conv_dw.out_channels // 12 for b in blocks[3:])


def test_any_width_via_generic_name():
    model = leanvision.create_model("rexnet", width_mult=1.1)
    assert abs(n_params(model) / 5.6e6 - 1) < 0.02  # paper Table A1: 5.6M


def test_list_models_and_pattern():
    names = leanvision.list_models()
    for expected in ["rexnet_100", "rexnet_lite_200", "rexnet_plain", "mobilenetv1_100", "mobilenetv2_035"]:
        assert expected in names
    assert leanvision.list_models("rexnet_lite_*") == [
        "rexnet_lite_100",
        "rexnet_lite_130",
        "rexnet_lite_150",
        "rexnet_lite_200",
    ]


def test_unknown_name_lists_closest():
    with pytest.raises(UnknownModelError, match="did you mean rexnet_100"):
        leanvision.create_model("rexnet_10")
    with pytest.raises(UnknownModelError, match="rexnet_lite_130"):
        leanvision.create_model("rexnt_lite_130")


@pytest.mark.parametrize("width", [0, -1.0])
@pytest.mark.parametrize("name", ["rexnet", "rexnet_lite", "mobilenetv1", "mobilenetv2"])
def test_non_positive_width_rejected(name, width):
    with pytest.raises(ValueError, match="width_mult must be a positive number"):
        leanvision.create_model(name, width_mult=width)


def test_features_only_out_indices():
    extractor = leanvision.create_model("rexnet_100", features_only=True, out_indices=(1, 3))
    maps = extractor.eval()(torch.randn(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == [38, 128]
    with pytest.raises(ValueError, match="out of range"):
        leanvision.create_model("rexnet_100", features_only=True, out_indices=(7,))


@pytest.mark.parametrize("name", ["rexnet_100", "mobilenetv2_100"])
def test_wrong_channels_and_too_small_inputs(name):
    model = leanvision.create_model(name).eval()
    with pytest.raises(ValueError, match=r"expects input \[B, 3, H, W\], got \[1, 1, 64, 64\]"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="must be >= 32, got 16x64"):
        model(torch.randn(1, 3, 16, 64))


def test_in_chans():
    model = leanvision.create_model("rexnet_100", in_chans=1, num_classes=10).eval()
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 10)


def test_se_batch_of_one_in_training_mode_is_a_clear_error():
    model = leanvision.create_model("rexnet_100").train()
    with pytest.raises(ValueError, match="batch of at least 2"):
        model(torch.randn(1, 3, 32, 32))


def test_partial_residual_adds_input_to_first_channels():
    block = leanvision.create_model("rexnet_100").features[2].eval()  # 27 -> 38, stride 1
    x = torch.randn(1, 27, 8, 8)
    body = block.conv_pwl(block.act_dw(block.conv_dw(block.conv_exp(x))))
    expected = body.clone()
    expected[:, :27] += x
    torch.testing.assert_close(block(x), expected)


def test_onnx_export_matches_pytorch(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = leanvision.create_model("rexnet_100").eval()
    x = torch.randn(1, 3, 224, 224)
    path = tmp_path / "rexnet_100.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["logits"], dynamo=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(onnx_out), model(x).detach(), atol=1e-4, rtol=1e-4)


def test_torch_export():
    model = leanvision.create_model("rexnet_100").eval()
    x = torch.randn(1, 3, 64, 64)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))
