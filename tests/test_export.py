"""ONNX export (every model family, checked against ONNX Runtime), int8 QDQ quantisation, and evaluation
of the exported files; bad input."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

import leanvision
from leanvision.cli import app
from leanvision.errors import InvalidArgumentError
from leanvision.export import (
    OrtModule,
    calibration_batches,
    export_model,
    ort_session,
    quantize_int8,
    to_onnx,
)
from leanvision.export.onnx import exportable

runner = CliRunner()
TRAIN_SPEC = "synthetic:lines,train=256,val=64"
SLOW = {"rexnet_100", "mobilenetv2_rnnpool", "rexnet_100_lowres_rnnpool", "rnnpool_face_quant"}
FAMILIES = [  # every family at a small input; one of each in the fast suite (the exporter takes 20-45 s)
    pytest.param(name, size, id=name, marks=[pytest.mark.slow] if name in SLOW else [])
    for name, size in (
        ("rexnet_lite_100", (3, 64, 64)), ("mobilenetv2_100", (3, 64, 64)), ("resnet18_rnnpool", (3, 64, 64)),
        ("rrrnet_resnet18", (3, 64, 64)), ("rnnpool_face_m4", (1, 48, 64)), ("rexnet_100", (3, 64, 64)),
        ("mobilenetv2_rnnpool", (3, 64, 64)), ("rexnet_100_lowres_rnnpool", (1, 32, 32)),
        ("rnnpool_face_quant", (3, 64, 96)),
    )
]  # fmt: skip


def calibrated(name: str, input_size: tuple[int, int, int]) -> torch.nn.Module:
    """A model with random weights and BN statistics from a train-mode pass (outputs of real scale)."""
    torch.manual_seed(0)
    kwargs = {"in_chans": input_size[0]} if input_size[0] != 3 else {}
    model = leanvision.create_model(name, **kwargs)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = 1.0
        model.train()(torch.rand(4, *input_size)) if not hasattr(
            model, "head_outputs"
        ) else model.head_outputs(torch.rand(4, *input_size))
    return model.eval()


@pytest.mark.parametrize("name, input_size", FAMILIES)
def test_export_matches_pytorch_at_any_batch(tmp_path, name, input_size):
    model = calibrated(name, input_size)
    report = to_onnx(model, tmp_path / "m.onnx", input_size)
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    assert report.file_bytes > 0 and report.outputs == (
        ["loc", "conf", "priors"] if "face" in name else ["logits"]
    )
    session = ort_session(tmp_path / "m.onnx")
    x = torch.rand(5, *input_size)
    got = session.run(None, {"images": x.numpy()})
    exported, _ = exportable(model)
    with torch.no_grad():
        expected = [t.numpy() for t in _as_tuple(exported(x))]
        exact = [t.numpy() for t in _as_tuple(copy.deepcopy(exported).double()(x.double()))]
    assert [o.shape for o in got] == [e.shape for e in expected]
    for o, e, f in zip(got, expected, exact):
        # 1e-4 of the largest output, or (a deep random network amplifies rounding) as close to float64
        # as PyTorch's float32 result is, within 2x
        tolerance = max(1e-4 * np.abs(e).max(), 2 * np.abs(e - f).max(), 1e-7)
        assert np.abs(o - e).max() <= tolerance + np.abs(e - f).max()


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


def test_rnnpool_exports_as_explicit_ops(tmp_path):
    model = calibrated("rexnet_100_lowres_rnnpool", (1, 32, 32))
    to_onnx(model, tmp_path / "m.onnx", (1, 32, 32))
    ops = {node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert {"Sigmoid", "Tanh"} & ops and ({"MatMul", "Gemm"} & ops)  # FastGRNN's gates, no custom op


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """rexnet_100_lowres_rnnpool trained 2 epochs on synthetic:lines: the last.pt of a real run (int8 of
    random weights is noise against noise; a trained network's outputs carry signal)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    result = runner.invoke(
        app, ["train", "--model", "rexnet_100_lowres_rnnpool", "--data", TRAIN_SPEC, "--img-size", "32",
              "--epochs", "2", "--opt", "adamw", "--lr", "2e-3", "--wd", "0.05", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.stdout
    return out / "last.pt"


def test_int8_gives_qdq_nodes_close_to_fp32(tmp_path, trained_run):
    model = leanvision.create_model(
        "rexnet_100_lowres_rnnpool", in_chans=1, num_classes=9, pretrained=str(trained_run)
    )
    spec = "synthetic:lines,train=64,val=8"
    summary = export_model(
        model.eval(), tmp_path / "q.onnx", (1, 32, 32), int8=True, calib=spec, calib_images=64
    )
    ops = [node.op_type for node in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    assert summary["cosine_int8_vs_fp32"] >= 0.98
    assert summary["int8_weight_bytes"] < summary["fp32_weight_bytes"] / 3  # int8 weights and their scales
    expected_peak = leanvision.peak_memory(model, (1, 32, 32), dtype_bytes=1).peak_bytes
    assert summary["int8_activation_peak_bytes"] == expected_peak
    assert summary["calibration"] == {"spec": spec, "images": 64}


def test_calibration_batches_and_their_errors():
    batches = calibration_batches("synthetic:lines,train=40,val=8", (1, 32, 32), images=40, batch_size=16)
    assert [b.shape for b in batches] == [(16, 1, 32, 32), (16, 1, 32, 32), (8, 1, 32, 32)]
    with pytest.raises(InvalidArgumentError, match="1-channel images, the model takes 3"):
        calibration_batches("synthetic:lines,train=8,val=8", (3, 32, 32))
    faces = calibration_batches("synthetic:faces,train=4,val=6", (1, 48, 64), images=6, detector=True)
    assert faces[0].shape == (6, 1, 48, 64) and 0 <= faces[0].min() <= faces[0].max() <= 1
    with pytest.raises(InvalidArgumentError, match="calibration method must be one of"):
        quantize_int8("x.onnx", "y.onnx", [], method="kl")


def test_cli_export_and_eval_with_ort(tmp_path, trained_run):
    """`leanvision export` and `eval --backend ort|ort-int8`: ORT fp32 equals the eager eval."""
    name, results = "rexnet_100_lowres_rnnpool", {}
    for backend in ("eager", "ort", "ort-int8"):
        args = ["eval", "--model", name, "--checkpoint", str(trained_run), "--data", TRAIN_SPEC]
        result = runner.invoke(app, [*args, "--backend", backend, "--json"])
        assert result.exit_code == 0, result.stdout
        results[backend] = json.loads(result.stdout)
    assert results["ort"]["acc"] == results["eager"]["acc"] and results["ort"]["samples"] == 64
    assert results["ort"]["loss"] == pytest.approx(results["eager"]["loss"], rel=1e-4)
    assert abs(results["ort-int8"]["acc"] - results["eager"]["acc"]) <= 5  # 64 images: a few may flip
    out = tmp_path / "m.onnx"
    result = runner.invoke(
        app, ["export", name, "--num-classes", "9", "--in-chans", "1", "--input-size", "32",
              "--pretrained", str(trained_run), "--out", str(out), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.stdout
    summary = json.loads(result.stdout)
    assert summary["format"] == "fp32" and summary["input_size"] == [1, 32, 32] and out.is_file()
    assert OrtModule(out)(torch.rand(2, 1, 32, 32)).shape == (2, 9)
    again = runner.invoke(app, ["export", name, "--out", str(out)])
    assert again.exit_code == 2 and "already exists; pass --overwrite" in again.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "rexnet_bogus", "--out", "X"], "unknown model 'rexnet_bogus'"),
        (["export", "rexnet_100", "--int8", "--out", "X"], "--int8 needs calibration data"),
        (["export", "rexnet_100", "--calib", "synthetic:lines", "--out", "X"], "go with --int8"),
        (["export", "rexnet_100", "--input-size", "0x5", "--out", "X"], "--input-size must be N or HxW"),
        (["export", "rexnet_100", "--int8", "--calib", "x", "--calib-method", "kl", "--out", "X"], "minmax"),
        (["export", "rexnet_100", "--int8", "--calib", "synthetic:lines,train=8,val=8", "--input-size", "32",
          "--out", "X"], "1-channel images, the model takes 3"),
        (["eval", "--model", "rexnet_100", "--checkpoint", "c.pt", "--data", "synthetic:lines",
          "--backend", "tvm"], "--backend must be eager, ort or ort-int8"),
        (["eval", "--model", "rexnet_100", "--checkpoint", "c.pt", "--data", "synthetic:lines",
          "--backend", "ort", "--per-channel"], "--calib-method and --per-channel go with --backend"),
        (["eval", "--model", "rexnet_100", "--checkpoint", "c.pt", "--data", "synthetic:lines",
          "--backend", "ort-int8", "--calib-method", "kl"], "--calib-method must be minmax, entropy or"),
    ],
)  # fmt: skip
def test_export_bad_input(tmp_path, args, message):
    args = [str(tmp_path / a) if a == "X" else a for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in result.stdout, result.stdout


def test_export_refuses_an_input_the_model_cannot_take(tmp_path):
    with pytest.raises(InvalidArgumentError, match="input_size must be"):
        to_onnx(leanvision.create_model("rexnet_100"), tmp_path / "m.onnx", (3, 0, 64))
