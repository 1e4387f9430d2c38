"""Issue 19, section 1: faults. A training process killed (kill -9) at any moment, the checkpoint write
included; SIGTERM; a channel-search worker killed mid-trial; an unwritable output folder and a full disk:
no file is truncated, no metrics row lost or doubled, and a resumed run equals an uninterrupted one.

The killed processes run `leanvision train` with conftest's Tiny in place of the registered models, forked
from a server that imported leanvision once (a fresh interpreter per kill would spend seconds importing).
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import random
import resource
import shutil
import signal
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from typer.testing import CliRunner

import leanvision.engine.train as engine
from conftest import LINES, study_trials, tiny, tiny_config, tiny_settings, without_time
from leanvision.cli import app
from leanvision.engine.train import train
from leanvision.engine.train_state import load_training_checkpoint, temporary_path
from leanvision.errors import OutputError
from leanvision.experiments.channel_search.study import WorkerError, open_storage, run_search

EPOCHS = 3
FORKSERVER = multiprocessing.get_context("forkserver")


def install_pause(pause: str, marker: str) -> None:
    """Make this process touch `marker` and sleep (to be signalled) at `pause` "NAME:K": before its K-th
    rename onto NAME (last.pt, metrics.csv), or, for NAME "torch.save", with its K-th save half written."""
    name, _, k = pause.partition(":")
    calls = 0
    real_replace, real_save = os.replace, torch.save

    def pause_at(call: str) -> None:
        nonlocal calls
        if call == name:
            calls += 1
            if calls == int(k):
                Path(marker).touch()
                time.sleep(600)

    def replace(src, dst) -> None:
        pause_at(Path(dst).name)
        real_replace(src, dst)

    def save(obj, f) -> None:
        if name == "torch.save" and calls + 1 == int(k):
            whole = io.BytesIO()
            real_save(obj, whole)
            f.write(whole.getvalue()[: len(whole.getvalue()) // 2])
            f.flush()
        pause_at("torch.save")
        real_save(obj, f)

    os.replace, torch.save = replace, save


def leanvision_train(args: list[str], log: str, pause: str, marker: str, file_limit: int | None) -> None:
    """A forked `leanvision train ARGS` of Tiny, its output to `log`, paused at `pause` (see install_pause)
    and its files limited to `file_limit` bytes (RLIMIT_FSIZE: a longer write fails as on a full disk)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    model = tiny()  # before the run seeds its generators, as `train(config, model=tiny())` does
    engine.make_model = lambda name, data: model
    if pause:
        install_pause(pause, marker)
    if file_limit is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))
    app(["train", *args], prog_name="leanvision")


def start(
    out: Path,
    epochs: int = EPOCHS,
    pause: str = "",
    marker: Path | None = None,
    file_limit: int | None = None,
) -> multiprocessing.Process:
    """`leanvision train` of Tiny to `out` in a process of its own, resuming when last.pt exists; its
    output goes to out.log."""
    args = ["--model", "tiny", "--data", LINES, "--img-size", "16", "--batch-size", "16", "--lr", "0.1",
            "--epochs", str(epochs), "--device", "cpu", "--out", str(out)]  # fmt: skip
    if (out / "last.pt").exists():
        args.append("--resume")
    FORKSERVER.set_forkserver_preload(["leanvision.cli", "leanvision.engine.train", "optuna"])
    log = out.with_name(f"{out.name}.log")
    process = FORKSERVER.Process(
        target=leanvision_train, args=(args, str(log), pause, str(marker), file_limit), daemon=True
    )
    process.start()
    return process


