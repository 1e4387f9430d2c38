"""Peak inference memory: the RNNPool paper's Tables 1 and 8, MCUNetV2's 1372 KiB, invariants, bad input;
the MACs of recomputation within a budget (Table 1 "Memory Optimised", Appendix E.3).

The paper's "MB" is MiB (2.29 MB = 112 * 112 * 48 * 4 bytes / 2^20); its KB in the VWW figure is KiB.
"""

from __future__ import annotations

import functools
import json
import random

import pytest
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

import leanvision
from leanvision.analysis.cost import profile
from leanvision.analysis.memory import peak_memory, trace
from leanvision.analysis.memory_planner import place_greedy_by_size, plan_buffers
from leanvision.analysis.memory_trace import TraceError
from leanvision.analysis.recompute import recompute_cost
from leanvision.cli import app

MIB, KIB = 2**20, 2**10

# Table 1 (and Table 8) networks: base, RNNPool version; torchvision builds the bases leanvision lacks.
BUILDERS = {
    "efficientnet_b0": torchvision.models.efficientnet_b0,
    "resnet18": torchvision.models.resnet18,
    "googlenet": functools.partial(torchvision.models.googlenet, init_weights=True),
}
NETWORKS = {
    "MobileNetV2": ("mobilenetv2_100", "mobilenetv2_rnnpool"),
    "EfficientNet-B0": ("efficientnet_b0", "efficientnet_b0_rnnpool"),
    "ResNet18": ("resnet18", "resnet18_rnnpool"),
    "DenseNet121": ("densenet121", "densenet121_rnnpool"),
    "GoogLeNet": ("googlenet", "googlenet_rnnpool"),
}


@functools.cache
def graph(name: str):
    """Each network is traced once per test session (torch.export takes 1-3 s)."""
    return trace(BUILDERS[name]() if name in BUILDERS else name)


def mib(report) -> float:
    return report.peak_bytes / MIB


def live_at(report, step_name: str) -> int:
    return max(s.live_bytes for s in report.steps if s.name == step_name)


# Table 1 "Standard Calculation" peak RAM (fp32, MiB) and the block E.2.2 names as the peak.
TABLE1 = {
    "mobilenetv2_100": (2.29, "features.1"),
    "efficientnet_b0": (2.29, "features.1.0"),
    "resnet18": (3.06, "conv1"),
    "densenet121": (3.06, "features.conv0"),
    "googlenet": (3.06, "conv1.conv"),
    "mobilenetv2_rnnpool": (0.24, "features.2"),
    "efficientnet_b0_rnnpool": (0.25, "features.2.0"),
    "resnet18_rnnpool": (0.38, "layer3.0"),
    "densenet121_rnnpool": (0.77, "features.denseblock3"),
    "googlenet_rnnpool": (0.78, "inception4e"),
}


@pytest.mark.parametrize("name", sorted(TABLE1))
def test_table1_layer_convention(name):
    paper_mib, paper_layer = TABLE1[name]
    report = peak_memory(graph(name), convention="layer", dtype_bytes=4)
    assert report.convention == "layer"
    assert mib(report) == pytest.approx(paper_mib, rel=0.01)
    # Where E.2.2 puts the peak. Ties are reported at the first step: ResNet18-RNNPool's RNNPool output
    # (28x28x128) equals layer3.0's max(in, out); DenseNet121-RNNPool's T2 conv output (28x28x256) equals
    # D3's output (14x14x1024).
    assert live_at(report, paper_layer) == report.peak_bytes


# Table 8 "minimum" peak RAM (fp32, MiB), with how close our structure-derived value must be and why.
# The paper prints 2 decimals, so "0.24" covers [0.235, 0.245).
TABLE8 = {
    "resnet18": (0.81, 0.01),  # conv1 + maxpool row by row, exactly E.1.2's partition
    "resnet18_rnnpool": (0.38, 0.01),
    "densenet121_rnnpool": (0.77, 0.01),
    "mobilenetv2_rnnpool": (0.24, 0.021),  # MBConv after RNNPool by E.1.1: 0.2358, prints as 0.24
    "efficientnet_b0_rnnpool": (0.24, 0.021),  # 0.2367 by E.1.1 (Table 1's 0.25 is the layer rule)
    # E.1.2's D1 + T1 terms: as listed they sum to 2.23-2.28 MiB, not the printed 2.38; ours 2.283
    "densenet121": (2.38, 0.045),
    # torchvision's inception branch 3 is a 3x3 conv (the paper's GoogLeNet has 5x5): 3b + pool3 = 0.972
    "googlenet": (1.01, 0.04),
}


