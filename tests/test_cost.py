"""Cost counter: MACs against fvcore and the reference notes, per-layer rows, matmul-written modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import leanvision
from leanvision.analysis.cost import profile


def test_mobilenetv2_agrees_with_fvcore_exactly():
    # fvcore's conv + linear count for torchvision MobileNetV2 at 224.
    assert profile("mobilenetv2_100").macs == 300_774_272


# Conv+FC MACs at 224 from rexnet-reference.md (in G).
REFERENCE_GMACS = {
    "rexnet_090": 0.348,
    "rexnet_100": 0.398,
    "rexnet_130": 0.662,
    "rexnet_150": 0.876,
    "rexnet_200": 1.529,
    "rexnet_220": 1.843,
    "rexnet_300": 3.396,
}


@pytest.mark.parametrize("name", sorted(REFERENCE_GMACS))
def test_rexnet_macs_within_half_percent(name):
    report = profile(name)
    assert abs(report.macs / (REFERENCE_GMACS[name] * 1e9) - 1) < 0.005


def test_rexnet_plain_and_mobilenetv1_within_5_percent_of_paper():
    # ReXNet paper Table A1 / Table 4: both 0.56B FLOPs (printed MACs).
    assert abs(profile("rexnet_plain").macs / 0.56e9 - 1) < 0.05
    assert profile("mobilenetv1_100").macs == 568_740_352  # the well-known 569M of MobileNetV1


def conv_macs_by_hand(model: nn.Module, size: int) -> int:
    """Slow reference: walk convs with forward hooks and apply the textbook formula."""
    total = 0

    def hook(m, inputs, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features * out.shape[0]

    hooks = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    for h in hooks:
        h.remove()
    return total


@pytest.mark.parametrize("name", ["rexnet_100", "rexnet_lite_130", "rexnet_plain"])
def test_dispatcher_count_equals_hook_reference(name):
    model = leanvision.create_model(name)
    assert profile(model, input_size=160).macs == conv_macs_by_hand(model, 160)


class MatmulCell(nn.Module):
    """A recurrent-style cell written with raw matmuls, einsum and bmm (no nn.Linear, no conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4))
        self.u = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], 4)
        for t in range(x.shape[1]):  # 3 steps x (6*4 + 4*4) MACs per batch row
            h = torch.tanh(x[:, t] @ self.w + h @ self.u)
        y = torch.einsum("bi,ij->bj", h, self.u)  # b * 4 * 4
        return torch.bmm(y[:, :, None], h[:, None, :]).flatten(1)  # b * 4 * 1 * 4


def test_matmul_written_module_is_counted():
    report = profile(MatmulCell(), input_size=(3, 6))
    assert report.macs == 3 * (6 * 4 + 4 * 4) + 16 + 16
    assert report.params == 6 * 4 + 4 * 4


def test_grouped_and_transposed_conv():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=4), nn.ConvTranspose2d(16, 4, 2, stride=2))
    report = profile(model, input_size=(8, 10, 10))
    assert report.macs == 10 * 10 * 16 * (8 // 4) * 9 + 10 * 10 * 16 * 4 * 2 * 2


def test_per_layer_rows():
    report = profile("rexnet_100")
    rows = {row.name: row for row in report.layers}
    stem = rows["stem.conv"]
    assert stem.type == "Conv2d" and stem.output_shape == [1, 32, 112, 112]
    assert stem.params == 32 * 3 * 9 and stem.macs == 112 * 112 * 32 * 27
    assert rows["head.fc"].macs == 1280 * 1000
    assert sum(r.params for r in report.layers) == report.params
    assert sum(r.macs for r in report.layers) == report.macs
    assert report.counted == "conv, linear, matmul"


def test_elementwise_is_opt_in_and_stated():
    plain, full = profile("mobilenetv2_100"), profile("mobilenetv2_100", elementwise=True)
    assert "elementwise" in full.counted and "elementwise" not in plain.counted
    # MobileNetV2 at 224 has 6,678,112 BN outputs; each is one elementwise op (plus ReLU6s, adds, pool).
    assert full.macs - plain.macs > 6_678_112
    assert full.flops == 2 * full.macs


def test_bad_input():
    with pytest.raises(ValueError, match="positive"):
        profile("rexnet_100", input_size=(3, 0, 224))
    with pytest.raises(ValueError, match="must be >= 32"):
        profile("rexnet_100", input_size=16)
    with pytest.raises(TypeError, match="need a model name"):
        profile(nn.Linear(2, 2), input_size=(2,), width_mult=2.0)
