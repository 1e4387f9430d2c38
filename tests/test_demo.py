"""The main job (`leanvision demo`) and the low-resolution networks it compares."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import leanvision
from leanvision import create_model
from leanvision.analysis.memory import peak_memory
from leanvision.cli import app
from leanvision.engine import data as data_module
from leanvision.experiments.demo import DEMO_DATA, DEMO_FALLBACK, DEMO_MODELS, DemoConfig, separation

runner = CliRunner()


def test_lowres_networks_keep_the_stem_at_full_resolution():
    rexnet = create_model("rexnet_100_lowres", num_classes=10, in_chans=1)
    assert rexnet.total_stride == 16
    assert rexnet.eval().forward_features(torch.randn(1, 1, 32, 32)).shape[-2:] == (2, 2)
    assert [f["reduction"] for f in rexnet.feature_info] == [1, 2, 4, 8, 16]
    # only the stride differs from the paper's network: the same weights
    paper = create_model("rexnet_100", num_classes=10, in_chans=1)
    assert [p.shape for p in rexnet.parameters()] == [p.shape for p in paper.parameters()]
    mobilenet = create_model("mobilenetv2_100_lowres", num_classes=10)
    assert mobilenet.total_stride == 16 and mobilenet(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in mobilenet.parameters()) == sum(
        p.numel() for p in create_model("mobilenetv2_100", num_classes=10).parameters()
    )
    with pytest.raises(ValueError, match="stem_stride must be 1 or 2"):
        create_model("rexnet", stem_stride=4)


def test_rexnet_rnnpool_replaces_the_high_resolution_stages():
    model = create_model("rexnet_100_lowres_rnnpool", num_classes=10, in_chans=1)
    assert type(model.features[0]).__name__ == "RNNPoolLayer"
    assert [f["reduction"] for f in model.feature_info] == [1, 4, 8, 16]
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    # the five blocks at 1/1 .. 1/4 resolution are gone: 16 - 5 bottlenecks, then the head conv
    assert len(model.features) == 1 + 11 + 1
    base = peak_memory("rexnet_100_lowres", (1, 28, 28), num_classes=10, in_chans=1)
    small = peak_memory(model, (1, 28, 28))
    # layer convention: the stem's 32 x 28 x 28 output and the first block's 16 x 28 x 28 output, fp32
    assert base.peak_bytes == (32 + 16) * 28 * 28 * 4 and base.peak_layer == "features.0"
    assert small.peak_bytes <= base.peak_bytes / 4


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(
        app,
        ["demo", "--data", "synthetic:lines,train=64,val=32", "--epochs", "1", "--img-size", "16",
         "--seeds", "0,1", "--out", str(out), "--latency-seconds", "0.05"],
    )  # fmt: skip
    assert result.exit_code == 0, result.stdout
    assert result.stdout.index("leanvision demo: train 3 networks") < result.stdout.index("training")
    assert "once per seed (0, 1;" in result.stdout and "generated: Fashion-MNIST" not in result.stdout
    report = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in report["rows"]] == list(DEMO_MODELS) and report["input_size"] == [1, 16, 16]
    assert report["seeds"] == [0, 1] and report["data"] == "synthetic:lines,train=64,val=32"
    for row in report["rows"]:
        model = create_model(row["model"], num_classes=9, in_chans=1)
        assert row["params"] == sum(p.numel() for p in model.parameters())
        # one training run per seed; the row's accuracies are theirs, in seed order
        summaries = [
            json.loads((out / row["model"] / f"seed{s}" / "summary.json").read_text()) for s in (0, 1)
        ]
        assert [s["config"]["seed"] for s in summaries] == [0, 1]
        assert row["accs"] == [s["val"]["acc"] for s in summaries]
        assert row["acc"] == pytest.approx(sum(row["accs"]) / 2)
        assert row["acc_spread"] == pytest.approx(abs(row["accs"][0] - row["accs"][1]))
        assert row["latency_ms"] > 0 and row["int8_latency_ms"] > 0 and row["macs"] > 0
        assert len(row["train_s"]) == 2
        assert row["model"] in result.stdout
    peak = {r["model"]: r["peak_ram_bytes"] for r in report["rows"]}
    assert peak["rexnet_100_lowres_rnnpool"] < peak["rexnet_100_lowres"] / 4
    rows = {r["model"]: r for r in report["rows"]}
    rnnpool = rows.pop("rexnet_100_lowres_rnnpool")
    # the RNNPool network's measured column is its streamed model's: far below its own eager forward and
    # below the baselines' eager forwards, and what measure_peak gives on a fresh streamed copy (memory does
    # not depend on the weights)
    assert rnnpool["measured_peak_of"] == "streamed"
    assert rnnpool["measured_peak_bytes"] == rnnpool["measured_streamed_bytes"] == _streamed_peak((1, 16, 16))
    assert rnnpool["measured_streamed_bytes"] < rnnpool["measured_eager_bytes"] / 1.5  # 16x16: small maps
    for row in rows.values():
        assert row["measured_peak_of"] == "eager" and "measured_streamed_bytes" not in row
        # eager PyTorch holds at least the layer convention's tensors (and BN outputs, temporaries)
        assert row["measured_peak_bytes"] == row["measured_eager_bytes"] >= row["peak_ram_bytes"]
        assert rnnpool["measured_peak_bytes"] < row["measured_peak_bytes"] / 2
    table = (out / "table.md").read_text()
    assert table.count("\n| ") == 4 and "measured peak RAM" in table  # header + 3 models
    assert f"{rnnpool['measured_peak_bytes'] / 1024:.1f} KiB (streamed)" in table
    assert "test acc (seeds 0, 1)" in table and "ms int8 ORT (b=1)" in table
    for line in separation(report["rows"]):  # each pair of models: gap, spreads, verdict
        assert f"- {line}" in table and line in result.stdout
    assert "measured peak RAM" in result.stdout and "(streamed)" in result.stdout
    for plot in ("accuracy_vs_macs.png", "accuracy_vs_peak_ram.png"):
        assert (out / plot).stat().st_size > 5000


def test_separation_compares_the_gap_with_the_seeds():
    rows = [
        dict(model="a", accs=[80.0, 81.0], acc=80.5, acc_spread=1.0),
        dict(model="b", accs=[82.0, 84.0], acc=83.0, acc_spread=2.0),
        dict(model="c", accs=[83.5, 85.0], acc=84.25, acc_spread=1.5),
    ]
    assert separation(rows) == [
        "b - a: +2.50 points (seed spreads 2.00 and 1.00): apart",
        "c - a: +3.75 points (seed spreads 1.50 and 1.00): apart",
        "c - b: +1.25 points (seed spreads 1.50 and 2.00): within seed noise",  # 83.5 < 84.0
    ]


def test_demo_trains_on_fashion_mnist_where_installed(fashion_dir, tmp_path, monkeypatch):
    """The default data: Fashion-MNIST where its files are installed, else the generated fallback, which
    the plan names together with how to install the real data."""
    monkeypatch.setattr(data_module, "FASHION_MNIST_DIR", str(fashion_dir))
    assert DemoConfig().data_spec() == DEMO_DATA and "generated" not in DemoConfig().plan()
    monkeypatch.setattr(data_module, "FASHION_MNIST_DIR", str(tmp_path / "none"))
    assert DemoConfig().data_spec() == DEMO_FALLBACK
    assert f"on {DEMO_FALLBACK} (generated: Fashion-MNIST is not installed in {tmp_path / 'none'}; " in (
        DemoConfig().plan()
    )
    assert DemoConfig(data="synthetic:lines").data_spec() == "synthetic:lines"  # given: used as is
    data = data_module.build_dataset(DEMO_FALLBACK.replace("8000", "4").replace("2000", "2"), 28)
    assert (len(data.train), data.num_classes, data.image_size) == (4, 9, 28)


def _streamed_peak(input_size: tuple[int, int, int]) -> int:
    """measure_peak of the demo's RNNPool network, streamed, at batch 1 (random weights)."""
    model = create_model("rexnet_100_lowres_rnnpool", num_classes=9, in_chans=1).eval()
    x = torch.randn(1, *input_size)
    return leanvision.measure_peak(leanvision.stream(model, input_size), x).peak_bytes


