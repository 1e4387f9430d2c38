"""The `leanvision` command line: `app` gathers the commands of the modules of this package.

Options default to what the config or function they feed defaults to: a config that is cheap to import
gives its defaults directly (DemoConfig); where the import would load torch at start-up the value is
written out, and tests/test_cli.py checks that it matches the library's default.
"""

from __future__ import annotations

import warnings
from typing import Annotated

import typer

from leanvision.cli import detect, experiments, export, models, rank, rrr, search, train

app = typer.Typer(help="Build, measure and slim vision networks.", no_args_is_help=True, add_completion=False)


def warning_line(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """How the command prints a warning (a skipped corrupt image, ...): `warning: message`, one line,
    without the source line of leanvision that raised it."""
    return f"warning: {message}\n"


def _print_version(given: bool) -> None:
    if given:
        from importlib.metadata import version

        print(f"leanvision {version('leanvision')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Build, measure and slim vision networks."""
    warnings.formatwarning = warning_line


app.command("models")(models.models)
app.command("profile")(models.profile)
app.command("bench")(models.bench)
app.command("compare")(experiments.compare)
app.command("demo")(experiments.demo)
app.command("train")(train.train)
app.command("eval")(train.evaluate)
app.command("detect")(detect.detect)
app.command("export")(export.export)
app.command("memory")(models.memory)
app.command("rank-study")(rank.rank_study_command)
app.command("rank")(rank.rank_command)
app.add_typer(experiments.repro_app, name="repro")
app.add_typer(rrr.rrr_app, name="rrr")
app.add_typer(search.search_app, name="search")


def main() -> None:
    """Run the command line (`python -m leanvision.cli`, which torchrun launches)."""
    app()
