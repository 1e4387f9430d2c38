"""RRR-Net: sizes of the reference notes, reduction by name, branch widths and init, fused path, training."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import Bottleneck
from typer.testing import CliRunner

import leanvision
from conftest import randomize_
from leanvision.analysis.cost import profile
from leanvision.cli import app
from leanvision.deploy import FusedRRRNet
from leanvision.engine.data import DataSplits, TensorImages
from leanvision.errors import CheckpointError
from leanvision.experiments.rrr import BranchTrainer, fit_rrr
from leanvision.models.rrrnet import RRRNet, branch_widths, count_branch_params

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def resnet152() -> torchvision.models.ResNet:
    """A full torchvision ResNet-152 (20 classes) with random weights and BN statistics: built once."""
    return randomize_(torchvision.models.resnet152(num_classes=20), seed=1)


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(randomize_(torchvision.models.resnet50(num_classes=20), seed=2).state_dict(), path)
    return str(path)


def through_kept_blocks(full: torch.nn.Module, blocks: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
    """The full network's logits when only the first blocks of each stage run."""
    x = full.maxpool(full.relu(full.bn1(full.conv1(x))))
    for stage, kept in zip((full.layer1, full.layer2, full.layer3, full.layer4), blocks):
        x = stage[:kept](x)
    return full.fc(torch.flatten(full.avgpool(x), 1))


def test_sizes_and_macs_match_the_notes(resnet152):
    with torch.device("meta"):  # 58M parameters: counted without allocating them
        full = leanvision.create_model("rrrnet_resnet152", blocks=(3, 8, 36, 3), num_classes=20)
    assert sum(p.numel() for p in full.parameters()) == 58_184_788
    assert sum(p.numel() for p in resnet152.parameters()) == 58_184_788
    assert {k.replace("branches.0.", "") for k in full.state_dict()} == set(resnet152.state_dict())
    reduced = leanvision.create_model("rrrnet_resnet152", num_classes=20)
    rrr = leanvision.create_model("rrrnet_resnet152", branches=8, num_classes=20)
    for model, params, macs in [(reduced, 8_056_916, 0.479e9), (rrr, 8_034_120, 0.546e9)]:
        report = profile(model, 128)
        assert report.params == params
        assert abs(report.macs - macs) / macs < 0.01
    stem = sum(p.numel() for _, m in rrr.stages() for p in m.parameters())
    assert stem == 463_936
    assert [sum(p.numel() for p in b.parameters()) for b in rrr.branches] == [946_273] * 8


@pytest.mark.slow
def test_full_resnet152_macs(resnet152):
    report = profile(leanvision.create_model("rrrnet_resnet152", blocks=(3, 8, 36, 3), num_classes=20), 128)
    assert report.params == 58_184_788 and abs(report.macs - 3.76e9) / 3.76e9 < 0.01
    assert report.macs == profile(resnet152, 128).macs


@pytest.mark.parametrize(
    "branches, widths, branch_params",
    [(1, (256, 512, 0), 7_592_980), (2, (175, 356, 6), 3_778_813), (4, (119, 247, 9), 1_896_810),
     (8, (79, 170, 11), 946_273), (16, (51, 115, 13), 466_138)],
)  # fmt: skip
def test_width_rule(branches, widths, branch_params):
    assert branch_widths("resnet152", (1, 1, 1, 1), branches, 20) == widths
    model = RRRNet("resnet152", branches=branches, num_classes=20)
    assert sum(p.numel() for p in model.branches[0].parameters()) == branch_params
    assert branches * branch_params <= 7_592_980  # the unsplit layer3[0] + layer4[0] + fc
    if widths[2] > 0:  # s is the smallest shift: one less gives too many parameters
        wider = (widths[0] + 1, widths[1] + 1)
        assert branches * count_branch_params(Bottleneck, wider, (1, 1), 20) > 7_592_980


def test_reduced_resnet152_equals_full_through_kept_blocks(resnet152):
    for blocks in [(1, 1, 1, 1), (3, 2, 5, 2)]:
        model = RRRNet("resnet152", blocks, num_classes=20)
        model.load_backbone_(resnet152.state_dict())
        model.eval()
        with torch.no_grad():
            expected = through_kept_blocks(resnet152, blocks, X)
            logits = model.forward_branches(X)[:, 0]
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(model(X), F.log_softmax(expected, 1), rtol=1e-4, atol=1e-4)


