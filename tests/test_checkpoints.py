"""Checkpoints: our layout, timm's (by name), clovaai's (by position), torchvision's, and mismatch errors."""

from __future__ import annotations

import pytest
import torch

import leanvision
from conftest import randomize_
from leanvision.errors import CheckpointError
from leanvision.models.weights import load_checkpoint, read_state_dict, save_checkpoint


@pytest.mark.parametrize("name", ["rexnet_100", "rexnet_130"])
def test_timm_checkpoint_gives_same_logits(name, tmp_path, image):
    timm = pytest.importorskip("timm")
    theirs = randomize_(timm.create_model(name))
    torch.save(theirs.state_dict(), tmp_path / "timm.pth")
    ours = leanvision.create_model(name, pretrained=str(tmp_path / "timm.pth")).eval()
    with torch.no_grad():
        assert (ours(image) - theirs(image)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["rexnet_100", "rexnet_130"])
def test_our_checkpoint_loads_into_timm(name, tmp_path, image):
    timm = pytest.importorskip("timm")
    ours = randomize_(leanvision.create_model(name), seed=3)
    save_checkpoint(ours, tmp_path / "ours.pth")
    theirs = timm.create_model(name).eval()
    theirs.load_state_dict(torch.load(tmp_path / "ours.pth", weights_only=True))
    with torch.no_grad():
        assert (ours(image) - theirs(image)).abs().max().item() <= 1e-5


def clovaai_state_dict(model) -> dict[str, torch.Tensor]:
    """Lay out our ReXNet / ReXNet-lite weights under the official NAVER key scheme (rexnet-reference.md).

    features.0/1 stem conv/BN; block b at features.{3+b}.out.{j} with j counting every module of the
    reference block (convs, BNs, activations, SE); head conv/BN at features.19/20; v1 classifier
    output.1 (a 1x1 conv), lite head output.0 conv, output.1 BN, output.4 classifier conv.
    """
    sd: dict[str, torch.Tensor] = {}

    def put(prefix: str, module: torch.nn.Module) -> None:
        for k, v in module.state_dict().items():
            sd[f"{prefix}.{k}"] = v.clone()

    put("features.0", model.stem.conv)
    put("features.1", model.stem.bn)
    lite = model.head.hidden is not None
    for b, block in enumerate(list(model.features)[:16]):
        p, j = f"features.{3 + b}.out", 0
        if block.conv_exp is not None:
            put(f"{p}.{j}", block.conv_exp.conv)
            put(f"{p}.{j + 1}", block.conv_exp.bn)
            j += 3  # conv, BN, activation
        put(f"{p}.{j}", block.conv_dw.conv)
        put(f"{p}.{j + 1}", block.conv_dw.bn)
        j += 3 if lite else 2  # the lite dw has its ReLU6 inside the conv unit
        if block.se is not None:
            put(f"{p}.{j}.fc.0", block.se.fc1)
            put(f"{p}.{j}.fc.1", block.se.bn)
            put(f"{p}.{j}.fc.3", block.se.fc2)
            j += 1
        if not lite:
            j += 1  # ReLU6 after the depthwise / SE
        put(f"{p}.{j}", block.conv_pwl.conv)
        put(f"{p}.{j + 1}", block.conv_pwl.bn)
    put("features.19", model.features[16].conv)
    put("features.20", model.features[16].bn)
    fc = model.head.fc
    if lite:
        put("output.0", model.head.hidden.conv)
        put("output.1", model.head.hidden.bn)
        sd["output.4.weight"] = fc.weight[:, :, None, None].clone()
        sd["output.4.bias"] = fc.bias.clone()
    else:
        sd["output.1.weight"] = fc.weight[:, :, None, None].clone()
        sd["output.1.bias"] = fc.bias.clone()
    return sd


@pytest.mark.parametrize("name", ["rexnet_100", "rexnet_090", "rexnet_lite_100", "rexnet_lite_130"])
def test_clovaai_checkpoint_gives_same_logits(name, tmp_path, image):
    source = randomize_(leanvision.create_model(name), seed=5)
    sd = clovaai_state_dict(source)
    assert len(sd) == len(source.state_dict())
    assert "features.16.out.0.weight" in sd  # block 13, not the head conv (which is timm's features.16)
    torch.save(sd, tmp_path / "clovaai.pth")
    loaded = leanvision.create_model(name, pretrained=str(tmp_path / "clovaai.pth")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), source(image), atol=1e-6, rtol=0)


def test_wrapped_and_prefixed_checkpoints(tmp_path):
    source = randomize_(leanvision.create_model("rexnet_lite_100"), seed=2)
    sd = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": sd}, tmp_path / "wrapped.pth")
    loaded = leanvision.create_model("rexnet_lite_100", pretrained=str(tmp_path / "wrapped.pth"))
    for k, v in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)