@pytest.mark.parametrize("name", sorted(TABLE8))
def test_table8_min_convention(name):
    paper_mib, tolerance = TABLE8[name]
    report = peak_memory(graph(name), convention="min", dtype_bytes=4)
    assert report.convention == "min"
    assert mib(report) == pytest.approx(paper_mib, rel=tolerance)


@pytest.mark.parametrize("name", ["mobilenetv2_100", "efficientnet_b0"])
def test_table8_mobilenetv2_min_below_paper(name):
    # E.1.2 partitions at [stem conv, MB1]: 112x2x32 + 112x2x32 + 112x112x16 + 224x5x3 = 0.84 MiB. The
    # second 112x2x32 is a t=1 expansion conv that MobileNetV2 (torchvision's, the original) does not
    # have: our cost of that partition is 0.806 MiB. The optimal partition runs [stem, MB1, MB2] as one
    # row-by-row segment (the image held, freed row by row): 0.713 MiB, below the paper's.
    report = peak_memory(graph(name), convention="min", dtype_bytes=4)
    assert mib(report) == pytest.approx(0.7126, abs=5e-4) and mib(report) < 0.84


def test_table8_googlenet_rnnpool_min_below_paper():
    # E.1.2: inception 4e + max pool 4 = 0.59 MiB with 5x5 convs in branch 3 and a 3x3 pool. torchvision's
    # GoogLeNet has a 3x3 conv there and a 2x2 max pool 4, so fewer rows are kept: 4e + pool4 costs
    # 0.460 MiB here and the peak moves to inception 4d (0.468 MiB).
    report = peak_memory(graph("googlenet_rnnpool"), convention="min", dtype_bytes=4)
    assert report.peak_layer == "inception4d" and mib(report) == pytest.approx(0.4683, abs=5e-4)
    assert live_at(report, "inception4e .. maxpool4") / MIB == pytest.approx(0.4597, abs=5e-4)


@pytest.mark.parametrize("name", sorted(TABLE1))
def test_min_never_exceeds_layer(name):
    layer, low = (peak_memory(graph(name), convention=c).peak_bytes for c in ("layer", "min"))
    assert low <= layer


def test_layer_convention_block_rules_on_mobilenetv2_rnnpool():
    report = peak_memory(graph("mobilenetv2_rnnpool"), convention="layer")
    steps = {s.name: s for s in report.steps}
    # the RNNPool layer runs patch by patch with the stem conv that feeds it: only its output is held
    assert "features.0.0" not in steps
    assert steps["features.1"].live_bytes == 28 * 28 * 64 * 4
    assert steps["features.1"].kind == "rnnpool" and "features.0.0" in steps["features.1"].detail
    assert steps["features.2"].live_bytes == (28 * 28 * 64 + 14 * 14 * 64) * 4  # MBConv: input + output
    assert report.timeline[0] == ("features.1", 28 * 28 * 64 * 4)


def test_inception_rule_counts_input_and_three_smallest_paths():
    report = peak_memory(graph("googlenet"), convention="layer", dtype_bytes=1)
    # inception 3a: input 28x28x192, paths 64, 128, 32, 32 channels: the 128 path is left out
    assert live_at(report, "inception3a") == 28 * 28 * (192 + 64 + 32 + 32)


