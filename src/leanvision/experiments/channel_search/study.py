"""Run the channel-configuration search as an Optuna study and report it as ReXNet Figure 2 and Table 3.

The study holds one trial per sampled model (not one per training run): its param `model` = k indexes the
seeded candidate stream of `sample_candidates`, its user attrs carry the configuration (channels, params,
macs, a, b, breakpoints) and, once trained, `acc_runs` (final validation accuracy of each of the R runs);
its value is their mean. All K trials are queued up front, so the set of models depends only on the seed.
A worker that checks the queue just before another takes the last model gets a fresh trial instead; it is
pruned at once and has no params (at most one per extra worker, at the end of a run), and reports skip it.

Storage is Optuna's RDB storage: an SQLite file in the output folder by default, or any SQLAlchemy URL
(`postgresql+psycopg://user@host/db`, with the `postgres` extra) so that machines running the same
command pull models from one queue. `workers` local processes each run `study.optimize` until the queue
is empty.
Re-running the same command resumes: finished models (trained, or diverged) are kept, models whose trial
failed are queued again, and each training run continues from its `last.pt`. A worker that dies leaves a
RUNNING trial whose heartbeat stops; after the grace period the next worker or re-run fails it and queues
the model again. A re-run on the worker's own machine does not wait for the grace period: each trial
records its worker's host and process id, and a RUNNING trial of this host whose process is gone is
failed and queued again at once (a pid reused by another process meanwhile looks alive: then the grace
period applies).

Run r of every model trains with seed `seed + r`, so models are compared under the same seeds.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import socket
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sqlalchemy
import torch
from optuna.distributions import IntDistribution
from optuna.trial import TrialState

from leanvision.engine.data import DataSplits, build_dataset
from leanvision.engine.train import NonFiniteLossError, TrainConfig, train
from leanvision.errors import CheckpointError, InvalidArgumentError, first_line
from leanvision.experiments.channel_search.space import (
    Candidate,
    ChannelSearchNet,
    SearchSpace,
    sample_candidates,
)

HEARTBEAT_S = 60
GRACE_S = 300
PARENT_CHECK_S = 1.0  # how often a worker checks that the search's main process still runs
GROUP_COLORS = {"top": "tab:red", "middle": "tab:blue", "bottom": "tab:green"}
# Settings that define a study: a re-run with other values would mix incomparable models.
STUDY_SETTINGS = (
    "blocks", "max_params", "max_macs", "data", "img_size", "act", "block", "epochs", "repeats", "seed", "lr",
    "batch_size",
)  # fmt: skip


@dataclass
class SearchSettings:
    """One search: space and limits, training of each model, and how the work is run."""

    blocks: int
    max_params: int
    max_macs: int
    data: str
    models: int = 200
    epochs: int = 30
    repeats: int = 3
    img_size: int | None = None
    act: str = "relu6"
    block: str = "mbv2"
    fraction: float = 0.1
    seed: int = 0
    lr: float = 0.05
    batch_size: int = 64
    device: str | None = None
    workers: int = 1
    threads: int = 1
    out: str = "runs/search-channels"
    storage: str | None = None
    study_name: str = "channels"

    def check(self) -> None:
        """Raise a ValueError naming the first bad setting (the space checks its own)."""
        counts = {
            n: getattr(self, n) for n in ("models", "epochs", "repeats", "workers", "threads", "batch_size")
        }
        if min(counts.values()) < 1:
            raise InvalidArgumentError(f"{', '.join(counts)} must be >= 1, got {counts}")
        if not 0 < self.fraction <= 1:
            raise InvalidArgumentError(
                f"fraction (the share of models in each group) must be in (0, 1], got {self.fraction}"
            )
        if not self.lr > 0:
            raise InvalidArgumentError(f"lr must be positive, got {self.lr}")

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(Path(self.out) / 'study.db').resolve()}"

    def space(self, data: DataSplits) -> SearchSpace:
        return SearchSpace(
            self.blocks, data.channels, data.image_size, data.num_classes, act=self.act, block=self.block
        )


class WorkerError(RuntimeError):
    """A worker process ended with an error (the models it finished stay in the study)."""


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeats; a stale trial (its worker died) is failed and its model queued again.

    SQLite has no SELECT ... FOR UPDATE, so two workers could both see a queued trial as WAITING and both
    run it. Each SQLite transaction therefore starts with BEGIN IMMEDIATE (the write lock from its first
    read), which makes Optuna's check-and-set of the trial state atomic. PostgreSQL locks the row itself.
    """
    sqlite = url.startswith("sqlite")
    # isolation_level None: the driver leaves transactions to us (SQLAlchemy's recipe for pysqlite).
    engine_kwargs = {"connect_args": {"timeout": 60, "isolation_level": None}} if sqlite else {}
    with warnings.catch_warnings():  # the heartbeat API is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
            )
        except sqlalchemy.exc.DatabaseError as err:  # a damaged study.db, an unreachable server
            raise CheckpointError(
                f"cannot open the study storage {_display_url(url)}: {first_line(err.orig or err)}; "
                "repair or remove it, or pass another --out or --storage"
            ) from None
    if sqlite:
        sqlalchemy.event.listen(storage.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    return storage


def _display_url(url: str) -> str:
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


def _check_study_settings(study: optuna.Study, settings: SearchSettings) -> None:
    wanted = {name: getattr(settings, name) for name in STUDY_SETTINGS}
    saved = study.user_attrs.get("settings")
    if saved is None:
        study.set_user_attr("settings", wanted)
        return
    changed = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
    if changed:
        detail = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise InvalidArgumentError(
            f"study {settings.study_name!r} in {_display_url(settings.storage_url)} was created with other "
            f"settings ({detail}); use the same settings to resume, or another --out / --study-name"
        )


def _trials(study: optuna.Study, *states: TrialState) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=states or None)