def test_reduce_from_files_torchvision_and_timm(tmp_path, resnet50_file):
    full = torchvision.models.resnet50(num_classes=20)
    full.load_state_dict(torch.load(resnet50_file))
    model = leanvision.create_model(
        "rrrnet_resnet50", blocks=(2, 1, 3, 1), num_classes=20, pretrained=resnet50_file
    )
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval().forward_branches(X)[:, 0], through_kept_blocks(full.eval(), (2, 1, 3, 1), X)
        )
    theirs = randomize_(timm.create_model("resnet18", num_classes=7), seed=4)
    path = tmp_path / "timm_resnet18.pth"
    torch.save(theirs.state_dict(), path)
    ours = leanvision.create_model(
        "rrrnet_resnet18", blocks=(2, 2, 2, 2), num_classes=7, pretrained=path
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_branches(X)[:, 0], theirs(X))
    fresh = leanvision.create_model("rrrnet_resnet18", num_classes=5, pretrained=path)  # new classifier
    assert fresh.branches[0].fc.weight.shape == (5, 512)


def test_split_branches_start_from_kernel_slices(resnet50_file):
    pretrained = torch.load(resnet50_file)
    model = RRRNet("resnet50", branches=2, num_classes=20).load_pretrained(resnet50_file)
    p3, p4, _ = model.widths
    kernel = pretrained["layer3.0.conv1.weight"]  # [256, 512, 1, 1]; 2 x 175 > 256 rows: wraps
    first, second = (b.layer3[0].conv1.weight for b in model.branches)
    assert torch.equal(first, kernel[:p3])
    assert torch.equal(second[: 256 - p3], kernel[p3:])
    rows = {tuple(r.flatten().tolist()) for r in kernel}
    assert all(tuple(r.flatten().tolist()) in rows for r in second[256 - p3 :])  # a random permutation
    conv2 = pretrained["layer4.0.conv2.weight"]  # [512, 512, 3, 3] -> [p4, p4, 3, 3]: first p4 inputs
    assert torch.equal(model.branches[0].layer4[0].conv2.weight, conv2[:p4, :p4])
    same = RRRNet("resnet50", branches=2, num_classes=20).load_pretrained(resnet50_file)
    other = RRRNet("resnet50", branches=2, num_classes=20, seed=1).load_pretrained(resnet50_file)
    assert torch.equal(same.branches[1].layer3[0].conv1.weight, second)
    assert not torch.equal(other.branches[1].layer3[0].conv1.weight, second)
    bn = model.branches[1].layer3[0].bn1  # branch BN and classifiers start fresh, the stem is pretrained
    assert torch.equal(bn.weight, torch.ones(p3)) and torch.equal(bn.running_mean, torch.zeros(p3))
    assert torch.equal(model.layer2[0].bn2.running_var, pretrained["layer2.0.bn2.running_var"])


@pytest.mark.parametrize(
    "backbone, blocks, branches",
    [("resnet152", (1, 1, 1, 1), 8), ("resnet50", (1, 2, 2, 2), 4), ("resnet18", (1, 1, 2, 1), 3)],
)
def test_fused_path_equals_loop(backbone, blocks, branches):
    model = randomize_(RRRNet(backbone, blocks, branches, num_classes=10), seed=5)
    fused = FusedRRRNet(model)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        loop = model.forward_branches(x)
        torch.testing.assert_close(fused.forward_branches(x), loop, rtol=0, atol=1e-5)
        torch.testing.assert_close(fused(x), model(x), rtol=0, atol=1e-5)
    assert loop.std() > 0.1  # not a trivially uniform output
    probs = model(x).exp()
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
    torch.testing.assert_close(probs, loop.softmax(-1).mean(1))