def test_visual_wake_words_int8():
    base = peak_memory("mobilenetv2_035_vww", convention="layer", dtype_bytes=1)
    ours = peak_memory("mobilenetv2_035_vww_rnnpool", convention="layer", dtype_bytes=1)
    # Base: first MBConv 112x112x8 in + 112x112x8 out = 196 KiB, under the challenge's 250 KB that the
    # paper quotes for it ("250 -> 33.68 KB").
    assert base.peak_bytes == 112 * 112 * 16 and base.peak_layer == "features.1"
    # RNNPool VWW: MBConv after RNNPool, 28x28x32 in + 14x14x24 out = 29.1 KiB. The paper's 33.68 KB
    # (= 28x28x32 + 14x14x48 bytes) needs a 48-channel block output; the 0.35x network (ours and
    # EdgeML's, _make_divisible(64 * 0.35) = 24) has 24, so the paper's figure is an upper bound here.
    assert ours.peak_bytes == 28 * 28 * 32 + 14 * 14 * 24
    assert ours.peak_bytes <= 33.68 * KIB and base.peak_bytes / ours.peak_bytes > 6


def test_mcunetv2_mobilenetv2_int8_planner():
    g = graph("mobilenetv2_100")
    inplace = peak_memory(g, convention="planner", dtype_bytes=1, inplace_depthwise=True)
    # MCUNetV2: 1372 kB = 112x112x(16 + 96) bytes, block 2's 1x1 expansion (input and output live)
    assert inplace.peak_bytes == 1372 * KIB == 112 * 112 * (16 + 96)
    assert inplace.peak_layer.startswith("features.2.conv.0")
    plain = peak_memory(g, convention="planner", dtype_bytes=1)
    # without in-place depthwise, block 2's depthwise holds 112x112x96 in + 56x56x96 out: about 1470 kB
    assert plain.peak_bytes == 112 * 112 * 96 + 56 * 56 * 96
    assert plain.peak_bytes == pytest.approx(1470 * KIB, rel=0.01)


def test_planner_arena_is_valid_and_at_least_the_live_peak():
    g = graph("googlenet_rnnpool")
    buffers = plan_buffers(g)
    arena = place_greedy_by_size(buffers)
    for i, a in enumerate(buffers):
        for b in buffers[i + 1 :]:
            live_together = a.start <= b.end and b.start <= a.end
            assert not (live_together and a.offset < b.offset + b.size and b.offset < a.offset + a.size)
    report = peak_memory(g, convention="planner", dtype_bytes=1)
    assert report.peak_bytes == arena >= max(s.live_bytes for s in report.steps)


@pytest.mark.parametrize("name", ["mobilenetv2_100", "resnet18", "densenet121_rnnpool"])
def test_planner_peak_at_least_largest_op(name):
    g = graph(name)
    sizes = []

    def hook(module, inputs, output):
        sizes.append(inputs[0].numel() + output.numel())

    hooks = [m.register_forward_hook(hook) for m in g.model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        g.model(torch.randn(1, *g.input_size))
    for h in hooks:
        h.remove()
    assert peak_memory(g, convention="planner", dtype_bytes=4).peak_bytes >= 4 * max(sizes)


def random_cnn(seed: int) -> list[nn.Module]:
    rng = random.Random(seed)
    layers, channels = [], 3
    for _ in range(rng.randint(2, 6)):
        out = rng.choice([4, 8, 16])
        kind = rng.choice(["conv", "dw", "pool", "bn_relu"])
        if kind == "conv":
            layers.append(nn.Conv2d(channels, out, 3, rng.choice([1, 2]), 1))
            channels = out
        elif kind == "dw":
            layers.append(nn.Conv2d(channels, channels, 3, 1, 1, groups=channels))
        elif kind == "pool":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.BatchNorm2d(channels), nn.ReLU()]
    return layers


@pytest.mark.parametrize("seed", range(4))
def test_adding_a_layer_never_lowers_the_planner_peak(seed):
    # Appending any layer, or inserting a shape-preserving one anywhere, keeps every earlier tensor and
    # its lifetime. (A pooling layer inserted early can lower the peak: it shrinks everything after it.)
    layers = random_cnn(seed)
    rng = random.Random(seed)
    at = rng.randint(0, len(layers))
    channels = next((m.out_channels for m in reversed(layers[:at]) if isinstance(m, nn.Conv2d)), 3)
    last = next((m.out_channels for m in reversed(layers) if isinstance(m, nn.Conv2d)), 3)
    inserted = layers[:at] + [rng.choice([nn.Conv2d(channels, channels, 3, 1, 1), nn.ReLU()])] + layers[at:]
    appended = layers + [rng.choice([nn.Conv2d(last, 32, 3, 2, 1), nn.AvgPool2d(2), nn.Flatten()])]
    for dw in (False, True):
        before = peak_memory(nn.Sequential(*layers), (3, 32, 32), "planner", inplace_depthwise=dw)
        for longer in (inserted, appended):
            after = peak_memory(nn.Sequential(*longer), (3, 32, 32), "planner", inplace_depthwise=dw)
            assert after.peak_bytes >= before.peak_bytes


