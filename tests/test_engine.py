"""Training and evaluation engine: determinism, exact resume, Ctrl-C, NaN, multi-label metrics, DDP, CLI."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import LINES, Tiny, tiny, tiny_config, without_time
from leanvision.cli import app
from leanvision.engine.data import build_dataset
from leanvision.engine.train import Meter, NonFiniteLossError, TrainConfig, lr_factor, train
from leanvision.engine.train_state import load_training_checkpoint

runner = CliRunner()


def test_lr_schedules():
    assert [lr_factor(s, 10, 2, "cosine") for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 10, 2, "cosine") == 1.0 and lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert [lr_factor(s, 8, 0, "step") for s in (3, 4, 6)] == pytest.approx([1.0, 0.1, 0.01])
    assert lr_factor(7, 8, 0, "none") == 1.0


def test_run_is_deterministic_and_resume_is_exact(tmp_path):
    full = train(tiny_config(tmp_path / "full"), model=tiny())
    again = train(tiny_config(tmp_path / "again"), model=tiny())
    assert without_time(full.history) == without_time(again.history)
    for a, b in zip(full.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)

    stopped = train(tiny_config(tmp_path / "part"), model=tiny(), on_epoch_end=lambda row: row["epoch"] == 1)
    assert stopped.status == "stopped" and len(stopped.history) == 1
    resumed = train(tiny_config(tmp_path / "part", resume=True), model=tiny())
    assert resumed.status == "completed"
    assert without_time(resumed.history) == without_time(full.history)
    assert resumed.val == full.val

    state = load_training_checkpoint(tmp_path / "part" / "last.pt")
    assert state["epoch"] == 3 and state["config"]["model"] == "tiny" and len(state["history"]) == 3
    with open(tmp_path / "part" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[1]["val_acc"]) == full.history[1]["val_acc"]
    summary = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 3
    assert summary["val"]["samples"] == 24 and (tmp_path / "part" / "curves.png").stat().st_size > 1000


def test_channels_last_trains_the_same_run(tmp_path):
    models = [tiny(), tiny()]
    for model in models:  # dropout draws its mask in memory order, so it would differ between the runs
        model.drop.p = 0.0
    contiguous = train(tiny_config(tmp_path / "a"), model=models[0])
    nhwc = train(tiny_config(tmp_path / "b", channels_last=True), model=models[1])
    assert nhwc.model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(without_time(contiguous.history), without_time(nhwc.history)):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-4), key
    state = load_training_checkpoint(tmp_path / "b" / "last.pt")
    assert state["config"]["channels_last"] is True


def record_training_dtypes(model: Tiny) -> set[torch.dtype]:
    """The dtypes of `model.conv`'s outputs in training mode, collected while it trains."""
    dtypes = set()

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if module.training:
            dtypes.add(out.dtype)

    model.conv.register_forward_hook(hook)
    return dtypes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_mixed_precision_trains_and_resumes(tmp_path):
    model = tiny()
    amp_dtypes = record_training_dtypes(model)
    stopped = train(
        tiny_config(tmp_path, device="cuda"), model=model, on_epoch_end=lambda row: row["epoch"] == 2
    )
    assert amp_dtypes == {torch.float16} and next(stopped.model.parameters()).is_cuda
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in stopped.history)
    assert load_training_checkpoint(tmp_path / "last.pt")["scaler"]["scale"] > 0  # the GradScaler was on
    resumed = train(tiny_config(tmp_path, device="cuda", resume=True), model=tiny())
    assert resumed.status == "completed" and [r["epoch"] for r in resumed.history] == [1, 2, 3]
    fp32 = tiny()
    fp32_dtypes = record_training_dtypes(fp32)
    train(tiny_config(tmp_path / "fp32", device="cuda", amp=False), model=fp32)
    assert fp32_dtypes == {torch.float32}


def test_ctrl_c_keeps_last_epoch_and_resume_continues(tmp_path, capsys):
    full = train(tiny_config(tmp_path / "full"), model=tiny())
    # 3 steps per epoch: the 5th training forward is in epoch 2
    interrupted = train(tiny_config(tmp_path / "run"), model=tiny(fail_at=5))
    assert interrupted.status == "interrupted" and len(interrupted.history) == 1
    assert "holds epoch 1; continue with --resume" in capsys.readouterr().out
    assert load_training_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "interrupted"
    resumed = train(tiny_config(tmp_path / "run", resume=True), model=tiny())
    assert without_time(resumed.history) == without_time(full.history)


