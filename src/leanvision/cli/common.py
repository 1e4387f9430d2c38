"""What the command modules share: the console, the error exits, parsers of option text, and the option
types that more than one command takes."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Annotated, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from leanvision.errors import LeanvisionError

# Piped output (not a terminal) keeps wide tables whole instead of cutting them to 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=200)
T = TypeVar("T")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `message` as one red error line (never wrapped) and exit with `code` (2: bad input)."""
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def run(work: Callable[[], T]) -> T:
    """Return `work()`. A LeanvisionError (bad input) becomes one error line and exit code 2; Ctrl-C one
    line and exit code 130 (what was saved says so itself); any other exception is a bug and propagates
    with its traceback."""
    try:
        return work()
    except LeanvisionError as err:
        fail(str(err))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        raise typer.Exit(130) from None


def plot_file(path: str | None, option: str = "--plot") -> None:
    """Check an image file to be written after the work, before the work starts: a format matplotlib
    writes, in a folder (created if missing)."""
    if path is None:
        return
    from pathlib import Path

    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in formats:
        fail(f"{option} {path}: the suffix names the image format, one of {', '.join(sorted(formats))}")
    folder = Path(path).parent
    if folder.exists() and not folder.is_dir():
        fail(f"{option} {path}: {folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)


def millions(n: float) -> str:
    """A count in millions: 4796873 -> '4.80M'."""
    return f"{n / 1e6:.2f}M"


def parse_input_size(text: str | None, default: tuple[int, int, int], channels: int) -> tuple[int, int, int]:
    """--input-size N (square) or HxW -> (C, H, W); None keeps the model's default size."""
    if text is None:
        return (channels, *default[1:])
    try:
        sides = [int(v) for v in text.lower().split("x")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides) < 1:
        fail(f"--input-size must be N or HxW in pixels, such as 224 or 240x320, got {text!r}")
    height, width = sides * 2 if len(sides) == 1 else sides
    return (channels, height, width)


def square_input(size: int) -> tuple[int, int, int]:
    """--input-size N -> the input shape (3, N, N)."""
    if size < 1:
        fail(f"--input-size must be a positive number of pixels, got {size}")
    return (3, size, size)


def parse_ratios(text: str) -> list[float]:
    """--ratios START:STOP:STEP -> the values from START to STOP (included)."""
    try:
        start, stop, step = (float(v) for v in text.split(":"))
    except ValueError:
        fail(f"--ratios must be START:STOP:STEP such as 0.1:1.0:0.1, got {text!r}")
    if step <= 0:
        fail(f"--ratios step must be positive, got {step}")
    return [round(start + i * step, 6) for i in range(int(round((stop - start) / step)) + 1)]


def parse_count(text: str, option: str) -> int:
    """'200000', '200k', '0.2M' or '1.5G' -> an integer count."""
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 0:
        fail(f"{option} must be a count such as 200000, 200k or 0.2M, got {text!r}")
    return round(value)


def parse_ints(
    text: str, option: str, expected: str = "comma-separated integers such as 0,1"
) -> tuple[int, ...]:
    """--blocks 1,2,1,1 -> (1, 2, 1, 1); text that is not integers fails, naming `option` and `expected`."""
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        fail(f"{option} must be {expected}, got {text!r}")


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Fail on corrupt images instead of skipping them.")]
ModelOpt = Annotated[str, typer.Option(help="Registered model name.")]
BackendOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--backend",
        help="eager, deploy, compile, aot, ort, ort-int8 or best; repeat it to time several in one "
        "interleaved loop (CPU).",
    ),
]
InputSizeOpt = Annotated[int, typer.Option(help="Square input resolution.")]
NumClassesOpt = Annotated[int | None, typer.Option(help="Classifier outputs (default: the model's own).")]
ThreadsOpt = Annotated[int | None, typer.Option(help="CPU threads (default: PyTorch's).")]
DeviceOpt = Annotated[str, typer.Option(help="cpu or cuda.")]
AutoDeviceOpt = Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")]
ForwardBatchOpt = Annotated[int, typer.Option(help="Images per forward pass.")]
StepBatchOpt = Annotated[int, typer.Option(help="Images per step.")]
DataImgSizeOpt = Annotated[int | None, typer.Option(help="Resize images to this (default: the data's).")]
RunImgSizeOpt = Annotated[int | None, typer.Option(help="Image size (default: the checkpoint's run).")]
SquareImgSizeOpt = Annotated[int, typer.Option(help="Square image size.")]
ResNetWeightsOpt = Annotated[str, typer.Option(help="Full torchvision/timm ResNet state_dict file.")]
ResNetOpt = Annotated[str, typer.Option(help="resnet18, resnet34, resnet50, resnet101 or resnet152.")]
TrainSeedOpt = Annotated[int, typer.Option(help="Seed of initialisation and data order.")]
ReproOutOpt = Annotated[str, typer.Option(help="Empty output folder.")]
ReproEpochsOpt = Annotated[int | None, typer.Option(help="Epochs per model (default: the experiment's).")]
ReproLrOpt = Annotated[float | None, typer.Option(help="AdamW learning rate (default: the experiment's).")]
