"""The RNNPool paper's networks: shapes, options, EdgeML VWW checkpoints, bad input."""

from __future__ import annotations

import pytest
import torch

import leanvision
from conftest import randomize_
from leanvision.errors import CheckpointError
from leanvision.layers import RNNPool, RNNPoolLayer
from leanvision.layers.downsample import DOWNSAMPLE_KINDS, create_downsample
from leanvision.models.mobilenet import MobileNetV1, MobileNetV2
from leanvision.models.rnnpool_nets import DenseNet
from test_rnnpool import load_golden

RNNPOOL_MODELS = [
    "mobilenetv1_rnnpool",
    "mobilenetv2_rnnpool",
    "mobilenetv2_035_vww_rnnpool",
    "efficientnet_b0_rnnpool",
    "resnet18_rnnpool",
    "densenet121_rnnpool",
    "googlenet_rnnpool",
]


@pytest.mark.parametrize("name", RNNPOOL_MODELS)
def test_forward_backward_and_rnnpool_output_size(name):
    model = leanvision.create_model(name, num_classes=10)
    layer = next(m for m in model.modules() if isinstance(m, RNNPoolLayer))
    seen = []
    layer.register_forward_hook(lambda m, i, o: seen.append(o.shape[-2:]))
    model.eval()
    out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 10)
    assert seen == [(28, 28)]  # 224 -> 112 (first conv) -> 28 (RNNPool), as paper Table 10 / Figure 2
    model.train()
    logits = model(torch.randn(2, 3, 224, 224))
    (logits[0] if isinstance(logits, tuple) else logits).sum().backward()
    assert layer.pool.rnn1.W.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", DOWNSAMPLE_KINDS)
def test_downsample_kinds_give_rnnpool_shape(kind):
    layer = create_downsample(kind, 32, hidden_size=16, patch_size=6, stride=4)
    assert layer(torch.randn(2, 32, 112, 112)).shape == (2, 64, 28, 28)
    layer = create_downsample(kind, 64, hidden_size=48, patch_size=8, stride=4)
    assert layer(torch.randn(1, 64, 112, 112)).shape == (1, 192, 28, 28)


@pytest.mark.parametrize(
    "build",
    [
        lambda kind: MobileNetV2(num_classes=10, downsample=kind),
        lambda kind: MobileNetV1(num_classes=10, downsample=kind),
        lambda kind: DenseNet(num_classes=10, downsample=kind),
    ],
    ids=["mobilenetv2", "mobilenetv1", "densenet121"],
)
@pytest.mark.parametrize("kind", ["avgpool", "renet"])
def test_downsample_option(build, kind):
    model = build(kind).eval()
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_last_pool_rnnpool_is_one_patch_over_the_whole_map():
    model = MobileNetV2(num_classes=10, width_mult=0.35, last_pool="rnnpool").eval()
    pool = model.global_pool
    assert isinstance(pool, RNNPool) and (pool.in_channels, pool.hidden1, pool.hidden2) == (1280, 320, 320)
    x = torch.randn(2, 3, 160, 192)  # a 5x6 last map: any size works
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), pool(feats))


def test_densenet_transition_pools_become_rnnpool():
    model = DenseNet(num_classes=10, downsample="rnnpool", transition_pool="rnnpool", last_pool="rnnpool")
    pools = [model.features.transition2.pool, model.features.transition3.pool]
    assert [(p.in_channels, p.pool.hidden1, p.patch_size, p.stride) for p in pools] == [
        (256, 64, (4, 4), (2, 2)),
        (512, 128, (4, 4), (2, 2)),
    ]
    assert model.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_features_only_levels_of_mobilenetv2_rnnpool():
    extractor = leanvision.create_model("mobilenetv2_rnnpool", features_only=True)
    maps = extractor(torch.randn(1, 3, 224, 224))
    assert [tuple(m.shape[1:]) for m in maps] == [
        (32, 112, 112),
        (64, 28, 28),
        (96, 14, 14),
        (1280, 7, 7),
    ]
    assert [f["reduction"] for f in extractor.feature_info] == [2, 8, 16, 32]