def wait_for(path: Path, process: multiprocessing.Process, timeout_s: float = 120) -> None:
    """Wait until `path` exists; fail if `process` ends first."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.is_alive(), f"the run ended (exit code {process.exitcode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def signal_paused(out: Path, pause: str, sig: signal.Signals = signal.SIGKILL) -> None:
    """Start the run, send it `sig` once it pauses at `pause` and check that `sig` ended it."""
    marker = out.with_name("paused")
    marker.unlink(missing_ok=True)
    process = start(out, pause=pause, marker=marker)
    wait_for(marker, process)
    os.kill(process.pid, sig)
    process.join(120)
    assert process.exitcode == -sig


def metrics_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def check_after_kill(out: Path) -> int:
    """What a killed run leaves: a loadable last.pt (unless no epoch finished) and metrics.csv rows of its
    epochs, each once and equal to the checkpoint's, the last one possibly missing. Returns the epoch."""
    if not (out / "last.pt").exists():
        assert not (out / "metrics.csv").exists()
        return 0
    state = load_training_checkpoint(out / "last.pt")
    epoch, history = state["epoch"], state["history"]
    assert [row["epoch"] for row in history] == list(range(1, epoch + 1))
    rows = metrics_rows(out) if (out / "metrics.csv").exists() else []
    assert [int(r["epoch"]) for r in rows] in (list(range(1, epoch + 1)), list(range(1, epoch)))
    assert [float(r["val_loss"]) for r in rows] == [row["val_loss"] for row in history[: len(rows)]]
    return epoch


def check_equals_reference(out: Path, reference: Path) -> None:
    """A finished run equal to the uninterrupted `reference` run: the metrics of every epoch (each once in
    metrics.csv), the final validation and the weights."""
    state, expected = (load_training_checkpoint(p / "last.pt") for p in (out, reference))
    assert state["epoch"] == expected["epoch"]
    assert without_time(state["history"]) == without_time(expected["history"])
    for name, tensor in expected["model"].items():
        assert torch.equal(state["model"][name], tensor), name
    assert without_time(metrics_rows(out)) == without_time(metrics_rows(reference))
    summary, expected_summary = (json.loads((p / "summary.json").read_text()) for p in (out, reference))
    assert summary["status"] == "completed" and summary["val"] == expected_summary["val"]
    assert not list(out.glob(".*.tmp"))


def finish(out: Path, epochs: int = EPOCHS) -> None:
    """Resume the run in `out` to its end, in this process."""
    assert train(tiny_config(out, epochs=epochs, resume=True), model=tiny()).status == "completed"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of Tiny (in this process: runs are exact across processes)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(tiny_config(out, epochs=EPOCHS), model=tiny())
    return out


def test_kill_9_in_each_step_of_the_checkpoint_write_loses_nothing(tmp_path, reference):
    """Three kills, each in a step of saving an epoch: its checkpoint half written, written but not yet
    renamed, and renamed with metrics.csv not yet (at the last epoch: a resume has nothing left to train
    and must still write the missing row). Each leaves whole files; the resumed run equals the reference."""
    out = tmp_path / "run"
    signal_paused(out, "torch.save:2")  # epoch 2's checkpoint half written
    assert check_after_kill(out) == 1 and temporary_path(out / "last.pt").stat().st_size > 0
    signal_paused(out, "last.pt:1")  # epoch 2 again, whole but not renamed
    assert check_after_kill(out) == 1
    signal_paused(out, "metrics.csv:2")  # epochs 2 and 3 saved, epoch 3's metrics row not
    assert check_after_kill(out) == 3 and [int(r["epoch"]) for r in metrics_rows(out)] == [1, 2]
    finish(out)
    check_equals_reference(out, reference)


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_nothing(tmp_path):
    """24 kill -9 at random moments of 8-epoch runs (every other one at the next checkpoint write after the
    moment), the run resumed after each kill: every kill leaves whole files, every finished run equals the
    uninterrupted one."""
    epochs, rng = 8, random.Random(19)
    reference, again = tmp_path / "reference", tmp_path / "again"
    for out in (reference, again):  # the first one also starts the fork server
        tic = time.monotonic()
        whole = start(out, epochs)
        whole.join(300)
        assert whole.exitcode == 0
    lifetime = time.monotonic() - tic  # of a forked run, start to end
    check_equals_reference(again, reference)
    kills, in_write, finished = 0, 0, 0
    out = tmp_path / "run"
    while kills < 24:
        started = time.time()
        process = start(out, epochs)
        time.sleep(rng.uniform(0, 2 * lifetime / epochs))  # within about two epochs
        if kills % 2:  # wait for the next checkpoint write
            while process.is_alive() and not temporary_path(out / "last.pt").exists():
                time.sleep(0.0005)
        if not process.is_alive():  # it finished before the kill
            process.join()
            assert process.exitcode == 0
            check_equals_reference(out, reference)
            shutil.rmtree(out)
            finished += 1
            continue
        os.kill(process.pid, signal.SIGKILL)
        process.join(60)
        assert process.exitcode == -signal.SIGKILL
        kills += 1
        tmp = temporary_path(out / "last.pt")
        in_write += tmp.exists() and tmp.stat().st_mtime >= started  # killed before its rename
        check_after_kill(out)
    finish(out, epochs)
    check_equals_reference(out, reference)
    print(f"{kills} kills, {in_write} inside a checkpoint write, {finished + 1} runs finished and compared")


