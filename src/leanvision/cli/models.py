"""Commands that measure one model: `models`, `profile`, `bench` and `memory`."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from leanvision.cli.common import (
    BackendOpt,
    DeviceOpt,
    ForwardBatchOpt,
    InputSizeOpt,
    JsonOpt,
    NumClassesOpt,
    ThreadsOpt,
    console,
    fail,
    plot_file,
    run,
    square_input,
)

if TYPE_CHECKING:
    from torch import nn

    from leanvision.analysis.memory import MemoryReport
    from leanvision.analysis.memory_trace import Graph


def models(
    pattern: Annotated[str, typer.Argument(help="Shell-style pattern, e.g. 'rexnet_*'.")] = "*",
    as_json: JsonOpt = False,
) -> None:
    """List the registered model names."""
    from leanvision.models.registry import get_model_config, list_models

    names = list_models(pattern)
    if not names:
        fail(f"no registered model matches {pattern!r}; `leanvision models` lists them all")
    if as_json:
        print(json.dumps(names))
        return
    table = Table("model", "paper top-1", "paper params", "paper FLOPs")
    for name in names:
        paper = get_model_config(name).paper
        table.add_row(
            name,
            *(
                f"{paper[k]}{unit}" if k in paper else ""
                for k, unit in (("top1", "%"), ("params_m", "M"), ("flops_b", "B"))
            ),
        )
    console.print(table)


def profile(
    name: str,
    input_size: InputSizeOpt = 224,
    num_classes: NumClassesOpt = None,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="Show one row per layer.")] = False,
    elementwise: Annotated[bool, typer.Option("--elementwise", help="Also count elementwise ops.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Count parameters and MACs of a model at one input size (batch 1)."""
    from leanvision.analysis.cost import profile as count

    report = run(
        lambda: count(
            name, input_size=square_input(input_size), elementwise=elementwise, num_classes=num_classes
        )
    )
    if as_json:
        print(json.dumps(report.to_dict() if per_layer else {**report.to_dict(), "layers": None}))
        return
    if per_layer:
        table = Table("layer", "type", "output", "params", "MACs", title=f"{name} per layer")
        for row in report.layers:
            shape = "x".join(map(str, row.output_shape[1:])) if row.output_shape else ""
            table.add_row(row.name, row.type, shape, f"{row.params:,}", f"{row.macs:,}")
        console.print(table)
    console.print(
        f"[bold]{name}[/bold] at {input_size}x{input_size}: {report.params:,} params, {report.macs:,} MACs "
        f"({report.macs / 1e9:.3f} GMACs; counted: {report.counted}; FLOPs = 2 x MACs)"
    )


