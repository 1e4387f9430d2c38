"""The `leanvision` command: models, profile, bench, compare, repro, its error messages, and option defaults
that agree with the library's."""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys

import click
import pytest
import typer
from typer.testing import CliRunner

from leanvision.cli import app
from leanvision.cli.common import parse_ratios, square_input

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_models_lists_pattern():
    result = invoke("models", "rexnet_lite_*", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == [
        "rexnet_lite_100",
        "rexnet_lite_130",
        "rexnet_lite_150",
        "rexnet_lite_200",
    ]
    table = invoke("models", "rexnet_1*")
    assert "77.9%" in table.stdout  # paper top-1 of rexnet_100


def test_profile_json_and_table():
    result = invoke("profile", "mobilenetv2_100", "--json")
    data = json.loads(result.stdout)
    assert data["macs"] == 300_774_272 and data["params"] == 3_504_872
    assert data["counted"] == "conv, linear, matmul"
    table = invoke("profile", "rexnet_100", "--num-classes", "10", "--input-size", "128", "--per-layer")
    assert table.exit_code == 0 and "stem.conv" in table.stdout and "3,528,683 params" in table.stdout


def test_profile_errors_are_clear():
    unknown = invoke("profile", "rexnet_10")
    assert unknown.exit_code == 2 and "did you mean rexnet_100" in unknown.stdout
    small = invoke("profile", "rexnet_100", "--input-size", "16")
    assert small.exit_code == 2 and "must be >= 32" in small.stdout
    zero = invoke("profile", "rexnet_100", "--input-size", "0")
    assert zero.exit_code == 2 and "positive" in zero.stdout


def test_bench_json():
    result = invoke("bench", "rexnet_100", "--input-size", "64", "--min-seconds", "0.05", "--json")
    assert result.exit_code == 0, result.stdout
    data = json.loads(result.stdout)
    assert data["batch_size"] == 1 and data["iterations"] >= 1
    assert data["p10_ms"] <= data["median_ms"] <= data["p90_ms"]
    table = invoke("bench", "rexnet_100", "--input-size", "64", "--min-seconds", "0.05", "--deploy")
    assert table.exit_code == 0 and "deploy" in table.stdout and "calibrated" in table.stdout
    bad = invoke("bench", "rexnet_100", "--batch-size", "0")
    assert bad.exit_code == 2 and "batch_size" in bad.stdout


def test_bench_with_local_checkpoint(tmp_path):
    from leanvision import create_model, save_checkpoint

    path = save_checkpoint(create_model("rexnet_lite_100", num_classes=3), tmp_path / "lite.pth")
    args = ["--input-size", "64", "--min-seconds", "0.05"]
    ok = invoke("bench", "rexnet_lite_100", "--pretrained", str(path), "--num-classes", "3", *args)
    assert ok.exit_code == 0, ok.stdout
    assert "calibrated" not in ok.stdout  # timed with the checkpoint's weights
    mismatch = invoke("bench", "rexnet_lite_100", "--pretrained", str(path), *args)
    assert mismatch.exit_code == 2 and "'head.fc.weight' has shape [3, 1024]" in mismatch.stdout


def test_compare_json():
    result = invoke("compare", "rexnet_100", "mobilenetv2_100", "--min-seconds", "0.05", "--json")
    assert result.exit_code == 0, result.stdout
    rows = {r["model"]: r for r in json.loads(result.stdout)}
    assert rows["rexnet_100"]["params"] == 4_796_873 and rows["rexnet_100"]["paper_top1"] == 77.9
    assert rows["mobilenetv2_100"]["macs"] == 300_774_272


def test_import_is_cheap():
    code = "import sys, leanvision, leanvision.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def command(*path: str) -> click.Command:
    """The click command at `path` (e.g. "rrr", "run") of the app."""
    found = typer.main.get_command(app)
    for name in path:
        found = found.commands[name]
    return found


def test_repro_has_one_command_per_experiment():
    assert sorted(command("repro").commands) == ["pooling-one-go", "rexnet-factors", "rnnpool-probe"]
    unknown = invoke("repro", "table9")
    assert unknown.exit_code == 2 and "No such command 'table9'" in unknown.output
    foreign = invoke("repro", "pooling-one-go", "--max-hidden", "8")  # rnnpool-probe's option
    assert foreign.exit_code == 2 and "No such option: --max-hidden" in foreign.output


REPRO = {  # sub-command -> the experiment it runs
    "rnnpool-probe": "leanvision.experiments.repro.rnnpool_probe",
    "pooling-one-go": "leanvision.experiments.repro.pooling_one_go",
    "rexnet-factors": "leanvision.experiments.rexnet_factors.rexnet_factors",
}


@pytest.mark.parametrize(
    "args, expected",
    [
        (["rnnpool-probe"], (("runs/repro-rnnpool-probe", 4000, 1000), {"max_hidden": 32})),
        (["rnnpool-probe", "--max-hidden", "8", "--epochs", "2", "--lr", "0.1", "--train-size", "16"],
         (("runs/repro-rnnpool-probe", 16, 1000), {"max_hidden": 8, "epochs": 2, "lr": 0.1})),
        (["pooling-one-go", "--out", "o"], (("o",), {})),
        (["pooling-one-go", "--data", "a", "--data", "b", "--epochs", "1"],
         (("runs/repro-pooling-one-go",), {"datasets": ("a", "b"), "epochs": 1})),
        (["rexnet-factors"], (("runs/repro-rexnet-factors",), {})),
        (["rexnet-factors", "--data", "a", "--lr", "0.5"],
         (("runs/repro-rexnet-factors",), {"data": "a", "lr": 0.5})),
    ],
)  # fmt: skip
def test_repro_passes_only_the_given_options(monkeypatch, args, expected):
    """Options left out are not passed: the experiment's own defaults apply."""
    calls = []
    monkeypatch.setattr(REPRO[args[0]], lambda *a, **kw: calls.append((a, kw)) or [])
    result = invoke("repro", *args)
    assert result.exit_code == 0, result.output
    assert calls == [expected]


# (command, the library config or function its options feed, options whose default differs on purpose)
LIBRARY_DEFAULTS = [
    # out: runs/MODEL; None: the task's own (TrainConfig's for classification, DETECTION_DEFAULTS)
    (("train",), "leanvision.engine.train.TrainConfig", {"out", "batch_size", "lr", "wd", "warmup_epochs"}),
    (("eval",), "leanvision.engine.train.evaluate_checkpoint", set()),
    (("demo",), "leanvision.experiments.demo.DemoConfig", set()),
    (("compare",), "leanvision.experiments.compare.compare", {"names"}),  # none: the Table 5 set
    (("profile",), "leanvision.analysis.cost.profile", set()),
    (("bench",), "leanvision.bench.benchmark", set()),
    (("memory",), "leanvision.analysis.memory.peak_memory", set()),
    (("rank-study",), "leanvision.analysis.rank.rank_study", set()),
    (("rank",), "leanvision.experiments.feature_rank.feature_spectrum", set()),
    # --epochs and --lr of repro are passed only when given (test_repro_passes_only_the_given_options)
    (("repro", "rnnpool-probe"), REPRO["rnnpool-probe"], {"epochs"}),
    (("rrr", "reduce"), "leanvision.experiments.rrr.reduce_checkpoint", set()),
    (("rrr", "select"), "leanvision.experiments.rrr.SelectConfig", set()),
    (("rrr", "run"), "leanvision.experiments.rrr.RunConfig", {"methods"}),  # none: all METHODS
    (("search", "channels"), "leanvision.experiments.channel_search.study.SearchSettings", set()),
]  # fmt: skip
PARSED = {
    "input_size": square_input,
    "ratios": lambda text: tuple(parse_ratios(text)),
    "seeds": lambda text: tuple(int(seed) for seed in text.split(",")),
}


@pytest.mark.parametrize(
    "path, target, differ", LIBRARY_DEFAULTS, ids=[" ".join(p) for p, *_ in LIBRARY_DEFAULTS]
)
def test_option_defaults_are_the_library_defaults(path, target, differ):
    """The CLI writes out defaults that live in modules importing torch; they must not drift."""
    module, name = target.rsplit(".", 1)
    library = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    checked = 0
    for param in command(*path).params:
        wanted = library.get(param.name)
        if wanted is None or wanted.default is inspect.Parameter.empty or param.name in differ:
            continue
        value = PARSED.get(param.name, lambda v: v)(param.default)
        if isinstance(wanted.default, tuple) and isinstance(value, str):
            value = tuple(value.split(","))  # comma-separated names
        assert value == wanted.default, f"{' '.join(path)} --{param.name.replace('_', '-')}"
        checked += 1
    assert checked, f"no option of {' '.join(path)} has a library default"