def _queue_missing(study: optuna.Study, settings: SearchSettings, candidates: list[Candidate]) -> None:
    """Queue every model of 0..models-1 that has no trained, diverged, running or queued trial."""
    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    taken = {t.params["model"] for t in _trials(study, *live) if "model" in t.params}
    missing = [k for k in range(settings.models) if k not in taken]
    for k in missing:
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING,
                params={"model": k},
                distributions={"model": IntDistribution(0, settings.models - 1)},
                user_attrs=candidates[k].to_dict(),
            )
        )


def train_model(trial: optuna.Trial, settings: SearchSettings, space: SearchSpace, data: DataSplits) -> float:
    """Objective: train the trial's model `repeats` times; its value is the mean final validation accuracy."""
    if "model" not in trial.params:  # another worker took the last queued model after our queue check
        raise optuna.TrialPruned("no queued model left")
    model, channels = trial.params["model"], list(trial.user_attrs["channels"])
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
    name = "search:" + "-".join(map(str, channels))
    tic, accs = time.perf_counter(), []
    for run in range(settings.repeats):
        out = Path(settings.out) / "models" / f"{model:04d}" / f"run{run}"
        torch.manual_seed(settings.seed + run)  # the weights are drawn here, before train() seeds the rest
        config = TrainConfig(
            model=name, data=settings.data, epochs=settings.epochs, batch_size=settings.batch_size,
            lr=settings.lr, img_size=settings.img_size, seed=settings.seed + run, out=str(out),
            resume=(out / "last.pt").exists(), device=settings.device, progress=False,
        )  # fmt: skip
        try:
            result = train(config, model=ChannelSearchNet(channels, space), data=data)
        except NonFiniteLossError as err:  # a finished outcome: this model is not retried
            trial.set_user_attr("diverged", str(err))
            raise optuna.TrialPruned(f"model {model} diverged") from err
        except Exception as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            raise
        result.raise_if_interrupted()
        accs.append(result.val["acc"])
    trial.set_user_attr("acc_runs", accs)
    print(
        f"model {model} ({name}): acc {np.mean(accs):.2f}% over {len(accs)} runs "
        f"({time.perf_counter() - tic:.1f} s)",
        flush=True,
    )
    return float(np.mean(accs))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def fail_dead_local_trials(study: optuna.Study, storage: optuna.storages.BaseStorage) -> list[int]:
    """Fail the RUNNING trials whose worker ran on this host and has exited (their models are then queued
    again); returns their numbers. Trials of other hosts wait for the heartbeat's grace period."""
    host, failed = socket.gethostname(), []
    for trial in _trials(study, TrialState.RUNNING):
        worker = trial.user_attrs.get("worker") or {}
        if worker.get("host") == host and not _process_alive(int(worker["pid"])):
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            failed.append(trial.number)
    return failed


