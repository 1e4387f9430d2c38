"""RRR-Net experiments on generated Meta-Album folders: set listing, held-out split, forward block selection
(sequence, stop rule, resume) and the four-method runner through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from typer.testing import CliRunner

import leanvision
from conftest import make_meta_album
from leanvision.cli import app
from leanvision.engine.data import build_dataset, metaalbum_datasets
from leanvision.experiments.rrr import SelectConfig, block_sequence, select_blocks
from leanvision.experiments.rrr.select import stop_reason, warm_start_
from leanvision.models.rrrnet import RRRNet
from leanvision.models.weights import read_state_dict


@pytest.fixture
def meta_set(tmp_path) -> Path:
    for shade, code in ((0, "AAA_Micro"), (120, "BBB_Micro")):
        make_meta_album(tmp_path / "SET" / code, shade)
    return tmp_path / "SET"


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return str(path)


def test_block_sequence_adds_one_block_per_step_front_to_back():
    assert block_sequence("resnet18") == [
        (1, 1, 1, 1),
        (2, 1, 1, 1),
        (2, 2, 1, 1),
        (2, 2, 2, 1),
        (2, 2, 2, 2),
    ]
    sequence = block_sequence("resnet152")
    assert len(sequence) == 47  # the notes' 47 configurations
    assert sequence[:4] == [(1, 1, 1, 1), (2, 1, 1, 1), (3, 1, 1, 1), (3, 2, 1, 1)]
    assert sequence[-1] == (3, 8, 36, 3)
    assert all(sum(b) - sum(a) == 1 for a, b in zip(sequence, sequence[1:]))


def test_metaalbum_set_listing_and_held_out_split(meta_set, tmp_path):
    specs = metaalbum_datasets(f"metaalbum:{meta_set},per_class=3")
    assert specs == [f"metaalbum:{meta_set / code},per_class=3" for code in ("AAA_Micro", "BBB_Micro")]
    assert metaalbum_datasets(specs[0]) == [specs[0]]
    (tmp_path / "EMPTY").mkdir()
    with pytest.raises(FileNotFoundError, match="no Meta-Album dataset in .*EMPTY"):
        metaalbum_datasets(f"metaalbum:{tmp_path / 'EMPTY'}")
    with pytest.raises(ValueError, match="expected a Meta-Album spec"):
        metaalbum_datasets("cifar10:/data")

    full = build_dataset(specs[0], img_size=16)
    held = build_dataset(specs[0] + ",holdout=1", img_size=16)
    train, test = set(full.train.samples), set(full.val.samples)
    assert (len(held.train), len(held.val)) == (4, 2)  # 2 + 1 per class, from the 3 training images
    assert set(held.train.samples) | set(held.val.samples) == train  # the test part is never read
    assert not set(held.train.samples) & set(held.val.samples) and not set(held.val.samples) & test
    assert sorted(i for _, i in held.val.samples) == [0, 1]
    with pytest.raises(ValueError, match="0 <= holdout < per_class"):
        build_dataset(specs[0] + ",holdout=3")


def test_malformed_labels_csv_names_the_fault(tmp_path):
    make_meta_album(tmp_path / "DS", shade=0)
    labels = tmp_path / "DS" / "labels.csv"
    rows = labels.read_text().splitlines()
    labels.write_text("\n".join([*rows[:2], "c1_00.png", *rows[3:]]) + "\n")  # a short row
    with pytest.raises(ValueError, match="line 3: empty FILE_NAME or CATEGORY"):
        build_dataset(f"metaalbum:{tmp_path / 'DS'}")
    labels.write_text(rows[0] + "\n")
    with pytest.raises(ValueError, match="header but no rows"):
        build_dataset(f"metaalbum:{tmp_path / 'DS'}")


def test_stop_rule():
    steps = [{"val_acc": acc} for acc in (50.0, 70.0, 60.0, 70.0)]
    config = SelectConfig("w.pth", "metaalbum:D", patience=2)
    assert stop_reason(steps[:3], config, 47) is None
    assert stop_reason(steps, config, 47).startswith("patience=2")  # a tie is no improvement
    assert stop_reason(steps[:2], SelectConfig("w", "metaalbum:D", target=70.0), 47) == "target=70.0% reached"
    assert stop_reason(steps[:2], SelectConfig("w", "metaalbum:D", max_steps=2), 47) == "max_steps=2"
    assert stop_reason(steps, SelectConfig("w", "metaalbum:D"), 4) == "sequence done"
    assert stop_reason([], config, 47) is None


def test_select_resumes_after_an_interruption(meta_set, resnet18_file, tmp_path):
    def config(out: str, **changes) -> SelectConfig:
        spec = f"metaalbum:{meta_set / 'AAA_Micro'},per_class=4"
        settings = dict(epochs=1, holdout=2, img_size=32, batch_size=4, max_steps=3)
        return SelectConfig(resnet18_file, spec, "resnet18", str(tmp_path / out), **{**settings, **changes})

    whole = select_blocks(config("whole"))
    assert [s["blocks"] for s in whole["steps"]] == [[1, 1, 1, 1], [2, 1, 1, 1], [2, 2, 1, 1]]
    assert whole["stopped"] == "max_steps=3" and (tmp_path / "whole" / "select.png").is_file()
    for step, blocks in zip(whole["steps"], block_sequence("resnet18")):
        model = leanvision.create_model("rrrnet_resnet18", blocks=blocks, num_classes=2)
        assert step["params"] == sum(p.numel() for p in model.parameters())
        assert 0 <= step["val_acc"] <= 100

    class Interrupt(Exception):
        pass

    def interrupt_after_two(step: dict) -> None:
        if step["blocks"] == [2, 1, 1, 1]:
            raise Interrupt

    with pytest.raises(Interrupt):
        select_blocks(config("resumed"), on_step=interrupt_after_two)
    saved = json.loads((tmp_path / "resumed" / "select.json").read_text())
    assert [s["blocks"] for s in saved["steps"]] == [[1, 1, 1, 1], [2, 1, 1, 1]]
    first_checkpoint = tmp_path / "resumed" / saved["steps"][0]["checkpoint"]
    mtime = first_checkpoint.stat().st_mtime_ns
    trained = []
    resumed = select_blocks(config("resumed"), on_step=trained.append)
    assert [s["blocks"] for s in trained] == [[2, 2, 1, 1]]  # finished steps are not retrained
    assert first_checkpoint.stat().st_mtime_ns == mtime
    strip = [{k: v for k, v in s.items() if k != "checkpoint"} for s in whole["steps"]]
    assert [{k: v for k, v in s.items() if k != "checkpoint"} for s in resumed["steps"]] == strip
    assert (resumed["stopped"], resumed["best"]) == (whole["stopped"], whole["best"])
    assert select_blocks(config("resumed"), on_step=trained.append)["steps"] == resumed["steps"]
    assert len(trained) == 1  # a finished selection trains nothing more
    with pytest.raises(ValueError, match=r"other settings \(epochs differ\)"):
        select_blocks(config("resumed", epochs=2))

    # warm start: the kept tensors come from the previous step, the added block from the pretrained file
    model = RRRNet("resnet18", (2, 2, 1, 1), num_classes=2).load_pretrained(resnet18_file)
    warm_start_(model, first_checkpoint.parent.parent / "2-1-1-1" / "last.pt")
    previous = read_state_dict(first_checkpoint.parent.parent / "2-1-1-1" / "last.pt")
    pretrained = torch.load(resnet18_file)
    assert torch.equal(model.layer1[1].conv1.weight, previous["layer1.1.conv1.weight"])
    assert torch.equal(model.branches[0].fc.weight, previous["branches.0.fc.weight"])
    assert torch.equal(model.layer2[1].conv1.weight, pretrained["layer2.1.conv1.weight"])


def test_select_bad_input(meta_set, resnet18_file, tmp_path):
    with pytest.raises(ValueError, match="pass --data metaalbum:DIR"):
        select_blocks(SelectConfig(resnet18_file, "synthetic:shapes", "resnet18", str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="holds a set of datasets, pass one"):
        select_blocks(SelectConfig(resnet18_file, f"metaalbum:{meta_set}", "resnet18", str(tmp_path)))
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'"):
        select_blocks(SelectConfig(resnet18_file, f"metaalbum:{meta_set}", "resnet19", str(tmp_path)))


def test_runner_end_to_end_through_the_cli(meta_set, resnet18_file, tmp_path):
    out = tmp_path / "run"
    args = ["rrr", "run", "--weights", resnet18_file, "--data", f"metaalbum:{meta_set},per_class=4",
            "--backbone", "resnet18", "--epochs", "1", "--img-size", "32", "--branches", "2",
            "--warm-epochs", "1", "--latency-seconds", "0", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for text in ("AAA_Micro", "BBB_Micro", "mean", "linear probe", "RRR-Net N=2", "latency"):
        assert text in result.output
    report = json.loads((out / "results.json").read_text())
    assert sorted((r["dataset"], r["method"]) for r in report["results"]) == sorted(
        (d, m)
        for d in ("AAA_Micro", "BBB_Micro")
        for m in ("linear_probe", "fine_tune", "resnet1111", "rrrnet")
    )
    assert all(0 <= r["acc"] <= 100 for r in report["results"])
    methods = report["methods"]
    networks = [("linear_probe", (2, 2, 2, 2), 1), ("fine_tune", (2, 2, 2, 2), 1),
                ("resnet1111", (1, 1, 1, 1), 1), ("rrrnet", (1, 1, 1, 1), 2)]  # fmt: skip
    for method, blocks, branches in networks:
        model = leanvision.create_model("rrrnet_resnet18", blocks=blocks, branches=branches, num_classes=2)
        assert methods[method]["params"] == sum(p.numel() for p in model.parameters())
        accs = [r["acc"] for r in report["results"] if r["method"] == method]
        assert methods[method]["mean_acc"] == pytest.approx(sum(accs) / 2)
        assert methods[method]["latency_ms"] > 0
    assert methods["resnet1111"]["macs"] < methods["rrrnet"]["macs"] < methods["fine_tune"]["macs"]
    assert (out / "accuracy_vs_macs.png").is_file()

    # the linear probe moved only the classifier: every other tensor, BN statistics included, is pretrained
    probe = read_state_dict(out / "AAA_Micro" / "linear_probe" / "last.pt")
    pretrained = torch.load(resnet18_file)
    body = [k for k in probe if not k.startswith("branches.0.fc") and not k.endswith("num_batches_tracked")]
    assert all(torch.equal(probe[k], pretrained[k.replace("branches.0.", "")]) for k in body)
    tuned = read_state_dict(out / "AAA_Micro" / "fine_tune" / "last.pt")
    assert not torch.equal(tuned["layer1.0.conv1.weight"], pretrained["layer1.0.conv1.weight"])

    again = CliRunner().invoke(app, args)  # finished: nothing is retrained, the same table comes back
    assert again.exit_code == 0 and "AAA_Micro fine_tune: test acc" not in again.output
    assert json.loads((out / "results.json").read_text()) == report


def test_runner_bad_input(meta_set, resnet18_file, tmp_path):
    base = ["rrr", "run", "--weights", resnet18_file, "--backbone", "resnet18", "--out", str(tmp_path / "r")]
    bad = CliRunner().invoke(
        app, [*base, "--data", f"metaalbum:{meta_set}", "--methods", "fine_tune,distill"]
    )
    assert bad.exit_code == 2 and "unknown method(s) ['distill']" in " ".join(bad.output.split())
    (tmp_path / "EMPTY").mkdir()
    empty = CliRunner().invoke(app, [*base, "--data", f"metaalbum:{tmp_path / 'EMPTY'}"])
    assert empty.exit_code == 2 and "no Meta-Album dataset" in " ".join(empty.output.split())


def test_cli_select_prints_the_steps_and_continues(meta_set, resnet18_file, tmp_path):
    data = f"metaalbum:{meta_set / 'BBB_Micro'},per_class=4"
    args = ["rrr", "select", "--weights", resnet18_file, "--data", data,
            "--backbone", "resnet18", "--epochs", "1", "--holdout", "1", "--img-size", "32",
            "--out", str(tmp_path / "sel")]  # fmt: skip
    first = CliRunner().invoke(app, [*args, "--max-steps", "1"])
    assert first.exit_code == 0, first.output
    assert "blocks [1, 1, 1, 1]" in first.output and "stopped: max_steps=1" in first.output
    more = CliRunner().invoke(app, [*args, "--max-steps", "2"])  # the stop rule may change: one more step
    assert more.exit_code == 0, more.output
    assert "blocks [1, 1, 1, 1]:" not in more.output and "blocks [2, 1, 1, 1]:" in more.output
    assert "2 1 1 1" in more.output and "(best)" in more.output
    state = json.loads((tmp_path / "sel" / "select.json").read_text())
    assert [s["blocks"] for s in state["steps"]] == [[1, 1, 1, 1], [2, 1, 1, 1]]
    bad = CliRunner().invoke(app, [*args[:-2], "--out", str(tmp_path / "bad"), "--patience", "0"])
    assert bad.exit_code == 2 and "need patience >= 1" in " ".join(bad.output.split())