def bench(
    name: str,
    batch_size: ForwardBatchOpt = 1,
    input_size: InputSizeOpt = 224,
    threads: ThreadsOpt = None,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="NHWC memory format.")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    deploy: Annotated[bool, typer.Option("--deploy", help="Fold BN and use the fastest CPU layout.")] = False,
    backend: BackendOpt = None,
    min_seconds: Annotated[float, typer.Option(help="Minimum timed seconds.")] = 2.0,
    device: DeviceOpt = "cpu",
    pretrained: Annotated[
        str | None, typer.Option(help="Local checkpoint (default: random weights, BN calibrated).")
    ] = None,
    num_classes: NumClassesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure latency and throughput after warm-up: median, p10/p90 and images/s.

    With --backend (repeatable) the backends run side by side on the same input in one interleaved loop;
    ONNX Runtime with intra-op spinning off, so it does not slow the candidate after it."""
    if backend:
        if channels_last or compile or deploy or device != "cpu":
            fail("--backend replaces --channels-last, --compile and --deploy, and runs on the CPU")
        _bench_backends(name, backend, batch_size, input_size, threads, min_seconds, pretrained, num_classes,
                        as_json)  # fmt: skip
        return
    from leanvision.bench import benchmark

    result = run(
        lambda: benchmark(
            name, batch_size=batch_size, input_size=square_input(input_size), threads=threads,
            channels_last=channels_last, compile=compile, deploy=deploy, min_seconds=min_seconds,
            device=device, pretrained=pretrained, num_classes=num_classes,
        )
    )  # fmt: skip
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    modes = (("deploy", deploy), ("channels-last", channels_last), ("compile", compile))
    mode = ", ".join(m for m, on in modes if on) or "eager"
    console.print(
        f"[bold]{name}[/bold] batch {batch_size} at {input_size}x{input_size} ({mode}, {result.device}, "
        f"{result.threads} threads, {result.iterations} runs): median {result.median_ms:.2f} ms "
        f"(p10 {result.p10_ms:.2f}, p90 {result.p90_ms:.2f}), {result.images_per_s:.1f} images/s; "
        f"weights: {pretrained or 'random, BN statistics calibrated'}"
    )


def _bench_backends(
    name: str,
    backends: list[str],
    batch_size: int,
    input_size: int,
    threads: int | None,
    min_seconds: float,
    pretrained: str | None,
    num_classes: int | None,
    as_json: bool,
) -> None:
    from leanvision.export.backends import check_backends, time_backends

    run(lambda: check_backends(backends))  # before the model is built
    size = square_input(input_size)
    model = _bench_model(name, pretrained, num_classes, size)
    size = (getattr(model, "in_chans", size[0]), *size[1:])
    rows = run(lambda: time_backends(model, backends, size, batch_size, threads, min_seconds=min_seconds))
    if as_json:
        print(json.dumps({"model": name, "results": rows}))
        return
    fastest = min(r["median_ms"] for r in rows)
    table = Table("backend", "median ms", "p10", "p90", "images/s", "x fastest", "prepare s", "note")
    for r in rows:
        table.add_row(
            r["backend"], f"{r['median_ms']:.2f}", f"{r['p10_ms']:.2f}", f"{r['p90_ms']:.2f}",
            f"{r['images_per_s']:.1f}", f"{r['median_ms'] / fastest:.2f}", f"{r['prepare_s']:.1f}",
            r["detail"],
        )  # fmt: skip
    console.print(table)
    console.print(
        f"{name}, batch {batch_size} x {' x '.join(map(str, size))}, {rows[0]['threads']} threads, "
        f"interleaved rounds; weights: {pretrained or 'random, BN statistics calibrated'}"
    )


def _bench_model(
    name: str, pretrained: str | None, num_classes: int | None, size: tuple[int, int, int]
) -> nn.Module:
    """The model `bench` times: its weights, or random ones with BN statistics calibrated."""
    from leanvision.bench import calibrate_batchnorm
    from leanvision.models.registry import create_model

    model = run(lambda: create_model(name, pretrained=pretrained, num_classes=num_classes))
    if pretrained is None:
        channels = getattr(model, "in_chans", size[0])
        calibrate_batchnorm(model, (channels, *size[1:]))
    return model.eval()


def memory(
    name: str,
    convention: Annotated[str, typer.Option(help="layer, min, planner or all.")] = "layer",
    dtype: Annotated[str, typer.Option(help="Element type: fp32, fp16, bf16 or int8.")] = "fp32",
    input_size: InputSizeOpt = 224,
    inplace_depthwise: Annotated[
        bool, typer.Option("--inplace-depthwise", help="Planner: depthwise convs overwrite their input.")
    ] = False,
    budget_kib: Annotated[
        float | None, typer.Option("--budget-kib", help="RAM budget (KiB): on --plot; met by recompute.")
    ] = None,
    per_step: Annotated[bool, typer.Option("--per-step", help="Show the timeline, one row per step.")] = (
        False
    ),
    plot: Annotated[str | None, typer.Option(help="Save live memory per step to this PNG file.")] = None,
    measured: Annotated[
        bool, typer.Option("--measured", help="Also measure the tensors alive in one eager fp32 forward.")
    ] = False,
    streamed: Annotated[
        bool,
        typer.Option(
            "--streamed", help="Also measure the streamed model (RNNPool nets; implies --measured)."
        ),
    ] = False,
    split_blocks: Annotated[
        int | None,
        typer.Option(
            "--split-blocks",
            help="With --streamed: run the first K blocks patch by patch (any plain CNN, MCUNetV2-style).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Peak inference RAM (activations, batch 1) under the layer, min or planner convention."""
    from leanvision.analysis.memory import CONVENTIONS, DTYPE_BYTES, peak_memory, plot_timeline
    from leanvision.analysis.memory import trace as trace_model

    if convention not in (*CONVENTIONS, "all"):
        fail(f"--convention must be one of {', '.join(CONVENTIONS)} or all, got {convention!r}")
    if dtype not in DTYPE_BYTES:
        fail(f"--dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    if budget_kib is not None and not 0 < budget_kib < math.inf:
        fail(f"--budget-kib must be a positive number of KiB, got {budget_kib}")
    if split_blocks is not None and (not streamed or split_blocks < 1):
        fail(f"--split-blocks needs --streamed and K >= 1, got {split_blocks} with --streamed={streamed}")
    measured = measured or streamed
    if measured and dtype != "fp32":
        fail(f"--measured runs the model in fp32: use --dtype fp32 with it, got {dtype!r}")
    plot_file(plot)
    graph = run(lambda: trace_model(name, square_input(input_size)))
    size = square_input(input_size)
    peaks = run(lambda: _measured_peaks(graph.model, size, streamed, split_blocks)) if measured else {}
    options = dict(dtype_bytes=DTYPE_BYTES[dtype], inplace_depthwise=inplace_depthwise)
    reports = [
        run(lambda c=c: peak_memory(graph, convention=c, **options))
        for c in (CONVENTIONS if convention == "all" else (convention,))
    ]
    if plot:
        plot_timeline(reports, plot, None if budget_kib is None else int(budget_kib * 2**10))
    if as_json:
        extra = {f"{kind}_{key}": value for kind, peak in peaks.items() for key, value in peak.items()}
        print(
            json.dumps([{**r.to_dict(), **({} if per_step else {"steps": None}), **extra} for r in reports])
        )
        return
    _print_memory(reports, name, f"{name} at {input_size}x{input_size}, {dtype}", per_step, peaks)
    if budget_kib is not None:
        _print_recompute(graph, int(budget_kib * 2**10), DTYPE_BYTES[dtype])


def _measured_peaks(
    model: nn.Module, input_size: tuple[int, int, int], streamed: bool, split_blocks: int | None = None
) -> dict[str, dict]:
    """measure_peak of one batch-1 fp32 forward (eval mode, no grad) of `model`, and with `streamed` of
    `stream(model, input_size, split_blocks=...)`: {"measured": {...}, "streamed": {...}} of peak_bytes,
    peak_op and the largest tensors alive at the peak (and a patch-based model's MACs). Inputs and weights
    are not counted (they exist before the call)."""
    import torch

    from leanvision.analysis.measured import measure_peak
    from leanvision.deploy.streaming import stream

    was_training = model.training
    model.eval()
    try:
        lean = stream(model, input_size, split_blocks=split_blocks) if streamed else None  # fails early
        x = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            runs = {"measured": measure_peak(model, x)}
            if lean is not None:
                runs["streamed"] = measure_peak(lean, x)
    finally:
        model.train(was_training)
    peaks = {}
    for kind, peak in runs.items():
        peaks[kind] = dict(
            peak_bytes=peak.peak_bytes,
            peak_op=peak.peak_op,
            live_at_peak=[dict(op=t.op, shape=list(t.shape), bytes=t.nbytes) for t in peak.live_at_peak[:5]],
        )
    if split_blocks is not None:  # a PatchBasedModel: what recomputing the overlap costs
        peaks["streamed"].update(
            split_blocks=split_blocks, base_macs=lean.base_macs, extra_macs=lean.extra_macs
        )
    return peaks


def _print_memory(
    reports: list[MemoryReport], name: str, title: str, per_step: bool, peaks: dict[str, dict] | None = None
) -> None:
    """The timeline of each report (with --per-step), then one row per convention (and per measured
    peak), and the notes."""
    from leanvision.analysis.memory import format_bytes

    peaks = peaks or {}
    for report in reports if per_step else ():
        table = Table("step", "kind", "live", "detail", title=f"{name}: {report.convention} convention")
        for step in report.steps:
            table.add_row(step.name, step.kind, format_bytes(step.live_bytes), step.detail)
        console.print(table)
    table = Table("convention", "peak", "bytes", "peak at", title=title)
    for r in reports:
        table.add_row(r.convention, format_bytes(r.peak_bytes), f"{r.peak_bytes:,}", r.peak_layer)
    for kind, label in (("measured", "measured, eager"), ("streamed", "measured, streamed")):
        if kind in peaks:
            peak = peaks[kind]
            table.add_row(label, format_bytes(peak["peak_bytes"]), f"{peak['peak_bytes']:,}", peak["peak_op"])
    console.print(table)
    for note in dict.fromkeys(n for r in reports for n in r.notes):
        console.print(f"- {note}")
    if peaks:
        console.print(
            "- measured: bytes of the tensors alive during one batch-1 fp32 forward (eval mode, no grad; the "
            "input and the weights not counted), leanvision.measure_peak; its peak at is the aten op"
            + ("; streamed: leanvision.stream(model, input_size)" if "streamed" in peaks else "")
        )
    layer = next((r.peak_bytes for r in reports if r.convention == "layer"), None)
    if "streamed" in peaks and layer:
        streamed = peaks["streamed"]
        held = ", ".join(
            f"{t['op']} {'x'.join(map(str, t['shape']))} ({format_bytes(t['bytes'])})"
            for t in streamed["live_at_peak"][:3]
        )
        console.print(
            f"- streamed / layer = {streamed['peak_bytes'] / layer:.2f}, streamed / eager = "
            f"{streamed['peak_bytes'] / max(peaks['measured']['peak_bytes'], 1):.3f}; alive at the streamed "
            f"peak: {held or 'nothing'}"
        )
    if "streamed" in peaks and "split_blocks" in peaks["streamed"]:
        streamed = peaks["streamed"]
        console.print(
            f"- patch-based: the first {streamed['split_blocks']} blocks patch by patch add "
            f"{streamed['extra_macs'] / 1e6:.1f}M MACs to {streamed['base_macs'] / 1e6:.1f}M"
        )


def _print_recompute(graph: Graph, budget_bytes: int, dtype_bytes: int) -> None:
    """The line of what patch-by-patch recompute (RNNPool E.3) costs to meet `budget_bytes`."""
    from leanvision.analysis.memory import format_bytes
    from leanvision.analysis.recompute import recompute_cost

    try:
        cost = recompute_cost(graph, budget_bytes, dtype_bytes=dtype_bytes)
    except ValueError as err:
        console.print(f"- recompute (RNNPool E.3): {err}")
        return
    console.print(
        f"- recompute (RNNPool E.3) for {format_bytes(cost.budget_bytes)}: layer peak "
        f"{format_bytes(cost.peak_bytes)} at {cost.conv_block_a}, {cost.macs / 1e9:.3f}G MACs "
        f"({cost.extra_macs / 1e9:+.3f}G), rebuilding {cost.activation or 'nothing'} patch by patch"
    )