def test_int8_is_a_quarter_of_fp32():
    g = graph("resnet18_rnnpool")
    for convention in ("layer", "planner"):
        fp32, int8 = (peak_memory(g, convention=convention, dtype_bytes=b).peak_bytes for b in (4, 1))
        assert fp32 == 4 * int8


class Gate(nn.Module):
    """A block of unknown structure: it adds two activations in its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else x


def test_unknown_block_falls_back_to_planner_with_a_warning():
    with pytest.warns(UserWarning, match=r"unknown structure \(\(model\)\).*planner"):
        report = peak_memory(Gate(), (3, 16, 16), convention="layer")
    assert report.convention == "planner"
    assert any("unknown structure" in n for n in report.notes)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="convention must be one of"):
        peak_memory(graph("resnet18"), convention="peak")
    with pytest.raises(ValueError, match="dtype_bytes must be 1"):
        peak_memory(graph("resnet18"), dtype_bytes=3)
    with pytest.raises(ValueError, match=r"input_size must be \(C, H, W\)"):
        peak_memory("mobilenetv2_100", input_size=(224, 224))
    with pytest.raises(TypeError, match="need a model name"):
        peak_memory(nn.Conv2d(3, 3, 1), num_classes=3)
    with pytest.raises(TraceError, match="data-dependent control flow"):
        peak_memory(DataDependent(), (3, 8, 8))


def test_lazy_export():
    assert leanvision.peak_memory is peak_memory


def test_cli_memory_all_json_and_plot(tmp_path):
    plot = tmp_path / "memory.png"
    result = CliRunner().invoke(
        app,
        [
            "memory",
            "mobilenetv2_rnnpool",
            "--convention",
            "all",
            "--dtype",
            "int8",
            "--json",
            "--plot",
            str(plot),
            "--budget-kib",
            "256",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = {r["convention"]: r for r in json.loads(result.stdout)}
    assert rows["layer"]["peak_bytes"] == 28 * 28 * 64 + 14 * 14 * 64
    assert set(rows) == {"layer", "min", "planner"} and rows["layer"]["dtype_bytes"] == 1
    assert plot.stat().st_size > 10_000


def test_cli_memory_table_and_errors():
    result = CliRunner().invoke(app, ["memory", "mobilenetv2_100"])
    assert result.exit_code == 0 and "features.1" in result.stdout and "KiB" in result.stdout
    assert CliRunner().invoke(app, ["memory", "mobilenetv2_100", "--dtype", "int4"]).exit_code == 2
    assert CliRunner().invoke(app, ["memory", "mobilenetv2_100", "--convention", "peak"]).exit_code == 2


def rnnpool_budget(name: str) -> int:
    """Table 1's budget for a base network: its RNNPool version's layer-convention peak (fp32)."""
    return peak_memory(graph(NETWORKS_BY_BASE[name])).peak_bytes


NETWORKS_BY_BASE = dict(NETWORKS.values())

# Table 1 "Memory Optimised" (fp32): paper MAdds (G) and peak (MiB), ConvBlock-A, Activation-A. The
# paper prints 2 decimals, truncating EfficientNet-B0's 0.407 MiB (56x56x24 + 28x28x40 floats) to 0.40.
MEMORY_OPTIMISED = {
    "mobilenetv2_100": (1.00, 0.38, "features.4", "features.3 output 56x56x24"),
    "efficientnet_b0": (1.09, 0.40, "features.3.0", "features.2.1 output 56x56x24"),
    "densenet121": (24.41, 1.53, "features.denseblock2", "features.transition1.pool output 28x28x128"),
}


@pytest.mark.parametrize("name", sorted(MEMORY_OPTIMISED))
def test_table1_memory_optimised(name):
    paper_gmacs, paper_mib, block_a, activation = MEMORY_OPTIMISED[name]
    report = recompute_cost(graph(name), rnnpool_budget(name))
    assert report.macs / 1e9 == pytest.approx(paper_gmacs, rel=0.01)  # within 0.4%
    assert report.peak_bytes / MIB == pytest.approx(paper_mib, abs=0.01)
    assert (report.conv_block_a, report.activation) == (block_a, activation)
    assert report.macs == report.base_macs + report.extra_macs > report.base_macs


def test_table1_memory_optimised_resnet18():
    # Paper: 21.58G MAdds at 0.38 MB. Ours: 21.60G, rebuilding layer1.1's output (56x56x64) for layer2.0,
    # the last block above the 0.38 MiB budget; layer2.0 then holds max(56x56x64, 28x28x128): 0.77 MiB.
    # The paper's MAdds are this schedule's; its 0.38 MB is the budget, which layer2.0 exceeds.
    report = recompute_cost(graph("resnet18"), rnnpool_budget("resnet18"))
    assert report.macs / 1e9 == pytest.approx(21.58, rel=0.01)
    assert report.conv_block_a == "layer2.0" and report.activation == "layer1.1 output 56x56x64"
    assert report.peak_bytes == 56 * 56 * 64 * 4 and report.patch == (43, 43)


def test_table1_memory_optimised_googlenet():
    # Paper: 3.32G = its base 1.57G + 1.75G, peak 1.63 MB. Ours: 2.77G = base 1.50G (torchvision's
    # GoogLeNet has 3x3 convs where the paper's has 5x5) + 1.28G, rebuilding maxpool2's output (28x28x192)
    # for inception 3a and 3b, peak 1.63 MiB. The paper's 1.75G is the whole patch-by-patch cost of
    # conv1..conv3, our extra plus their one layer-by-layer pass: unlike for the other four networks, the
    # paper did not deduct that pass here.
    g = graph("googlenet")
    report = recompute_cost(g, rnnpool_budget("googlenet"))
    assert report.peak_bytes / MIB == pytest.approx(1.63, abs=0.01) and report.conv_block_a == "inception3b"
    assert report.activation == "maxpool2 output 28x28x192"
    one_pass = sum(
        layer.macs
        for layer in profile(g.model).layers
        if layer.name.endswith(".conv") and layer.name.split(".")[0] in ("conv1", "conv2", "conv3")
    )
    assert (report.extra_macs + one_pass) / 1e9 == pytest.approx(1.75, rel=0.01)
    assert report.macs / 1e9 == pytest.approx(3.32, rel=0.2)


def patch_net() -> nn.Sequential:
    # 16x16 image -> 3x3/2 conv (8x8x16) -> 3x1 conv (8x8x4) -> 2x2 max pool (4x4x4) -> 3x3 conv (4x4x4)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1),
        nn.Conv2d(16, 4, (3, 1), 1, (1, 0)),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, 1, 1),
    )


def test_recompute_by_hand():
    # Layer costs 1024, 256, 64, 64 floats. Budget 320 floats: layer "0" is above it; rebuilding the
    # conv output entering the pool (8x8x4) holds it and the pool output, 256 + 64 floats. One voxel needs
    # 3x1 of layer 0's output, 7x3 of the image: layer 0 runs 3 times per position, 64 positions.
    report = recompute_cost(patch_net(), 320 * 4, (3, 16, 16))
    assert report.activation == "1 output 8x8x4" and report.patch == (7, 3)
    assert report.peak_bytes == (256 + 64) * 4 and report.conv_block_b == "0"
    assert report.extra_macs == (3 * 64 - 64) * 16 * 3 * 9
    assert report.macs == profile(patch_net(), (3, 16, 16)).macs + report.extra_macs
    # the smallest peak: rebuild the pool output (4x4x4) and hold it with the last conv's output
    with pytest.raises(
        ValueError, match=r"below the smallest peak recomputation reaches, 0.5 KiB \(512 bytes"
    ):
        recompute_cost(patch_net(), 511, (3, 16, 16))
    assert recompute_cost(patch_net(), 512, (3, 16, 16)).peak_bytes == 512


@pytest.mark.parametrize("name", ["mobilenetv2_100", "resnet18"])
def test_no_recompute_within_the_layer_peak(name):
    peak = peak_memory(graph(name)).peak_bytes
    for budget in (peak, 2 * peak):
        report = recompute_cost(graph(name), budget)
        assert report.extra_macs == 0 and report.macs == report.base_macs == profile(graph(name).model).macs
        assert report.peak_bytes == peak and report.activation == ""


@pytest.mark.parametrize("name", ["mobilenetv2_100", "resnet18"])
def test_smaller_budget_never_costs_fewer_macs(name):
    # just below each layer-convention level, where ConvBlock-A moves, down to Table 1's budget
    levels = {s.live_bytes for s in peak_memory(graph(name)).steps if s.live_bytes > rnnpool_budget(name)}
    budgets = [max(levels), *sorted((b - 1 for b in levels), reverse=True), rnnpool_budget(name)]
    reports = [recompute_cost(graph(name), b) for b in budgets]
    assert all(a.macs <= b.macs for a, b in zip(reports, reports[1:]))
    assert all(a.peak_bytes >= b.peak_bytes for a, b in zip(reports, reports[1:]))
    assert reports[-1].extra_macs > 0


@pytest.mark.slow
def test_later_activation_used_when_cheaper():
    # Just below DenseNet121's 0.77 MiB, E.3 rebuilds transition 2's output (14x14x256) for dense block 3;
    # its patches already span the image, so transition 3's output (7x7x512, 4x fewer positions) is cheaper.
    g = graph("densenet121")
    report = recompute_cost(g, 14 * 14 * 1024 * 4 - 1)
    assert report.activation == "features.transition3.pool output 7x7x512"
    assert any("costs fewer MACs" in note for note in report.notes)
    assert report.macs == recompute_cost(g, 7 * 7 * 1024 * 4).macs


def test_recompute_int8_scales_the_peak_only():
    fp32 = recompute_cost(graph("mobilenetv2_100"), rnnpool_budget("mobilenetv2_100"))
    int8 = recompute_cost(graph("mobilenetv2_100"), rnnpool_budget("mobilenetv2_100") // 4, dtype_bytes=1)
    assert int8.macs == fp32.macs and 4 * int8.peak_bytes == fp32.peak_bytes


def test_recompute_bad_budgets_raise():
    g = graph("mobilenetv2_100")
    for budget in (0, -1, 1.5, True, "1MB"):
        with pytest.raises(ValueError, match="budget_bytes must be a positive int"):
            recompute_cost(g, budget)
    # below the smallest peak reachable (the last layers: 7x7x320 in + 7x7x1280 out hold 0.30 MiB; the
    # 1x1 head conv's output alone 0.24 MiB)
    with pytest.raises(ValueError, match=r"below the smallest peak recomputation reaches, 245.0 KiB"):
        recompute_cost(g, 200 * KIB)
    with pytest.raises(ValueError, match="dtype_bytes must be 1"):
        recompute_cost(g, MIB, dtype_bytes=3)
    with pytest.raises(ValueError, match="unknown structure"):
        recompute_cost(Gate(), MIB, (3, 16, 16))


def test_recompute_lazy_export():
    assert leanvision.recompute_cost is recompute_cost


def test_cli_memory_budget_adds_the_recompute_line():
    result = CliRunner().invoke(app, ["memory", "mobilenetv2_100", "--budget-kib", "245"])
    text = " ".join(result.stdout.split())
    assert result.exit_code == 0 and "layer peak 392.0 KiB at features.4" in text
    assert "rebuilding features.3 output 56x56x24 patch by patch" in text
    result = CliRunner().invoke(app, ["memory", "mobilenetv2_100", "--budget-kib", "100"])
    text = " ".join(result.stdout.split())
    assert result.exit_code == 0 and "below the smallest peak recomputation reaches, 245.0 KiB" in text