def _stop_when_queue_empty(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    if not _trials(study, TrialState.WAITING):
        study.stop()


def _exit_when_gone(parent: int, interval_s: float = PARENT_CHECK_S) -> None:
    """End this process once `parent` has exited (killed, say): a worker must not train on, orphaned.
    Its RUNNING trial is failed and queued again by the next run (fail_dead_local_trials)."""
    while _process_alive(parent):
        time.sleep(interval_s)
    os._exit(1)


class _QuietInterrupt(logging.Filter):
    """Drops Optuna's report of a trial that Ctrl-C ended (a traceback per worker, then "failed with value
    None"): the run's own line already says where its last epoch is."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupted = False

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.exc_info
            and record.exc_info[0] is not None
            and issubclass(record.exc_info[0], KeyboardInterrupt)
        ):
            self.interrupted = True
            return False
        return not (self.interrupted and "failed with value None" in record.getMessage())


QUIET_INTERRUPT = _QuietInterrupt()


def work(settings: SearchSettings, parent: int | None = None) -> None:
    """One worker: train queued models until the queue is empty (torch limited to `threads` threads).
    With `parent` (the search's main process) the worker ends when that process is gone, and ends
    quietly (exit code 130) on Ctrl-C."""
    if parent is not None:
        threading.Thread(target=_exit_when_gone, args=(parent,), daemon=True).start()
        try:
            _work(settings)
        except KeyboardInterrupt:
            sys.exit(130)
    else:
        _work(settings)


def _work(settings: SearchSettings) -> None:
    QUIET_INTERRUPT.interrupted = False
    logging.getLogger("optuna.study._optimize").addFilter(QUIET_INTERRUPT)  # once: the same object
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        data = build_dataset(settings.data, settings.img_size)
        study = optuna.load_study(study_name=settings.study_name, storage=open_storage(settings.storage_url))
        if _trials(study, TrialState.WAITING):
            objective = partial(train_model, settings=settings, space=settings.space(data), data=data)
            study.optimize(objective, callbacks=[_stop_when_queue_empty], catch=(Exception,))
    finally:
        torch.set_num_threads(threads)


def _run_workers(settings: SearchSettings) -> None:
    if settings.workers == 1:
        work(settings)
        return
    # Fork each worker from a server process that imported torch once but never ran it: no per-worker
    # start-up import, and no fork of a process whose thread pools are running.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    processes = [context.Process(target=work, args=(settings, os.getpid())) for _ in range(settings.workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    codes = [p.exitcode for p in processes]
    if any(codes):
        raise WorkerError(
            f"{sum(map(bool, codes))} of {len(codes)} worker processes failed (exit codes {codes}); "
            "trained models are kept: re-run the same command to continue"
        )


@dataclass
class SearchReport:
    """Trained models ranked by mean accuracy, the top/middle/bottom groups, and the models not trained."""

    settings: dict[str, Any]
    space: dict[str, Any]
    ranked: list[dict[str, Any]]
    groups: dict[str, dict[str, Any]]
    untrained: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [u for u in self.untrained if u["state"] == "failed"]


def group_slices(count: int, fraction: float) -> dict[str, slice]:
    """Ranks of the top, middle (from the median on, ReXNet's top-50% to 60%) and bottom groups."""
    size = max(1, round(fraction * count))
    middle = count // 2
    return {
        "top": slice(0, size),
        "middle": slice(middle, min(count, middle + size)),
        "bottom": slice(-size, None),
    }


def _mean_std(values: list[float]) -> list[float]:
    return [float(np.mean(values)), float(np.std(values))]


def _group(models: list[dict[str, Any]], name: str, fraction: float) -> dict[str, Any]:
    channels = np.array([m["channels"] for m in models], dtype=float)
    return {
        "label": f"{name.capitalize()}-{fraction * 100:g}%",
        "models": [m["model"] for m in models],
        "acc": _mean_std([m["acc"] for m in models]),
        "params": _mean_std([m["params"] for m in models]),
        "macs": _mean_std([m["macs"] for m in models]),
        "channels_mean": channels.mean(0).tolist(),
        "channels_std": channels.std(0).tolist(),
    }


def _untrained_state(trials: list[optuna.trial.FrozenTrial]) -> dict[str, Any]:
    for state, label in ((TrialState.RUNNING, "running"), (TrialState.WAITING, "queued")):
        if any(t.state == state for t in trials):
            return {"state": label}
    diverged = [t for t in trials if "diverged" in t.user_attrs]
    if diverged:
        return {"state": "diverged", "reason": diverged[0].user_attrs["diverged"]}
    errors = [t.user_attrs["error"] for t in trials if "error" in t.user_attrs]
    return {"state": "failed", "reason": errors[-1] if errors else "worker stopped before the trial ended"}


def summarize(study: optuna.Study, settings: SearchSettings, space: SearchSpace) -> SearchReport:
    """Rank the trained models of 0..models-1 (first completed trial of each) and form the groups."""
    by_model: dict[int, list[optuna.trial.FrozenTrial]] = {}
    for trial in _trials(study):
        k = trial.params.get("model")  # None for a pruned trial that found the queue empty
        if k is not None and k < settings.models:
            by_model.setdefault(k, []).append(trial)
    trained, untrained = [], []
    for k in range(settings.models):
        trials = sorted(by_model.get(k, []), key=lambda t: t.number)
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        if not done:
            untrained.append({"model": k, **_untrained_state(trials)})
            continue
        attrs = done[0].user_attrs
        trained.append(
            {
                "model": k, "trial": done[0].number, "channels": attrs["channels"], "params": attrs["params"],
                "macs": attrs["macs"], "acc": done[0].value, "acc_std": float(np.std(attrs["acc_runs"])),
                "acc_runs": attrs["acc_runs"], "a": attrs["a"], "b": attrs["b"],
                "breakpoints": attrs["breakpoints"],
            }
        )  # fmt: skip
    ranked = sorted(trained, key=lambda m: (-m["acc"], m["model"]))
    slices = group_slices(len(ranked), settings.fraction) if ranked else {}
    groups = {name: _group(ranked[s], name, settings.fraction) for name, s in slices.items()}
    shown = {**asdict(settings), "storage": _display_url(settings.storage_url)}
    return SearchReport(shown, space.to_dict(), ranked, groups, untrained)


def _config_text(model: dict[str, Any]) -> str:
    return f"{'-'.join(map(str, model['channels']))} (Acc: {model['acc']:.2f}%)"


def table3_rows(report: SearchReport) -> list[dict[str, str]]:
    """Table 3 as text cells: accuracy (%), params (M) and MACs (M) as mean +- std over each group."""
    return [
        {
            "ranking": g["label"],
            "acc": f"{g['acc'][0]:.2f} ± {g['acc'][1]:.2f}",
            "params_m": f"{g['params'][0] / 1e6:.3f} ± {g['params'][1] / 1e6:.3f}",
            "macs_m": f"{g['macs'][0] / 1e6:.2f} ± {g['macs'][1] / 1e6:.2f}",
        }
        for g in report.groups.values()
    ]


def table3_markdown(report: SearchReport) -> str:
    s = report.settings
    lines = [
        f"Search: {s['blocks']} blocks, params <= {s['max_params']:,}, MACs <= {s['max_macs']:,}, "
        f"{len(report.ranked)} models trained on {s['data']} ({s['repeats']} x {s['epochs']} epochs)",
        "",
        "| Ranking | Acc (%) | Params (M) | MACs (M) |",
        "|---|---|---|---|",
        *(f"| {r['ranking']} | {r['acc']} | {r['params_m']} | {r['macs_m']} |" for r in table3_rows(report)),
        "",
        f"Best: {_config_text(report.ranked[0])}",
        f"Worst: {_config_text(report.ranked[-1])}",
    ]
    return "\n".join(lines) + "\n"


def plot_figure2(report: SearchReport, path: str | Path) -> None:
    """Mean width per block index with a 1-sigma band for each group (red top, blue middle, green bottom)."""
    from leanvision.plotting import new_figure, save_figure

    s = report.settings
    index = np.arange(1, s["blocks"] + 1)
    fig, ax = new_figure(figsize=(5, 4))
    for name, g in report.groups.items():
        mean, std = np.array(g["channels_mean"]), np.array(g["channels_std"])
        color = GROUP_COLORS[name]
        ax.plot(index, mean, color=color, marker="o", label=f"{g['label']} ({g['acc'][0]:.2f}%)")
        ax.fill_between(index, mean - std, mean + std, color=color, alpha=0.2)
    ax.set_xticks(index)
    ax.set_xlabel("block index")
    ax.set_ylabel("output channels")
    limits = f"params <= {s['max_params'] / 1e6:g}M, MACs <= {s['max_macs'] / 1e6:g}M"
    ax.set_title(f"{s['blocks']} blocks, {limits}, {len(report.ranked)} models", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path, dpi=120)


def write_report(report: SearchReport, out: str | Path) -> None:
    """results.json always; table3.json, table3.md and figure2.png once a model is trained."""
    out = Path(out)
    (out / "results.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if report.ranked:
        table = {"rows": table3_rows(report), "best": report.ranked[0], "worst": report.ranked[-1]}
        (out / "table3.json").write_text(json.dumps(table, indent=2) + "\n")
        (out / "table3.md").write_text(table3_markdown(report))
        plot_figure2(report, out / "figure2.png")


def run_search(settings: SearchSettings) -> SearchReport:
    """Create or resume the study, queue the missing models, train them with the workers, report."""
    settings.check()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = build_dataset(settings.data, settings.img_size)
    space = settings.space(data)
    candidates = sample_candidates(
        space, settings.max_params, settings.max_macs, settings.seed, settings.models
    )
    Path(settings.out).mkdir(parents=True, exist_ok=True)
    storage = open_storage(settings.storage_url)
    study = optuna.create_study(
        storage=storage,
        study_name=settings.study_name,
        direction="maximize",
        load_if_exists=True,
    )
    _check_study_settings(study, settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    fail_dead_local_trials(study, storage)
    _queue_missing(study, settings, candidates)
    if _trials(study, TrialState.WAITING):
        _run_workers(settings)
    report = summarize(study, settings, space)
    write_report(report, settings.out)
    return report