def test_non_finite_loss_in_the_first_epoch_cites_no_checkpoint(tmp_path):
    with pytest.raises(
        NonFiniteLossError, match=r"loss is nan at epoch 1, step 2: .*no checkpoint was written"
    ):
        train(tiny_config(tmp_path), model=tiny(fail_at=2, fail_with="nan"))
    assert not (tmp_path / "last.pt").exists()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 2, step 2.*last good epoch \(1\)"):
        train(tiny_config(tmp_path), model=tiny(fail_at=5, fail_with="nan"))
    state = load_training_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values())


def test_resume_and_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        train(tiny_config(tmp_path, resume=True), model=tiny())
    train(tiny_config(tmp_path, epochs=1), model=tiny())
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny_config(tmp_path, epochs=1), model=tiny())
    other = TrainConfig("other", LINES, epochs=2, img_size=16, out=str(tmp_path), resume=True, progress=False)
    with pytest.raises(ValueError, match="checkpoint of model 'tiny', not 'other'"):
        train(other, model=tiny())
    with pytest.raises(ValueError, match="gives \\[5\\] outputs per image but .* has 9 classes"):
        train(tiny_config(tmp_path / "b"), model=tiny(num_classes=5))
    with pytest.raises(ValueError, match="mobilenetv2_035.*cannot take the \\[1, 16, 16\\] images.*img-size"):
        train(TrainConfig("mobilenetv2_035", LINES, img_size=16, out=str(tmp_path / "c"), progress=False))
    with pytest.raises(ValueError, match="opt must be one of"):
        train(tiny_config(tmp_path / "d", opt="lion"), model=tiny())