def test_safetensors_round_trip(tmp_path):
    source = randomize_(leanvision.create_model("mobilenetv1_100"), seed=4)
    save_checkpoint(source, tmp_path / "m.safetensors")
    loaded = leanvision.create_model("mobilenetv1_100", pretrained=str(tmp_path / "m.safetensors")).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x), source(x))


def test_torchvision_mobilenetv2_weights_load(tmp_path):
    import torchvision

    theirs = randomize_(torchvision.models.mobilenet_v2())
    torch.save(theirs.state_dict(), tmp_path / "tv.pth")
    ours = leanvision.create_model("mobilenetv2_100", pretrained=str(tmp_path / "tv.pth")).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_wrong_width_names_first_mismatching_tensor(tmp_path):
    save_checkpoint(leanvision.create_model("rexnet_130"), tmp_path / "x13.pth")
    with pytest.raises(
        CheckpointError, match=r"'stem.conv.weight' has shape \[42, 3, 3, 3\].*expects \[32, 3, 3, 3\]"
    ):
        leanvision.create_model("rexnet_100", pretrained=str(tmp_path / "x13.pth"))


def test_wrong_class_count_names_classifier(tmp_path):
    save_checkpoint(leanvision.create_model("rexnet_100", num_classes=10), tmp_path / "c10.pth")
    with pytest.raises(
        CheckpointError, match=r"'head.fc.weight' has shape \[10, 1280\].*expects \[1000, 1280\]"
    ):
        leanvision.create_model("rexnet_100", pretrained=str(tmp_path / "c10.pth"))


def test_clovaai_wrong_width_names_tensor(tmp_path):
    torch.save(clovaai_state_dict(leanvision.create_model("rexnet_130")), tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"'features.0.weight' \(model tensor 'stem.conv.weight'\)"):
        leanvision.create_model("rexnet_100", pretrained=str(tmp_path / "c.pth"))


def test_other_model_family_is_rejected(tmp_path):
    save_checkpoint(leanvision.create_model("mobilenetv1_100"), tmp_path / "v1.pth")
    with pytest.raises(CheckpointError, match="missing"):
        leanvision.create_model("rexnet_100", pretrained=str(tmp_path / "v1.pth"))


class Payload:
    """An arbitrary object a hostile checkpoint could carry."""


def test_missing_file_and_pickled_objects_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_state_dict(tmp_path / "nope.pth")

    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"objects other than tensors .*\(test_checkpoints.Payload\)"):
        read_state_dict(tmp_path / "evil.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        read_state_dict(tmp_path / "garbage.pth")


def bad_checkpoints(folder) -> dict[str, bytes]:
    """Files that are not checkpoints: empty, random bytes, a truncated one, a hostile pickle."""
    torch.save({"w": torch.zeros(100)}, folder / "whole.pt")
    whole = (folder / "whole.pt").read_bytes()
    torch.save({"obj": Payload()}, folder / "evil.pt")
    random = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return {
        "empty": b"", "random": bytes(random.tolist()), "truncated": whole[: len(whole) // 2],
        "hostile": (folder / "evil.pt").read_bytes(),
    }  # fmt: skip


def test_bad_files_are_named_and_never_unpickled(tmp_path):
    """Issue 20, items 6 and 9: every bad file is one CheckpointError naming it, and torch's hint to load
    with weights_only=False is never passed on; `train --resume` says so in one line, as `eval` does."""
    from typer.testing import CliRunner

    from leanvision.cli import app
    from leanvision.engine.train_state import load_training_checkpoint

    for kind, content in bad_checkpoints(tmp_path).items():
        path = tmp_path / f"{kind}.pth"
        path.write_bytes(content)
        for load in (read_state_dict, load_training_checkpoint):
            with pytest.raises(CheckpointError, match=str(path)) as caught:
                load(path)
            assert "weights_only=False" not in str(caught.value) and "weights_only` set" not in str(
                caught.value
            )
        run = tmp_path / kind
        run.mkdir()
        (run / "last.pt").write_bytes(content)
        args = ["train", "--model", "rexnet_100_lowres", "--data", "synthetic:lines,train=8,val=8", "--out"]
        result = CliRunner().invoke(app, [*args, str(run), "--resume"])
        assert result.exit_code == 2, (kind, result.output)
        assert (
            result.output.startswith("error:")
            and "last.pt" in result.output
            and "Traceback" not in result.output
        )
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="bad.safetensors is not a readable safetensors file"):
        read_state_dict(tmp_path / "bad.safetensors")


def test_non_strict_load_allows_new_classifier(tmp_path):
    source = randomize_(leanvision.create_model("rexnet_100"))
    sd = {k: v for k, v in source.state_dict().items() if not k.startswith("head.fc")}
    torch.save(sd, tmp_path / "backbone.pth")
    model = leanvision.create_model("rexnet_100", num_classes=5)
    load_checkpoint(model, tmp_path / "backbone.pth", strict=False)
    torch.testing.assert_close(model.stem.conv.weight, source.stem.conv.weight)
