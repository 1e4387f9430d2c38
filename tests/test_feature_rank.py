"""Penultimate-feature spectra (ReXNet Section 6, Figure 5): values, summaries, loading, CLI, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from leanvision.analysis.cost import profile
from leanvision.analysis.feature_rank import penultimate_features, spectrum_of, summarize
from leanvision.cli import app
from leanvision.engine.data import build_dataset
from leanvision.engine.train import make_model
from leanvision.experiments.feature_rank import feature_spectrum
from leanvision.experiments.rexnet_factors import TABLE2, FactorNet, rexnet_factors, stem_widths
from leanvision.models.weights import save_checkpoint

DATA = "synthetic:lines,train=8,val=48"  # 9 classes, 1 channel, 32x32


@pytest.fixture(scope="module")
def data():
    return build_dataset(DATA)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, data):
    """Random-weight checkpoints of two small models for DATA, BN statistics made non-trivial."""
    folder = tmp_path_factory.mktemp("weights")
    paths = {}
    for name in ("mobilenetv2_035", "rexnet_090"):
        torch.manual_seed(0)
        model = make_model(name, data)
        with torch.no_grad():  # a few training-mode passes give BN running statistics of real data
            for _ in range(3):
                model.train()(torch.stack([data.train[i][0] for i in range(8)]))
        paths[name] = str(save_checkpoint(model, folder / f"{name}.pt"))
    return paths


def test_nuclear_norm_of_known_singular_values():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(50, 4, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(6, 4, generator=g, dtype=torch.float64))
    known = torch.tensor([8.0, 4.0, 2.0, 0.01], dtype=torch.float64)
    values = spectrum_of((u * known) @ v.T)
    assert torch.allclose(values[:4], known, atol=1e-9) and values[4:].abs().max() < 1e-9
    nuclear, normalized, rank = summarize(values)
    assert nuclear == pytest.approx(14.01)
    assert normalized == pytest.approx(14.01 / 8)
    assert rank == 3  # 0.01 is below 0.01 x 8


def test_normalized_nuclear_norm_is_scale_free_and_bounded():
    features = torch.randn(40, 10, generator=torch.Generator().manual_seed(1))
    _, normalized, _ = summarize(spectrum_of(features))
    _, scaled, _ = summarize(spectrum_of(123.0 * features))
    assert normalized == pytest.approx(scaled)
    assert 1 < normalized < 10
    assert summarize(spectrum_of(torch.ones(40, 10)))[1] == pytest.approx(1.0)


def test_singular_values_match_numpy_svd_of_features_taken_one_image_at_a_time(checkpoints, data):
    """Reference: each image alone through forward_features + forward_head(pre_logits) (eval), stacked,
    then numpy's SVD."""
    spectrum = feature_spectrum("rexnet_090", checkpoints["rexnet_090"], DATA, max_images=20)
    model = make_model("rexnet_090", data)
    model.load_state_dict(torch.load(checkpoints["rexnet_090"], weights_only=True))
    model.eval()
    with torch.no_grad():
        rows = [
            model.forward_head(model.forward_features(data.val[i][0][None]), pre_logits=True)[0]
            for i in range(20)
        ]
    reference = np.linalg.svd(torch.stack(rows).double().numpy(), compute_uv=False)
    assert (spectrum.images, spectrum.dim) == (20, model.num_features)
    assert len(spectrum.singular_values) == 20
    np.testing.assert_allclose(spectrum.singular_values, reference, rtol=1e-4, atol=1e-6 * reference[0])
    assert spectrum.nuclear_norm == pytest.approx(reference.sum(), rel=1e-4)
    assert spectrum.normalized_nuclear_norm == pytest.approx(reference.sum() / reference[0], rel=1e-4)


def test_features_are_the_classifier_input_and_model_mode_is_kept(data):
    model = make_model("mobilenetv2_035", data).train()
    features = penultimate_features(model, data.val, max_images=5, batch_size=2)
    assert features.shape == (5, model.last_channel) and model.training
    logits = model.eval()(torch.stack([data.val[i][0] for i in range(5)]))
    torch.testing.assert_close(model.get_classifier()(features), logits, rtol=1e-4, atol=1e-5)


def test_model_without_classifier_raises_clear_error(data):
    headless = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="has no classifier to take the penultimate features from"):
        penultimate_features(headless, data.val)


def test_bad_arguments_raise_clear_errors(checkpoints, data):
    with pytest.raises(ValueError, match="split must be one of val, train"):
        feature_spectrum("rexnet_090", checkpoints["rexnet_090"], DATA, split="test")
    with pytest.raises(ValueError, match="max_images must be at least 1"):
        penultimate_features(make_model("rexnet_090", data), data.val, max_images=0)
    with pytest.raises(ValueError, match=r"expected a non-empty feature matrix \[N, D\]"):
        spectrum_of(torch.zeros(3))


