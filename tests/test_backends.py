"""Inference backends side by side (`export.backends`, `bench --backend`, `compare --backend`): every
backend computes the eager model's outputs, the timing rows, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from leanvision.cli import app
from leanvision.errors import InvalidArgumentError
from leanvision.export.backends import PYTORCH_PATHS, PreparedBackends, check_backends, time_backends

runner = CliRunner()
INPUT = (3, 16, 16)


def small_net() -> nn.Module:
    """Conv-BN-ReLU twice, a residual add, pooling and a linear head; BN statistics of real scale."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
            self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
            self.head = nn.Linear(8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.a(x)
            return self.head((x + self.b(x)).mean((2, 3)))

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for bn in (net.a[1], net.b[1]):
            bn.momentum = 1.0
        net.train()(torch.rand(8, *INPUT))
    return net.eval()


@pytest.mark.parametrize("backend", ["deploy", "ort", "ort-int8"])
def test_every_backend_computes_the_eager_outputs(tmp_path, backend):
    net = small_net()
    x = torch.rand(2, *INPUT, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = net(x).numpy()
    calibration = [torch.rand(16, *INPUT).numpy()]
    got = PreparedBackends(net, x, tmp_path, calibration).get(backend).call()
    got = np.asarray(got[0] if isinstance(got, list) else got)
    if backend == "ort-int8":  # quantised: close, not equal
        cosine = float((got * expected).sum() / np.linalg.norm(got) / np.linalg.norm(expected))
        assert cosine >= 0.98
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_time_backends_rows_and_best():
    rows = time_backends(small_net(), ["eager", "best", "deploy", "ort", "eager"], INPUT, batch_size=2,
                         threads=1, min_rounds=4, min_seconds=0.0)  # fmt: skip
    assert [r["backend"] for r in rows] == ["eager", "best", "deploy", "ort"]  # in order, once each
    for row in rows:
        assert row["calls"] >= 4 and row["threads"] == 1 and row["batch_size"] == 2
        assert 0 < row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert row["images_per_s"] == pytest.approx(2e3 / row["median_ms"])
    best, deploy = rows[1], rows[2]
    assert best["detail"].split(";")[0] in PYTORCH_PATHS
    if best["detail"].startswith("deploy"):  # the same callable, timed once
        assert best["median_ms"] == deploy["median_ms"] and best["calls"] == deploy["calls"]
    else:
        assert best["median_ms"] != deploy["median_ms"]


def test_threads_are_restored():
    before = torch.get_num_threads()
    time_backends(small_net(), ["eager"], INPUT, threads=1, min_rounds=1, min_seconds=0.0)
    assert torch.get_num_threads() == before


def test_detector_backends_time_the_raw_outputs(tmp_path):
    import leanvision

    model = leanvision.create_model("rnnpool_face_m4").eval()
    x = torch.rand(1, 1, 48, 64)
    with torch.no_grad():
        loc, conf, _ = model.head_outputs(model.normalize(x))
    preparer = PreparedBackends(model, x, tmp_path, [x.numpy()])
    deploy_loc, deploy_conf, _ = preparer.get("deploy").call()
    torch.testing.assert_close(deploy_loc, loc, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(deploy_conf, conf, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "backends, message",
    [(["gpu"], "backend must be one of eager, deploy, compile, aot, ort, ort-int8, best; got 'gpu'"),
     ([], "got none")],
)  # fmt: skip
def test_unknown_backends_are_named(backends, message):
    with pytest.raises(InvalidArgumentError, match=message):
        check_backends(backends)


def test_bad_sizes():
    with pytest.raises(InvalidArgumentError, match="batch_size >= 1"):
        time_backends(small_net(), ["eager"], INPUT, batch_size=0)
    with pytest.raises(InvalidArgumentError, match="min_rounds >= 1"):
        time_backends(small_net(), ["eager"], INPUT, min_rounds=0)


def test_cli_bench_backends_json():
    result = runner.invoke(app, ["bench", "mobilenetv2_100", "--input-size", "32", "--backend", "eager",
                                 "--backend", "deploy", "--min-seconds", "0", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["model"] == "mobilenetv2_100"
    assert [r["backend"] for r in report["results"]] == ["eager", "deploy"]
    assert {"median_ms", "p10_ms", "p90_ms", "images_per_s"} <= set(report["results"][0])
    assert report["results"][0]["input_size"] == [3, 32, 32]


def test_cli_bench_backend_errors():
    unknown = runner.invoke(app, ["bench", "mobilenetv2_100", "--backend", "tensorrt"])
    assert unknown.exit_code == 2 and "backend must be one of eager, deploy" in unknown.output
    mixed = runner.invoke(app, ["bench", "mobilenetv2_100", "--backend", "ort", "--deploy"])
    assert (
        mixed.exit_code == 2 and "--backend replaces --channels-last, --compile and --deploy" in mixed.output
    )


def test_mono_detector_is_benched_in_its_channels():
    result = runner.invoke(app, ["bench", "rnnpool_face_m4", "--input-size", "32", "--backend", "eager",
                                 "--min-seconds", "0", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["results"][0]["input_size"] == [1, 32, 32]


def test_cli_compare_has_a_column_per_backend():
    result = runner.invoke(app, ["compare", "mobilenetv2_100", "--backend", "eager", "--backend", "deploy",
                                 "--min-seconds", "0", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert list(row["backends"]) == ["eager", "deploy"]
    assert row["latency_ms"] == row["backends"]["eager"]["median_ms"] > 0
    assert row["backends"]["deploy"]["calls"] >= 10


def test_aot_compiled_model_equals_eager_and_checks_its_shape():
    from leanvision.deploy import aot_compile, fuse_for_inference

    net = small_net()
    x = torch.rand(2, *INPUT, generator=torch.Generator().manual_seed(4))
    compiled = aot_compile(fuse_for_inference(net), x)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(
        InvalidArgumentError, match=r"takes inputs of shape \[2, 3, 16, 16\], got \[1, 3, 16, 16\]"
    ):
        compiled(x[:1])


def test_a_missing_onnxruntime_says_how_to_install_it(monkeypatch):
    import sys

    from leanvision.export import ort_session

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(
        InvalidArgumentError, match=r"pip install onnxruntime \(or leanvision's 'deploy' extra\)"
    ):
        ort_session("model.onnx")
