"""The shared (timm) interface of every registered model, and torchvision and timm models by name."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

import leanvision
from conftest import randomize_
from leanvision.cli import app
from leanvision.errors import InvalidArgumentError, UnknownModelError
from leanvision.models.registry import IMAGENET_MEAN, get_model_config
from leanvision.models.weights import save_checkpoint


@pytest.fixture(autouse=True)
def tiny_inputs():
    """One thread, no oneDNN: at 16-64 px oneDNN's kernel building for each new convolution shape costs
    10x the convolutions, and a second thread only waits for the first (or for other processes)."""
    enabled, threads = torch.backends.mkldnn.enabled, torch.get_num_threads()
    torch.backends.mkldnn.enabled = False
    torch.set_num_threads(1)
    yield
    torch.backends.mkldnn.enabled = enabled
    torch.set_num_threads(threads)


# the detectors' interface is torchvision's detection one: tests/test_face_models.py, test_detection_models.py
DETECTORS = {n for p in ("rnnpool_face_*", "ssdlite_*", "*rcnn_fpn_*") for n in leanvision.list_models(p)}
CLASSIFIERS = sorted(set(leanvision.list_models()) - DETECTORS)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_shared_interface(name):
    torch.manual_seed(0)
    model = leanvision.create_model(name).eval()
    size = model.total_stride  # the smallest input: every level at least 1x1
    x = torch.randn(2, model.in_chans, size, size)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
        torch.testing.assert_close(model.forward_head(features), logits)
        assert logits.shape == (2, model.num_classes)
        assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
        model.reset_classifier(7)
        assert model.forward_head(features).shape == (2, 7) and model.num_classes == 7
        classifiers = model.get_classifier()
        classifiers = (
            classifiers if isinstance(classifiers, tuple) else (classifiers,)
        )  # RRR-Net: one a branch
        assert all(isinstance(fc, nn.Linear) and fc.out_features == 7 for fc in classifiers)
        assert sum(fc.in_features for fc in classifiers) == model.num_features
        assert {id(m) for m in model.modules()} >= {id(fc) for fc in classifiers}
        model.reset_classifier(0)
        assert model.forward_head(features).shape == (2, model.num_features) and model.num_classes == 0

        if model.feature_info is None:
            with pytest.raises(InvalidArgumentError, match=f"{name} has no features_only mode"):
                leanvision.create_model(name, features_only=True)
            return
        extractor = leanvision.create_model(name, features_only=True).eval()
        maps = extractor(x)
    assert extractor.feature_info == model.feature_info
    assert [(m.shape[1], m.shape[2], m.shape[3]) for m in maps] == [
        (info["num_chs"], size // info["reduction"], size // info["reduction"]) for info in model.feature_info
    ]


def test_torchvision_models_by_name():
    config = get_model_config("resnet18")  # not registered: torchvision's (RNNPool Table 1's base)
    assert (config.input_size, config.mean) == ((3, 224, 224), IMAGENET_MEAN)
    model = leanvision.create_model("resnet18", num_classes=10)
    assert type(model) is torchvision.models.ResNet and model.fc.out_features == 10
    assert type(leanvision.create_model("tv:densenet121")) is torchvision.models.DenseNet
    assert type(leanvision.create_model("densenet121")) is not torchvision.models.DenseNet  # ours first
    assert "resnet18" not in leanvision.list_models()


def test_timm_models_by_name():
    timm = pytest.importorskip("timm")
    assert get_model_config("timm:vit_tiny_patch16_384").input_size == (3, 384, 384)
    assert get_model_config("timm:vit_tiny_patch16_224").mean == (0.5, 0.5, 0.5)
    assert get_model_config("timm:resnet18.a1_in1k").input_size == (3, 224, 224)
    model = leanvision.create_model("timm:resnet18", num_classes=5, in_chans=1).eval()
    assert type(model) is timm.models.ResNet and model(torch.randn(1, 1, 32, 32)).shape == (1, 5)


def test_local_weights_of_torchvision_and_timm_models(tmp_path):
    timm = pytest.importorskip("timm")
    x = torch.randn(1, 3, 64, 64)
    theirs = randomize_(torchvision.models.resnet18(num_classes=10))
    save_checkpoint(theirs, tmp_path / "tv.pth")
    ours = leanvision.create_model("tv:resnet18", num_classes=10, pretrained=str(tmp_path / "tv.pth"))
    torch.testing.assert_close(ours.eval()(x), theirs(x))

    theirs = randomize_(timm.create_model("resnet18"), seed=1)
    save_checkpoint(theirs, tmp_path / "timm.safetensors")
    ours = leanvision.create_model("timm:resnet18", pretrained=str(tmp_path / "timm.safetensors"))
    torch.testing.assert_close(ours.eval()(x), theirs(x))
    extractor = leanvision.create_model(
        "timm:resnet18", pretrained=str(tmp_path / "timm.safetensors"), features_only=True, out_indices=(1, 3)
    )
    assert extractor.feature_info.channels() == [64, 256]
    expected = theirs.forward_intermediates(x, indices=(1, 3), intermediates_only=True)
    for fmap, reference in zip(extractor.eval()(x), expected):
        torch.testing.assert_close(fmap, reference)


def test_torchvision_models_have_no_features_only():
    with pytest.raises(InvalidArgumentError, match="tv:resnet18 has no features_only mode"):
        leanvision.create_model("tv:resnet18", features_only=True)


@pytest.mark.parametrize(
    "name, suggestion",
    [
        ("tv:resnet1", "tv:resnet18"),
        ("timm:efficientnet_b", "timm:efficientnet_b0"),
        ("timm:resnet18.nope", "timm:resnet18.a1_in1k"),
        ("resnet1", "resnet18"),
    ],
)
def test_unknown_external_names_list_close_matches(name, suggestion):
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    with pytest.raises(UnknownModelError, match=f"did you mean .*{suggestion}"):
        get_model_config(name)


def test_timm_names_without_timm_are_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(InvalidArgumentError, match="timm:resnet18 is a timm model, but timm .* pip install"):
        get_model_config("timm:resnet18")


def test_cli_takes_torchvision_and_timm_names():
    timm = pytest.importorskip("timm")
    runner = CliRunner()
    result = runner.invoke(app, ["profile", "timm:efficientnet_b0", "--input-size", "64", "--json"])
    assert result.exit_code == 0, result.output
    params = sum(p.numel() for p in timm.create_model("efficientnet_b0").parameters())
    assert json.loads(result.output)["params"] == params
    result = runner.invoke(app, ["memory", "resnet18", "--input-size", "64", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[0]["peak_bytes"] > 0
    result = runner.invoke(
        app, ["bench", "tv:resnet18", "--input-size", "32", "--min-seconds", "0", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["iterations"] >= 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pretrained=True), "path of a local checkpoint file"),
        (dict(in_chans=0), "in_chans must be a positive int"),
        (dict(width_mult=float("inf")), "width_mult must be a positive number, and finite"),
        (dict(width_mult=float("nan")), "width_mult must be a positive number, and finite"),
    ],
)
def test_create_model_refuses_bad_arguments_by_name(kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message):
        leanvision.create_model("rexnet", **kwargs)