def test_meter_multilabel_accuracies():
    meter = Meter(3, True, torch.device("cpu"))
    logits = torch.tensor([[1.0, -1.0, 2.0], [1.0, 1.0, -1.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    meter.update(torch.tensor(0.5), logits, targets)
    result = meter.result()
    assert result["acc"] == 50.0 and result["per_label_acc"] == [100.0, 50.0, 100.0]
    assert result["label_acc"] == pytest.approx(250 / 3) and result["loss"] == 0.5


def test_multilabel_training_reports_label_accuracy(tmp_path):
    cfg = TrainConfig(
        "tiny",
        "synthetic:multilines,train=32,val=16",
        epochs=1,
        img_size=16,
        out=str(tmp_path),
        progress=False,
    )
    result = train(cfg, model=tiny())
    row = result.history[0]
    assert 0 <= row["val_acc"] <= row["val_label_acc"] <= 100 and len(result.val["per_label_acc"]) == 9


def test_cli_train_then_eval(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", "mobilenetv2_035", "--data", LINES, "--epochs", "1", "--img-size", "32"]
    result = runner.invoke(app, [*args, "--batch-size", "16", "--out", str(out)])
    assert result.exit_code == 0, result.stdout
    summary = json.loads((out / "summary.json").read_text())
    checkpoint = str(out / "last.pt")
    evaluated = runner.invoke(
        app, ["eval", "--model", "mobilenetv2_035", "--checkpoint", checkpoint, "--data", LINES, "--json"]
    )
    assert evaluated.exit_code == 0, evaluated.stdout
    metrics = json.loads(evaluated.stdout)
    assert metrics["acc"] == summary["val"]["acc"] and metrics["samples"] == 24
    assert metrics["loss"] == pytest.approx(summary["val"]["loss"], rel=1e-5)

    shapes = runner.invoke(app, ["eval", "--model", "mobilenetv2_035", "--checkpoint", checkpoint, "--data",
                                 "synthetic:shapes,train=2,val=2"])  # fmt: skip
    assert shapes.exit_code == 2 and "has 5 classes" in shapes.stdout
    other = runner.invoke(app, ["eval", "--model", "rexnet_100", "--checkpoint", checkpoint, "--data", LINES])
    assert other.exit_code == 2 and "checkpoint of model 'mobilenetv2_035', not 'rexnet_100'" in other.stdout
    unknown = runner.invoke(
        app, ["train", "--model", "mobilenetv2_035", "--data", "mnist", "--out", str(tmp_path / "new")]
    )
    assert unknown.exit_code == 2 and "unknown data spec 'mnist'" in unknown.stdout


def test_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [
        "-m",
        "leanvision.cli",
        "train",
        "--model",
        "mobilenetv2_035",
        "--data",
        LINES,
        "--epochs",
        "2",
    ]
    command += ["--img-size", "32", "--batch-size", "8", "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed"
    assert summary["val"]["samples"] == 24  # both shards counted once
    assert done.stdout.count("epoch 2/2") == 1  # only rank 0 reports
    state = load_training_checkpoint(out / "last.pt")
    assert state["epoch"] == 2 and not any(k.startswith("module.") for k in state["model"])
    data = build_dataset(LINES, 32)
    assert len(data.train) == 48  # 3 steps of 8 per process and epoch
    # issue 20, item 8: one process cannot continue a two-process run exactly
    again = runner.invoke(
        app,
        [
            "train",
            "--model",
            "mobilenetv2_035",
            "--data",
            LINES,
            "--epochs",
            "3",
            "--out",
            str(out),
            "--resume",
        ],
    )
    assert again.exit_code == 2 and "trained by 2 process(es), this run has 1" in again.stdout


def test_resume_refuses_flags_it_would_ignore(tmp_path):
    """Issue 20, item 8: --resume keeps the checkpoint's settings; a different --lr or --batch-size given
    with it is refused, each named with the run's value; the same values and run settings are fine."""
    out = tmp_path / "run"
    base = ["train", "--model", "mobilenetv2_035", "--data", LINES, "--img-size", "32", "--out", str(out)]
    first = runner.invoke(app, [*base, "--epochs", "1", "--lr", "0.05", "--batch-size", "16"])
    assert first.exit_code == 0, first.stdout
    changed = runner.invoke(app, [*base, "--epochs", "2", "--resume", "--lr", "0.5", "--batch-size", "8"])
    assert changed.exit_code == 2, changed.stdout
    assert (
        "--lr 0.5 (the run's: 0.05)" in changed.stdout and "--batch-size 8 (the run's: 16)" in changed.stdout
    )
    assert load_training_checkpoint(out / "last.pt")["epoch"] == 1  # nothing ran
    same = runner.invoke(app, [*base, "--epochs", "2", "--resume", "--lr", "0.05", "--workers", "1"])
    assert same.exit_code == 0, same.stdout
    assert load_training_checkpoint(out / "last.pt")["epoch"] == 2


def test_probe_and_one_go_models():
    from leanvision.experiments.repro import ProbeNet, classical_mds, one_go_model, probe_candidates

    candidates = probe_candidates(16)
    assert len(candidates) == 9 and candidates[0] == (4, 4) and candidates[-1] == (16, 16)
    probe = ProbeNet(9, 4, 8, conv=True)
    assert probe(torch.randn(2, 1, 32, 32)).shape == (2, 9) and probe.features(
        torch.randn(3, 1, 32, 32)
    ).shape == (3, 32)
    for kind in ("rnnpool", "conv", "avg", "max"):
        assert one_go_model(kind, 3, 32, 10)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown one-go pooling 'min'"):
        one_go_model("min", 3, 32, 10)
    points = torch.randn(20, 2, generator=torch.Generator().manual_seed(0)).double().numpy()
    embedded = classical_mds(points @ [[1.0, 0.0, 2.0], [0.0, 3.0, 1.0]])  # a 2-D plane in 3-D
    distances = lambda p: ((p[:, None] - p[None]) ** 2).sum(-1)  # noqa: E731
    ref = distances(points @ [[1.0, 0.0, 2.0], [0.0, 3.0, 1.0]])
    assert abs(distances(embedded) - ref).max() < 1e-8


@pytest.mark.slow
def test_rnnpool_probe_learns_the_lines_set(tmp_path):
    """Table 7's first row (the paper's h1=4, h2=16 after a conv): the probe fits the lines test set."""
    from leanvision.experiments.repro import ProbeNet

    data = build_dataset("synthetic:lines,train=3000,val=1000", 32)
    torch.manual_seed(0)
    probe = ProbeNet(data.num_classes, 4, 16, conv=True)
    with torch.no_grad():  # why the BN is there: the pooled features barely differ between images
        spread = probe.features(torch.stack([data.val[i][0] for i in range(64)])).std(0).mean()
    assert spread < 1e-3
    cfg = TrainConfig(
        "probe", data.spec, epochs=10, lr=0.01, batch_size=64, opt="adamw", wd=0.0, out=str(tmp_path),
        progress=False,
    )  # fmt: skip
    result = train(cfg, model=probe, data=data)
    assert max(row["val_acc"] for row in result.history) >= 95.0


@pytest.mark.slow
def test_repro_commands_run_end_to_end(tmp_path):
    args = ["--train-size", "16", "--val-size", "32", "--max-hidden", "4", "--epochs", "1"]
    probe = runner.invoke(app, ["repro", "rnnpool-probe", *args, "--out", str(tmp_path / "probe")])
    assert probe.exit_code == 0, probe.stdout
    rows = json.loads((tmp_path / "probe" / "table7.json").read_text())
    assert len(rows) == 8 and rows[0]["paper"] == [4, 16] and (tmp_path / "probe" / "mds_lines.png").is_file()
    again = runner.invoke(app, ["repro", "rnnpool-probe", "--out", str(tmp_path / "probe")])
    assert again.exit_code == 2 and "not empty" in again.stdout
    unknown = runner.invoke(app, ["repro", "table9"])
    assert unknown.exit_code == 2 and "No such command 'table9'" in unknown.output


def test_full_disk_bad_device_and_file_out(tmp_path, monkeypatch):
    """Issue 20, items 9 and 10: a full disk during the checkpoint write is one error that says so, leaves
    no temporary file and keeps the previous last.pt; --device garbage, --out naming a file, --wd nan and
    --lr inf are refused before any work."""
    import errno

    import leanvision.engine.train_state as train_state

    out = tmp_path / "run"
    base = ["train", "--model", "mobilenetv2_035", "--data", LINES, "--img-size", "32", "--out", str(out)]
    assert runner.invoke(app, [*base, "--epochs", "1"]).exit_code == 0
    before = (out / "last.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_state.torch, "save", full_disk)
    result = runner.invoke(app, [*base, "--epochs", "2", "--resume"])
    monkeypatch.setattr(train_state.torch, "save", real_save)
    assert result.exit_code == 2, result.stdout
    assert "the disk is full" in result.stdout and "keeps its previous content" in result.stdout
    assert (out / "last.pt").read_bytes() == before and not (out / ".last.pt.tmp").exists()
    (out / ".last.pt.tmp").write_bytes(b"left by a crash")
    assert runner.invoke(app, [*base, "--epochs", "2", "--resume"]).exit_code == 0
    assert not (out / ".last.pt.tmp").exists()

    (tmp_path / "afile").write_text("x")
    for flags, message in (
        (["--device", "garbage"], "device must be cpu, cuda or cuda:N, got 'garbage'"),
        (["--out", str(tmp_path / "afile")], "is a file; the run needs a folder"),
        (["--wd", "nan"], "need finite lr > 0, wd >= 0"),
        (["--lr", "inf"], "need finite lr > 0, wd >= 0"),
    ):
        args = [
            "train",
            "--model",
            "mobilenetv2_035",
            "--data",
            LINES,
            "--out",
            str(tmp_path / "new"),
            *flags,
        ]
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.stdout, (flags, result.stdout)
    assert not (tmp_path / "new").exists()


def test_raising_epochs_on_resume_continues_the_schedule(tmp_path):
    """Issue 20 (rough edge): after a finished cosine run, --epochs raised on resume starts the new epoch
    at the new schedule's rate, not at the old schedule's final 0."""
    first = train(tiny_config(tmp_path, epochs=1), model=tiny())
    assert first.history[0]["lr"] == pytest.approx(0.1)
    more = train(tiny_config(tmp_path, epochs=2, resume=True), model=tiny())
    assert more.history[1]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.5)))
