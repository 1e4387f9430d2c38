"""How the command line reports failures: bad input (a LeanvisionError) as one line with exit code 2, a
failed run as one line with exit code 1, and a bug as itself, with its traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from leanvision.cli import app
from leanvision.cli.common import run
from leanvision.engine.train import NonFiniteLossError
from leanvision.errors import InvalidArgumentError
from leanvision.experiments.channel_search.study import WorkerError

runner = CliRunner()

# (command line, the library function it calls through common.run)
COMMANDS = [
    (["profile", "rexnet_100"], "leanvision.analysis.cost.profile"),
    (["bench", "rexnet_100"], "leanvision.bench.benchmark"),
    (["memory", "rexnet_100"], "leanvision.analysis.memory.trace"),
    (["compare", "rexnet_100"], "leanvision.experiments.compare.compare"),
    (["train", "--model", "m", "--data", "d"], "leanvision.engine.train.train"),
    (["eval", "--model", "m", "--checkpoint", "c", "--data", "d"],
     "leanvision.engine.train.evaluate_checkpoint"),
    (["rank-study"], "leanvision.analysis.rank.rank_study"),
    (["rank", "--model", "m", "--checkpoint", "c", "--data", "d"],
     "leanvision.experiments.feature_rank.feature_spectrum"),
    (["repro", "rnnpool-probe"], "leanvision.experiments.repro.rnnpool_probe"),
    (["rrr", "reduce", "--weights", "w", "--out", "o"], "leanvision.experiments.rrr.reduce_checkpoint"),
    (["rrr", "run", "--weights", "w", "--data", "d"], "leanvision.experiments.rrr.run_methods"),
    (["search", "channels", "--data", "d"], "leanvision.experiments.channel_search.study.run_search"),
]  # fmt: skip
IDS = [" ".join(args[:2]) for args, _ in COMMANDS]


def raising(error: BaseException):
    """A stand-in for a library function: it raises `error`."""

    def work(*args, **kwargs):
        raise error

    return work


@pytest.mark.parametrize("args, target", COMMANDS, ids=IDS)
def test_bad_input_is_one_line_and_exit_code_2(monkeypatch, args, target):
    message = "--thing must be [3, 1024] or [bold]x[/bold], got 7; " + ", ".join(["a long explanation"] * 8)
    monkeypatch.setattr(target, raising(InvalidArgumentError(message)))
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.output.splitlines() == [f"error: {message}"]  # not wrapped, markup printed as is


@pytest.mark.parametrize("error", [KeyError("key"), RuntimeError("boom"), ValueError("not leanvision's")])
@pytest.mark.parametrize("args, target", COMMANDS, ids=IDS)
def test_a_bug_is_not_swallowed(monkeypatch, args, target, error):
    monkeypatch.setattr(target, raising(error))
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and result.exception is error
    assert "error:" not in result.output


@pytest.mark.parametrize(
    "args, target, error",
    [
        (["train", "--model", "m", "--data", "d"], "leanvision.engine.train.train", NonFiniteLossError),
        (["search", "channels", "--data", "d"], "leanvision.experiments.channel_search.study.run_search",
         WorkerError),
    ],
)  # fmt: skip
def test_a_failed_run_is_one_line_and_exit_code_1(monkeypatch, args, target, error):
    """A run that started but failed (not bad input, not a bug) exits with 1."""
    monkeypatch.setattr(target, raising(error("loss is nan at epoch 3")))
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and result.output.splitlines() == ["error: loss is nan at epoch 3"]


def test_run_returns_the_result_and_lets_other_errors_through():
    assert run(lambda: 42) == 42
    with pytest.raises(KeyError, match="key"):
        run(raising(KeyError("key")))


def test_a_bug_shows_its_traceback(tmp_path):
    """The installed command (not CliRunner): exit code 1, and the traceback ends with the bug."""
    code = (
        "import sys, leanvision.analysis.cost as cost\n"
        "def bug(*args, **kwargs): raise KeyError('key')\n"
        "cost.profile = bug\n"
        "from leanvision.cli import main\n"
        "sys.argv = ['leanvision', 'profile', 'rexnet_100']\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and done.stderr.rstrip().endswith("KeyError: 'key'")
    assert "error:" not in done.stdout


@pytest.mark.parametrize(
    "command",
    [
        ["memory", "mobilenetv2_035", "--input-size", "32"],
        ["rank-study", "--networks", "1", "--ratios", "0.5:1:0.5"],
    ],
)
def test_plot_files_are_checked_before_the_work(tmp_path, command, monkeypatch):
    """Issue 20, item 7: --plot into a missing folder is created before the work (the figure lands), an
    unknown format or a file in the folder's place fails before any work."""
    runner = CliRunner()
    target = tmp_path / "new" / "deeper" / "plot.png"
    result = runner.invoke(app, [*command, "--plot", str(target)])
    assert result.exit_code == 0, result.output
    assert target.stat().st_size > 1000
    (tmp_path / "file").write_text("x")
    import leanvision.analysis.memory as memory
    import leanvision.analysis.rank as rank

    def no_work(*args, **kwargs):
        raise AssertionError("the work started before the options were checked")

    monkeypatch.setattr(memory, "trace", no_work)
    monkeypatch.setattr(rank, "rank_study", no_work)
    for bad, message in (
        (tmp_path / "file" / "plot.png", "is a file, not a folder"),
        (tmp_path / "plot.xyz", "suffix names the image format"),
    ):
        result = runner.invoke(app, [*command, "--plot", str(bad)])
        assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["search", "channels", "--data", "synthetic:lines", "--max-params", "1e400"],
            "--max-params must be a count",
        ),
        (
            ["search", "channels", "--data", "synthetic:lines", "--max-macs", "-5M"],
            "--max-macs must be a count",
        ),
        (["repro", "rnnpool-probe", "--max-hidden", "0"], "max_hidden must be an integer >= 4"),
        (["models", "nosuch*"], "no registered model matches 'nosuch*'"),
    ],
)
def test_out_of_range_options_are_one_line_errors(tmp_path, args, message):
    """Issue 20, item 10 (and a rough edge): overflowing counts, a zero probe size and a pattern matching
    nothing are bad input, not an OverflowError or an empty table with exit code 0."""
    result = CliRunner().invoke(
        app, [*args, *(["--out", str(tmp_path / "out")] if args[0] != "models" else [])]
    )
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_rnnpool_takes_an_empty_batch():
    import torch

    from leanvision.layers import RNNPoolLayer

    layer = RNNPoolLayer(4, 8, 6, 4, 2)
    assert (
        layer(torch.zeros(0, 4, 16, 16)).shape
        == (0, 24, 8, 8)
        == (0, *layer(torch.zeros(1, 4, 16, 16)).shape[1:])
    )
