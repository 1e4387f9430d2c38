"""`leanvision memory NAME --measured [--streamed]`: measured peaks beside the analytic conventions."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from leanvision.cli import app

runner = CliRunner()


def test_memory_measured_and_streamed_json():
    """At 112 px the VWW network's streamed forward fits 1.3x the layer convention (at 96 the RNN sweeps of
    one patch are a larger share of the small maps: ~1.45x) while the eager forward holds ~9x more."""
    result = runner.invoke(
        app,
        ["memory", "mobilenetv2_035_vww_rnnpool", "--input-size", "112", "--convention", "all", "--measured",
         "--streamed", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    reports = json.loads(result.stdout)
    assert [r["convention"] for r in reports] == ["layer", "min", "planner"]
    layer = reports[0]
    for report in reports:  # the measured figures ride along on every convention's report
        assert {k: report[k] for k in layer if k.startswith(("measured_", "streamed_"))} == {
            k: layer[k] for k in layer if k.startswith(("measured_", "streamed_"))
        }
    eager, streamed = layer["measured_peak_bytes"], layer["streamed_peak_bytes"]
    assert layer["input_size"] == [3, 112, 112]
    assert layer["peak_bytes"] <= streamed <= 1.3 * layer["peak_bytes"]
    assert streamed < eager / 5
    assert layer["streamed_peak_op"] and layer["measured_peak_op"]
    held = layer["streamed_live_at_peak"]
    assert held and held[0]["bytes"] <= streamed and all(t["bytes"] > 0 and t["shape"] for t in held)


def test_memory_measured_table_and_unchanged_json():
    args = ["memory", "mobilenetv2_035_vww", "--input-size", "64"]
    table = runner.invoke(app, [*args, "--measured"])
    assert table.exit_code == 0, table.output
    assert "measured, eager" in table.output and "measured, streamed" not in table.output
    assert "leanvision.measure_peak" in table.output
    plain = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert [r["convention"] for r in plain] == ["layer"] and not any(
        k.startswith("measured") for k in plain[0]
    )


def test_memory_streamed_needs_an_rnnpool_network():
    result = runner.invoke(app, ["memory", "mobilenetv2_035_vww", "--input-size", "96", "--streamed"])
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        "error: MobileNetV2 has no RNNPoolLayer to stream; for patch-based inference of its first blocks, "
        "pass split_blocks=K"
    ]


def test_memory_measured_is_fp32_only():
    result = runner.invoke(app, ["memory", "mobilenetv2_035_vww", "--measured", "--dtype", "int8"])
    assert result.exit_code == 2 and "--measured runs the model in fp32" in result.output


def test_memory_streamed_patch_based():
    result = runner.invoke(
        app,
        ["memory", "mobilenetv2_035", "--input-size", "64", "--streamed", "--split-blocks", "3", "--json"],
    )
    assert result.exit_code == 0, result.output
    layer = json.loads(result.stdout)[0]
    assert layer["streamed_split_blocks"] == 3 and layer["streamed_extra_macs"] >= 0
    assert layer["streamed_base_macs"] > 0
    assert layer["streamed_peak_bytes"] < layer["measured_peak_bytes"]
    refused = runner.invoke(app, ["memory", "mobilenetv2_035", "--split-blocks", "3"])
    assert refused.exit_code == 2 and "--split-blocks needs --streamed" in refused.output