def test_branches_train_independently_with_a_frozen_warmed_stem():
    model = RRRNet("resnet18", branches=3, num_classes=4)
    with pytest.raises(ValueError, match="freeze the stem"):
        BranchTrainer(model)
    before_warm = model.bn1.running_mean.clone()
    model.freeze_stem()
    model.warm_stem([X + 1.0])
    assert not torch.equal(model.bn1.running_mean, before_warm)
    model.train()
    assert not model.bn1.training and not model.layer2[0].bn1.training and model.branches[0].fc.training
    assert not any(p.requires_grad for _, m in model.stages() for p in m.parameters())
    trainer = BranchTrainer(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.step(X, torch.tensor([0, 3]), branches=[1])
    after = model.state_dict()
    moved = {
        k.split(".")[1] if k.startswith("branches.") else "stem"
        for k in after
        if not torch.equal(after[k], before[k])
    }
    assert moved == {"1"}


def test_bad_input_errors(tmp_path, resnet50_file):
    with pytest.raises(ValueError, match="layer2 of resnet152 has 8 blocks"):
        RRRNet("resnet152", blocks=(1, 9, 1, 1))
    with pytest.raises(ValueError, match="layer4 of resnet18 has 2 blocks"):
        RRRNet("resnet18", blocks=(1, 1, 1, 3))
    with pytest.raises(ValueError, match="branches=70000 leaves no width"):
        RRRNet("resnet18", branches=70000, num_classes=20)
    with pytest.raises(ValueError, match="branches must be an integer >= 1"):
        RRRNet("resnet18", branches=0)
    with pytest.raises(CheckpointError, match="holds resnet50 weights .* rrrnet_resnet101"):
        RRRNet("resnet101").load_pretrained(resnet50_file)
    path = tmp_path / "mobilenet.pth"
    torch.save(leanvision.create_model("mobilenetv2_035").state_dict(), path)
    with pytest.raises(CheckpointError, match="not a torchvision/timm ResNet state_dict"):
        RRRNet("resnet50").load_pretrained(path)


def test_cli_reduce_writes_a_loadable_checkpoint(tmp_path, resnet50_file):
    out = tmp_path / "reduced.pth"
    args = ["rrr", "reduce", "--backbone", "resnet50", "--weights", resnet50_file, "--blocks", "1,2,1,1"]
    result = CliRunner().invoke(app, [*args, "--num-classes", "20", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "8,336,980 params" in result.output
    reduced = leanvision.create_model(
        "rrrnet_resnet50", blocks=(1, 2, 1, 1), num_classes=20, pretrained=str(out)
    )
    direct = leanvision.create_model(
        "rrrnet_resnet50", blocks=(1, 2, 1, 1), num_classes=20, pretrained=resnet50_file
    )
    assert all(torch.equal(a, b) for a, b in zip(reduced.state_dict().values(), direct.state_dict().values()))
    bad = CliRunner().invoke(app, [*args[:-1], "1,2,7,1", "--out", str(tmp_path / "other.pth")])
    assert bad.exit_code == 2 and "layer3 of resnet50 has 6 blocks" in bad.output


def test_cli_reduce_never_overwrites_silently(tmp_path, resnet50_file):
    """Issue 20, item 2: an existing --out needs --overwrite; the --weights file is never the output."""
    out = tmp_path / "reduced.pth"
    out.write_bytes(b"keep me")
    args = ["rrr", "reduce", "--backbone", "resnet50", "--weights", resnet50_file, "--blocks", "1,1,1,1"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 2 and "already exists; pass --overwrite" in result.output
    assert out.read_bytes() == b"keep me"
    before = Path(resnet50_file).read_bytes()
    for flags in ([], ["--overwrite"]):
        result = CliRunner().invoke(app, [*args, "--out", resnet50_file, *flags])
        assert result.exit_code == 2 and "is the --weights file" in result.output
    assert Path(resnet50_file).read_bytes() == before
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() != b"keep me"


def test_fit_rrr_trains_branches_on_a_frozen_warmed_stem():
    generator = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=generator)
    images[:12, 0] = 255  # class 0 is red: learnable in a few steps
    targets = torch.tensor([0] * 12 + [1] * 12)
    split = TensorImages(images, targets, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    data = DataSplits("generated", split, split, num_classes=2, channels=3, image_size=32)
    model = RRRNet("resnet18", branches=2, num_classes=2)
    stem_before = model.layer1[0].conv1.weight.clone()
    bn_before = model.bn1.running_mean.clone()
    result = fit_rrr(model, data, epochs=3, batch_size=8, warm_epochs=1)
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert torch.equal(model.layer1[0].conv1.weight, stem_before)  # frozen
    assert not torch.equal(model.bn1.running_mean, bn_before)  # warmed
    assert 0 <= result.val["acc"] <= 100 and result.val["samples"] == 24