def test_cli_two_models_table_json_and_plot(checkpoints, tmp_path):
    runner = CliRunner()
    args = ["rank", "--data", DATA, "--max-images", "32"]
    for name, path in checkpoints.items():
        args += ["--model", name, "--checkpoint", path]
    plot = tmp_path / "cdf.png"
    result = runner.invoke(app, [*args, "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "rexnet_090" in result.stdout and "1280" in result.stdout  # names clipped at 80 columns
    assert plot.stat().st_size > 0
    rows = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert [r["model"] for r in rows] == ["mobilenetv2_035", "rexnet_090"]
    for row in rows:
        values = row["singular_values"]
        assert row["images"] == 32 and len(values) == min(32, row["dim"])
        assert values == sorted(values, reverse=True) and values[-1] >= 0
        assert 1 <= row["normalized_nuclear_norm"] <= len(values)
        assert 1 <= row["rank"] <= len(values)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", "rexnet_9000", "--checkpoint", "X"], "unknown model 'rexnet_9000'"),
        (["--model", "rexnet_090", "--checkpoint", "MOBILENET"], "does not fit ReXNet"),
        (["--model", "rexnet_090", "--model", "rexnet_090", "--checkpoint", "REXNET"], "got 2 models and 1"),
        (["--model", "rexnet_090", "--checkpoint", "REXNET", "--split", "test"], "split must be one of"),
    ],
)
def test_cli_bad_input_gives_clear_error(checkpoints, args, expected):
    args = [a.replace("MOBILENET", checkpoints["mobilenetv2_035"]) for a in args]
    args = [a.replace("REXNET", checkpoints["rexnet_090"]) for a in args]
    result = CliRunner().invoke(app, ["rank", "--data", DATA, *args])
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.stdout.split()), result.stdout


def test_training_checkpoint_of_another_model_is_refused(checkpoints, tmp_path):
    state = torch.load(checkpoints["mobilenetv2_035"], weights_only=True)
    path = tmp_path / "last.pt"
    torch.save({"model": state, "config": {"model": "mobilenetv2_035", "img_size": None}}, path)
    with pytest.raises(ValueError, match="is a checkpoint of model 'mobilenetv2_035', not 'rexnet_090'"):
        feature_spectrum("rexnet_090", str(path), DATA)
    spectrum = feature_spectrum("mobilenetv2_035", str(path), DATA, max_images=8)
    assert spectrum.images == 8 and spectrum.dim == 1280


# ReXNet Table 2 (leanvision repro rexnet-factors) lives here as it reports the final feature's nuclear norm.
def test_table2_networks_change_one_factor_each_at_matched_cost(data):
    widths = stem_widths(data, width=8, head=64)
    nets = [FactorNet(stem, f, 64, data.num_classes, data.channels) for stem, f in zip(widths, TABLE2)]
    assert [(f.expansion, f.block_ratio, f.exp_act) for f in TABLE2] == [
        (20, 0.22, "relu6"), (6, 0.22, "relu6"), (6, 0.8, "relu6"), (6, 0.8, "silu"),
    ]  # fmt: skip
    macs = [profile(net, (1, 32, 32)).macs for net in nets]
    assert all(abs(m / macs[0] - 1) < 0.1 for m in macs), macs
    for net, factors in zip(nets, TABLE2):
        stem, c1, c2, head = net.channels
        assert (c1, c2, head) == (round(stem / factors.block_ratio), round(c1 / factors.block_ratio), 64)
        first, second = net.features[0], net.features[1]
        assert first.conv_exp.out_channels == stem * factors.expansion
        assert second.conv_exp.out_channels == c1 * factors.expansion
        expected = nn.SiLU if factors.exp_act == "silu" else nn.ReLU6
        assert isinstance(first.conv_exp.act, expected) and isinstance(second.conv_exp.act, expected)
        assert isinstance(first.act_dw, nn.ReLU6) and second.use_shortcut
    assert widths[0] == 8 and widths[2] > 4 * widths[0]  # gentle channel growth needs a wider stem


def test_rexnet_factors_end_to_end(tmp_path):
    out = tmp_path / "factors"
    kwargs = dict(data="synthetic:lines,train=64,val=32", epochs=1, width=4, head=32, train_size=None)
    rows = rexnet_factors(out, log=lambda line: None, **kwargs)
    assert [r["network"] for r in rows] == ["baseline", "expansion", "block-ratio", "silu"]
    assert [r["expansion"] for r in rows] == [20, 6, 6, 6]
    assert [r["exp_act"] for r in rows] == ["relu6", "relu6", "relu6", "silu"]
    assert [r["paper"]["top1"] for r in rows] == [48.0, 52.1, 53.8, 54.6]
    for row in rows:
        assert 0 <= row["acc"] <= 100
        assert 0 < row["nuclear_norm"] < float("inf")
        assert 1 <= row["normalized_nuclear_norm"] <= 32 and 1 <= row["rank"] <= 32
        assert (out / f"{row['network']}-seed0" / "last.pt").is_file()
    assert json.loads((out / "rexnet_factors.json").read_text()) == rows
    with pytest.raises(ValueError, match="is not empty"):
        rexnet_factors(out, **kwargs)
    with pytest.raises(ValueError, match="is multi-label"):
        rexnet_factors(tmp_path / "other", data="synthetic:shapes,train=8,val=8")


def test_repro_rexnet_factors_cli(tmp_path):
    runner = CliRunner()
    args = ["repro", "rexnet-factors", "--out", str(tmp_path / "run"), "--epochs", "1"]
    result = runner.invoke(app, [*args, "--data", "synthetic:lines,train=32,val=16"])
    assert result.exit_code == 0, result.output
    assert "Table 2" in result.stdout and "54.6%" in result.stdout  # the paper's SiLU row
    assert len(json.loads((tmp_path / "run" / "rexnet_factors.json").read_text())) == 4
    two = runner.invoke(app, [*args, "--data", "fashion-mnist", "--data", "synthetic:lines"])
    assert two.exit_code == 2 and "takes one --data spec, got 2" in two.stdout