@pytest.mark.slow
@pytest.mark.xfail(
    reason="at the demo's 32 px the torch RNN sweeps of one patch (kept for every step: 7x64x12 and "
    "6x2x32x12 floats) outweigh the layer convention's maps: streamed is ~2.5x layer",
    strict=False,
)
def test_streamed_demo_rnnpool_fits_the_layer_convention():
    layer = peak_memory(create_model("rexnet_100_lowres_rnnpool", num_classes=9, in_chans=1), (1, 32, 32))
    assert _streamed_peak((1, 32, 32)) <= 1.3 * layer.peak_bytes


def test_demo_bad_input(tmp_path):
    for args, message in (  # refused before the plan is printed and anything trained
        (["--models", "rexnet_100_lowres,rexnet_bogus"], "unknown model 'rexnet_bogus'"),
        (["--latency-seconds", "-1"], "latency_seconds > 0"),  # issue 20, item 7
        (["--seeds", "0,a"], "--seeds must be comma-separated integers such as 0,1, got '0,a'"),
        (["--seeds", "1,1"], "need at least one seed and distinct seeds, got (1, 1)"),
        (["--data", "nosuch"], "unknown data spec 'nosuch'"),
    ):
        refused = runner.invoke(app, ["demo", *args, "--out", str(tmp_path)])
        assert (
            refused.exit_code == 2 and message in refused.stdout and "leanvision demo:" not in refused.stdout
        )
    assert not any(tmp_path.iterdir())
    (tmp_path / "old.txt").write_text("x")
    busy = runner.invoke(app, ["demo", "--out", str(tmp_path)])
    assert busy.exit_code == 2 and "is not empty" in busy.stdout


def test_ctrl_c_stops_the_demo(tmp_path, monkeypatch):
    """Ctrl-C while the second model trains: nothing more trains, no table reports its partial accuracy,
    exit code 130 (issue 20, item 1)."""
    import leanvision.engine.train as engine

    real_train, calls = engine.train, []

    def train(config, **kwargs):
        calls.append(config.model)
        if len(calls) == 2:
            kwargs["on_epoch_end"] = lambda row: (_ for _ in ()).throw(KeyboardInterrupt)
        return real_train(config, **kwargs)

    monkeypatch.setattr(engine, "train", train)
    out = tmp_path / "demo"
    result = runner.invoke(
        app,
        ["demo", "--data", "synthetic:lines,train=64,val=32", "--epochs", "1", "--img-size", "16",
         "--out", str(out), "--latency-seconds", "0.05"],
    )  # fmt: skip
    assert result.exit_code == 130, result.stdout  # every model of the first seed trains before the second
    assert calls == list(DEMO_MODELS[:2]) and "interrupted" in result.stdout
    assert not (out / "results.json").exists() and not (out / "table.md").exists()