def test_sigterm_mid_epoch_saves_says_terminated_and_resumes_exactly(tmp_path, reference, capsys):
    """SIGTERM in the middle of epoch 2: the run stops as on Ctrl-C, with status "terminated", then the
    signal goes on to the handler that was there before; --resume gives the uninterrupted run."""
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        result = train(tiny_config(tmp_path), model=tiny(fail_at=5, fail_with="sigterm"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == [signal.SIGTERM] and result.status == "terminated" and len(result.history) == 1
    message = f"terminated: {tmp_path / 'last.pt'} holds epoch 1; continue with --resume"
    assert message in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "terminated" and summary["epochs_completed"] == 1
    assert load_training_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    with pytest.raises(KeyboardInterrupt):  # a caller running several runs stops too
        result.raise_if_interrupted()
    finish(tmp_path)
    check_equals_reference(tmp_path, reference)


def test_sigterm_between_checkpoint_and_metrics_ends_the_command_with_143(tmp_path, reference):
    """`leanvision train` sent SIGTERM after epoch 2's checkpoint, before its metrics row: it says where the
    run is, writes metrics.csv and summary.json (status terminated) whole, and ends as SIGTERM ends a
    process (exit status 143 in a shell); --resume gives the uninterrupted run."""
    out = tmp_path / "run"
    signal_paused(out, "metrics.csv:2", signal.SIGTERM)
    log = (tmp_path / "run.log").read_text()
    assert f"terminated: {out / 'last.pt'} holds epoch 2; continue with --resume" in log
    assert "Traceback" not in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "terminated" and summary["epochs_completed"] == 2
    assert check_after_kill(out) == 2 and [int(r["epoch"]) for r in metrics_rows(out)] == [1, 2]
    finish(out)
    check_equals_reference(out, reference)


def kill_a_worker_mid_trial(url: str, out: Path, found: dict) -> None:
    """Wait until a trial is RUNNING with its first epoch saved, then kill -9 its worker; put the trial's
    number and model into `found`."""
    deadline = time.monotonic() + 300
    while not (out / "models").exists():  # the study is created and the workers train
        assert time.monotonic() < deadline
        time.sleep(0.05)
    study = optuna.load_study(study_name="channels", storage=open_storage(url))
    while time.monotonic() < deadline:
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker, model = trial.user_attrs.get("worker"), trial.params.get("model")
            if worker and (out / "models" / f"{model:04d}" / "run0" / "last.pt").exists():
                os.kill(worker["pid"], signal.SIGKILL)
                found.update(number=trial.number, model=model)
                return
        time.sleep(0.05)


@pytest.mark.parametrize("storage", ["sqlite", "postgresql"])
def test_a_search_worker_killed_mid_trial_loses_and_repeats_no_trial(tmp_path, request, storage):
    """kill -9 of one of two workers in its trial's second epoch: the other worker finishes the queue; the
    re-run fails the dead trial, trains its model again from its last.pt, and ends with one COMPLETE trial
    per model, those finished before untouched."""
    url = request.getfixturevalue("postgres_url") if storage == "postgresql" else None
    settings = tiny_settings(tmp_path / "search", workers=2, models=3, epochs=3, storage=url)
    found: dict = {}
    killer = threading.Thread(
        target=kill_a_worker_mid_trial, args=(settings.storage_url, Path(settings.out), found)
    )
    killer.start()
    with pytest.raises(WorkerError, match="1 of 2 worker processes failed"):
        run_search(settings)
    killer.join()
    trials = study_trials(settings)
    assert trials[found["number"]].state == TrialState.RUNNING  # killed mid-trial
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    done = {t.number: (t.params, t.value, t.datetime_complete) for t in complete}
    assert found["model"] not in {params["model"] for params, _, _ in done.values()}

    report = run_search(settings)
    trials = study_trials(settings)
    assert trials[found["number"]].state == TrialState.FAIL
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["model"] for t in complete) == list(range(settings.models))  # each once
    assert {n: (trials[n].params, trials[n].value, trials[n].datetime_complete) for n in done} == done
    assert sorted(m["model"] for m in report.ranked) == list(range(settings.models))
    run = Path(settings.out) / "models" / f"{found['model']:04d}" / "run0"
    assert [int(r["epoch"]) for r in metrics_rows(run)] == [1, 2, 3]


def test_an_unwritable_output_folder_fails_before_training(tmp_path):
    """--out inside a file, or in a folder this user cannot write (/proc/1 for root): one error line, exit
    code 2, before any work."""
    (tmp_path / "afile").write_text("x")
    readonly = tmp_path / "readonly"
    readonly.mkdir(mode=0o555)
    if os.access(readonly, os.W_OK):  # root writes anywhere but in /proc
        readonly = Path("/proc/1")
    for out, message in (
        (tmp_path / "afile" / "run", f"cannot create the output folder {tmp_path}/afile/run: "
                                     f"{tmp_path}/afile is a file"),
        (readonly / "run", f"cannot write to the output folder {readonly}/run: {readonly} is not writable"),
    ):  # fmt: skip
        result = CliRunner().invoke(app, ["train", "--model", "tiny", "--data", LINES, "--out", str(out)])
        assert result.exit_code == 2 and f"error: {message}" in result.stdout, result.stdout
        assert not out.exists()


def test_a_full_disk_keeps_the_last_checkpoint_whole(tmp_path):
    """A checkpoint write that the file system refuses halfway (a file-size limit set below the checkpoint's
    size: the write fails as on a full disk): one error line, exit code 2, last.pt as it was, no temporary
    file; the same command continues once there is room."""
    out = tmp_path / "run"
    train(tiny_config(out, epochs=1), model=tiny())
    before = (out / "last.pt").read_bytes()
    process = start(out, epochs=2, file_limit=len(before) // 2)
    process.join(120)
    log = (tmp_path / "run.log").read_text()
    assert process.exitcode == 2, log
    assert f"error: cannot write {out / 'last.pt'} (" in log and "it keeps its previous content" in log
    assert (out / "last.pt").read_bytes() == before and not temporary_path(out / "last.pt").exists()
    assert load_training_checkpoint(out / "last.pt")["epoch"] == 1
    finish(out, epochs=2)
    assert [int(r["epoch"]) for r in metrics_rows(out)] == [1, 2]


def test_a_disk_without_room_for_one_checkpoint_is_refused_before_training(tmp_path, monkeypatch):
    """Free space below one checkpoint (Tiny's 1,813 weights and SGD's momentum: 14,504 bytes): one error
    before the first epoch, nothing written."""
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(engine.shutil, "disk_usage", lambda path: usage._replace(free=14_503))
    message = f"the disk of {tmp_path / 'run'} has 14,503 bytes free; a checkpoint of this model needs 14,504"
    with pytest.raises(OutputError, match=message):
        train(tiny_config(tmp_path / "run"), model=tiny())
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(engine.shutil, "disk_usage", lambda path: usage._replace(free=14_504))
    assert train(tiny_config(tmp_path / "run", epochs=1), model=tiny()).status == "completed"
