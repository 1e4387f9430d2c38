"""The `leanvision` command: models, profile, bench, compare, and its error messages."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from leanvision.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_models_lists_pattern():
    result = invoke("models", "rexnet_lite_*", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == [
        "rexnet_lite_100",
        "rexnet_lite_130",
        "rexnet_lite_150",
        "rexnet_lite_200",
    ]
    table = invoke("models", "rexnet_1*")
    assert "77.9%" in table.stdout  # paper top-1 of rexnet_100


def test_profile_json_and_table():
    result = invoke("profile", "mobilenetv2_100", "--json")
    data = json.loads(result.stdout)
    assert data["macs"] == 300_774_272 and data["params"] == 3_504_872
    assert data["counted"] == "conv, linear, matmul"
    table = invoke("profile", "rexnet_100", "--num-classes", "10", "--input-size", "128", "--per-layer")
    assert table.exit_code == 0 and "stem.conv" in table.stdout and "3,528,683 params" in table.stdout


def test_profile_errors_are_clear():
    unknown = invoke("profile", "rexnet_10")
    assert unknown.exit_code == 2 and "did you mean rexnet_100" in unknown.stdout
    small = invoke("profile", "rexnet_100", "--input-size", "16")
    assert small.exit_code == 2 and "must be >= 32" in small.stdout
    zero = invoke("profile", "rexnet_100", "--input-size", "0")
    assert zero.exit_code == 2 and "positive" in zero.stdout


def test_bench_json():
    result = invoke("bench", "rexnet_100", "--input-size", "64", "--min-seconds", "0.05", "--json")
    assert result.exit_code == 0, result.stdout
    data = json.loads(result.stdout)
    assert data["batch_size"] == 1 and data["iterations"] >= 1
    assert data["p10_ms"] <= data["median_ms"] <= data["p90_ms"]
    table = invoke("bench", "rexnet_100", "--input-size", "64", "--min-seconds", "0.05", "--deploy")
    assert table.exit_code == 0 and "deploy" in table.stdout and "calibrated" in table.stdout
    bad = invoke("bench", "rexnet_100", "--batch-size", "0")
    assert bad.exit_code == 2 and "batch_size" in bad.stdout


def test_bench_with_local_checkpoint(tmp_path):
    from leanvision import create_model, save_checkpoint

    path = save_checkpoint(create_model("rexnet_lite_100", num_classes=3), tmp_path / "lite.pth")
    args = ["--input-size", "64", "--min-seconds", "0.05"]
    ok = invoke("bench", "rexnet_lite_100", "--pretrained", str(path), "--num-classes", "3", *args)
    assert ok.exit_code == 0, ok.stdout
    assert "calibrated" not in ok.stdout  # timed with the checkpoint's weights
    mismatch = invoke("bench", "rexnet_lite_100", "--pretrained", str(path), *args)
    assert mismatch.exit_code == 2 and "'head.fc.weight' has shape [3, 1024]" in mismatch.stdout


def test_compare_json():
    result = invoke("compare", "rexnet_100", "mobilenetv2_100", "--min-seconds", "0.05", "--json")
    assert result.exit_code == 0, result.stdout
    rows = {r["model"]: r for r in json.loads(result.stdout)}
    assert rows["rexnet_100"]["params"] == 4_796_873 and rows["rexnet_100"]["paper_top1"] == 77.9
    assert rows["mobilenetv2_100"]["macs"] == 300_774_272


def test_import_is_cheap():
    code = "import sys, leanvision, leanvision.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_interleaved_latency_needs_a_round():
    import pytest
    from torch import nn

    from leanvision.experiments.compare import interleaved_latency_ms

    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        interleaved_latency_ms({"id": nn.Identity()}, (1, 4, 4), rounds=0)