def test_vww_defaults_to_two_classes():
    assert leanvision.create_model("mobilenetv2_035_vww_rnnpool").num_classes == 2
    assert leanvision.create_model("mobilenetv2_035_vww_rnnpool", num_classes=5).num_classes == 5


def edgeml_vww_checkpoint(model: MobileNetV2, rnnpool_state: dict[str, torch.Tensor]) -> dict:
    """What EdgeML's train_visualwakewords.py saves for `model`'s weights: its key names (DataParallel
    prefix), and the reference's own RNNPool state_dict (aliases included) for the first RNNPool."""
    state = {}
    for key, value in model.state_dict().items():
        index, rest = key.removeprefix("features.").split(".", 1) if key.startswith("features.") else ("", "")
        if key.startswith("features.0."):
            state["features_init." + rest] = value
        elif index and int(index) >= 2:
            state[f"features.{int(index) - 2}.{rest}"] = value
        elif key.startswith("classifier."):
            state[key] = value
    state.update({f"rnn_model.{k}": v for k, v in rnnpool_state.items()})
    return {"model": {f"module.{k}": v for k, v in state.items()}, "acc": 91.2, "epoch": 7}


def test_loads_edgeml_vww_checkpoint(tmp_path):
    rnnpool_state, arrays = load_golden("rnnpool_layer_c8_h8_k6_s4.npz")  # C=8, h1=h2=8, as the VWW layer
    source = randomize_(leanvision.create_model("mobilenetv2_035_vww_rnnpool"), seed=3)
    torch.save(edgeml_vww_checkpoint(source, rnnpool_state), tmp_path / "model_mobilenet_rnnpool.pth")
    loaded = leanvision.create_model(
        "mobilenetv2_035_vww_rnnpool", pretrained=str(tmp_path / "model_mobilenet_rnnpool.pth")
    )
    loaded.eval()
    with torch.no_grad():
        out = loaded.features[1](torch.from_numpy(arrays["input"]))
        assert (out - torch.from_numpy(arrays["output"])).abs().max().item() <= 1e-5  # the golden RNNPool
        source.features[1] = RNNPoolLayer.from_edgeml(rnnpool_state, patch_size=6, stride=4)
        x = torch.randn(2, 3, 224, 224)
        torch.testing.assert_close(loaded(x), source.eval()(x))


def test_edgeml_checkpoint_of_another_width_is_rejected(tmp_path):
    rnnpool_state, _ = load_golden("rnnpool_layer_c8_h8_k6_s4.npz")
    source = leanvision.create_model("mobilenetv2_035_vww_rnnpool", width_mult=0.5)
    torch.save(edgeml_vww_checkpoint(source, rnnpool_state), tmp_path / "w05.pth")
    with pytest.raises(CheckpointError, match=r"features\.2\..*has shape .* the model expects"):
        leanvision.create_model("mobilenetv2_035_vww_rnnpool", pretrained=str(tmp_path / "w05.pth"))


def test_bad_options_name_what_was_expected():
    with pytest.raises(ValueError, match=r"downsample must be one of \('rnnpool', 'avgpool'"):
        MobileNetV2(downsample="bilinear")
    with pytest.raises(ValueError, match="last_pool must be 'avg' or 'rnnpool', got 'max'"):
        MobileNetV2(last_pool="max")
    with pytest.raises(ValueError, match="transition_pool must be 'avg' or 'rnnpool'"):
        DenseNet(transition_pool="max")
    with pytest.raises(ValueError, match="hidden_size must be 32"):
        leanvision.create_model("resnet18_rnnpool", hidden_size=16)
    with pytest.raises(ValueError, match="patch_size >= stride"):
        create_downsample("rnnpool", 32, hidden_size=16, patch_size=2, stride=4)
