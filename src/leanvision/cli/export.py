"""`leanvision export`: a model to ONNX (fp32, or int8 QDQ calibrated on a data spec)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from leanvision.cli.common import JsonOpt, NumClassesOpt, StrictOpt, console, fail, parse_input_size, run


def export(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    out: Annotated[str, typer.Option(help="Output ONNX file.")],
    pretrained: Annotated[str | None, typer.Option(help="Weights file (default: random weights).")] = None,
    num_classes: NumClassesOpt = None,
    in_chans: Annotated[int | None, typer.Option(help="Input channels (default: the model's).")] = None,
    input_size: Annotated[
        str | None, typer.Option(help="N or HxW (default: the model's input size); the batch is dynamic.")
    ] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Static int8 (QDQ) quantisation.")] = False,
    calib: Annotated[str | None, typer.Option(help="--int8: calibration data spec (its images).")] = None,
    calib_images: Annotated[int, typer.Option(help="--int8: calibration images.")] = 256,
    calib_method: Annotated[str, typer.Option(help="--int8: minmax, entropy or percentile.")] = "minmax",
    per_channel: Annotated[bool, typer.Option("--per-channel", help="--int8: per-channel weights.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file.")] = False,
    strict: StrictOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Export a model to ONNX, checked by ONNX Runtime against PyTorch (1e-4 of the largest output).

    Detectors export their raw outputs (loc, conf, priors) with the image normalisation in the graph;
    decoding and NMS stay in Python. With --int8 the summary adds the int8 weights, the activation peak
    under the memory analysis at 1 byte per element and the cosine of int8 and fp32 outputs.
    """
    from pathlib import Path

    from leanvision.export import CALIBRATION_METHODS

    if Path(out).exists() and not overwrite:
        fail(f"{out} already exists; pass --overwrite to replace it")
    if int8 and calib is None:
        fail("--int8 needs calibration data: --calib DATA_SPEC (any --data spec, synthetic ones included)")
    if not int8 and (calib is not None or per_channel):
        fail("--calib and --per-channel go with --int8")
    if calib_method not in CALIBRATION_METHODS:
        fail(f"--calib-method must be one of {', '.join(CALIBRATION_METHODS)}, got {calib_method!r}")
    if calib_images < 1:
        fail(f"--calib-images must be >= 1, got {calib_images}")
    from leanvision.models.registry import create_model

    kwargs = {} if in_chans is None else {"in_chans": in_chans}
    model = run(lambda: create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)).eval()
    channels = getattr(model, "in_chans", None) or model.default_cfg.input_size[0]
    size = parse_input_size(input_size, model.default_cfg.input_size, channels)
    from leanvision.export import export_model

    summary = run(
        lambda: export_model(
            model, out, size, int8, calib, calib_images, per_channel, calib_method, strict=strict
        )
    )
    if as_json:
        print(json.dumps(summary))
        return
    table = Table("", "value", title=f"{name} -> {summary['path']} ({summary['format']})")
    table.add_row("input", "B x " + " x ".join(map(str, size)) + " (B dynamic)")
    table.add_row("outputs", ", ".join(summary["outputs"]))
    table.add_row("file", f"{summary['file_bytes'] / 1024:.1f} KiB")
    table.add_row("fp32 weights", f"{summary['fp32_weight_bytes'] / 1024:.1f} KiB")
    table.add_row("max |ORT - PyTorch|, fp32", f"{summary['fp32_max_abs_diff_vs_torch']:.2e}")
    if int8:
        table.add_row("int8 weights (with scales)", f"{summary['int8_weight_bytes'] / 1024:.1f} KiB")
        table.add_row("activation peak, int8", f"{summary['int8_activation_peak_bytes'] / 1024:.1f} KiB")
        table.add_row("cosine int8 vs fp32", f"{summary['cosine_int8_vs_fp32']:.5f}")
        table.add_row("calibration", f"{summary['calibration']['images']} images of {calib}")
    console.print(table)
