"""The `leanvision` command line."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn
from rich.table import Table

app = typer.Typer(help="Build, measure and slim vision networks.", no_args_is_help=True, add_completion=False)
console = Console()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def _millions(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def _input_size(size: int, in_chans: int = 3) -> tuple[int, int, int]:
    if size < 1:
        _fail(f"--input-size must be a positive number of pixels, got {size}")
    return (in_chans, size, size)


@app.command()
def models(
    pattern: Annotated[str, typer.Argument(help="Shell-style pattern, e.g. 'rexnet_*'.")] = "*",
    as_json: JsonOpt = False,
) -> None:
    """List the registered model names."""
    from leanvision.models.registry import get_model_config, list_models

    names = list_models(pattern)
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


@app.command()
def profile(
    name: str,
    input_size: Annotated[int, typer.Option(help="Square input resolution.")] = 224,
    num_classes: Annotated[
        int | None, typer.Option(help="Classifier outputs (default: the model's own).")
    ] = None,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="Show one row per layer.")] = False,
    elementwise: Annotated[bool, typer.Option("--elementwise", help="Also count elementwise ops.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Count parameters and MACs of a model at one input size (batch 1)."""
    from leanvision.analysis.cost import profile as count

    report = _run(
        lambda: count(
            name, input_size=_input_size(input_size), elementwise=elementwise, num_classes=num_classes
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


@app.command()
def bench(
    name: str,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 1,
    input_size: Annotated[int, typer.Option(help="Square input resolution.")] = 224,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: PyTorch's).")] = None,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="NHWC memory format.")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    deploy: Annotated[bool, typer.Option("--deploy", help="Fold BN and use the fastest CPU layout.")] = False,
    min_seconds: Annotated[float, typer.Option(help="Minimum timed seconds.")] = 2.0,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    pretrained: Annotated[
        str | None, typer.Option(help="Local checkpoint (default: random weights, BN calibrated).")
    ] = None,
    num_classes: Annotated[
        int | None, typer.Option(help="Classifier outputs (default: the model's own).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure latency and throughput after warm-up: median, p10/p90 and images/s."""
    from leanvision.bench import benchmark

    result = _run(
        lambda: benchmark(
            name,
            batch_size=batch_size,
            input_size=_input_size(input_size),
            threads=threads,
            channels_last=channels_last,
            compile=compile,
            deploy=deploy,
            min_seconds=min_seconds,
            device=device,
            pretrained=pretrained,
            num_classes=num_classes,
        )
    )
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    mode = (
        ", ".join(
            m for m, on in (("deploy", deploy), ("channels-last", channels_last), ("compile", compile)) if on
        )
        or "eager"
    )
    console.print(
        f"[bold]{name}[/bold] batch {batch_size} at {input_size}x{input_size} ({mode}, {result.device}, "
        f"{result.threads} threads, {result.iterations} runs): median {result.median_ms:.2f} ms "
        f"(p10 {result.p10_ms:.2f}, p90 {result.p90_ms:.2f}), {result.images_per_s:.1f} images/s; "
        f"weights: {pretrained or 'random, BN statistics calibrated'}"
    )


@app.command()
def compare(
    names: Annotated[list[str] | None, typer.Argument(help="Models (default: ReXNet Table 5 set).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: PyTorch's).")] = None,
    min_seconds: Annotated[float, typer.Option(help="Minimum timed seconds per model.")] = 1.0,
    as_json: JsonOpt = False,
) -> None:
    """Compare models side by side: params, MACs, batch-1 CPU latency, and the papers' numbers."""
    from leanvision.experiments.compare import TABLE5_MODELS
    from leanvision.experiments.compare import compare as run_compare

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), console=console, transient=True, disable=as_json
    ) as progress:
        task = progress.add_task("measuring")
        rows = _run(
            lambda: run_compare(
                names or TABLE5_MODELS,
                threads=threads,
                min_seconds=min_seconds,
                on_model=lambda step: progress.update(task, description=step),
            )
        )
    if as_json:
        print(json.dumps(rows))
        return
    table = Table("model", "params", "MACs", "ms (b=1)", "top-1*", "params*", "FLOPs*")
    for r in rows:
        table.add_row(
            r["model"],
            _millions(r["params"]),
            f"{r['macs'] / 1e9:.3f}G",
            f"{r['latency_ms']:.1f}",
            f"{r['paper_top1']}%" if r["paper_top1"] else "",
            f"{r['paper_params_m']}M" if r["paper_params_m"] else "",
            f"{r['paper_flops_b']}B" if r["paper_flops_b"] else "",
        )
    console.print(table)
    console.print(
        "At 224x224. MACs: conv + linear multiply-accumulates (papers print them as FLOPs). "
        "ms: median batch-1 CPU latency on this machine, eager PyTorch, models timed in interleaved rounds. "
        "*: ImageNet numbers published in the ReXNet paper (Tables 4, 5, A1, A2)."
    )


@app.command()
def demo(
    data: Annotated[str, typer.Option(help="Dataset spec (default: generated, no download).")] = (
        "synthetic:lines,train=4000,val=1000"
    ),
    models: Annotated[str, typer.Option(help="Comma-separated registered model names.")] = (
        "mobilenetv2_100_lowres,rexnet_100_lowres,rexnet_100_lowres_rnnpool"
    ),
    epochs: Annotated[int, typer.Option(help="Epochs per model.")] = 3,
    img_size: Annotated[int, typer.Option(help="Square image size the data is resized to.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of data order and initialisation.")] = 0,
    out: Annotated[str, typer.Option(help="Empty report folder.")] = "runs/demo",
    latency_seconds: Annotated[float, typer.Option(help="Timed seconds of latency per model.")] = 2.0,
) -> None:
    """The main job: train a MobileNetV2, a ReXNet and an RNNPool net on the same data and compare costs."""
    from leanvision.experiments.demo import DemoConfig, run_demo

    config = DemoConfig(
        data, tuple(models.split(",")), epochs, img_size, seed=seed, out=out, latency_seconds=latency_seconds
    )
    console.print(config.plan())
    rows = _run(lambda: run_demo(config, log=console.print))
    table = Table(
        "model", "test acc", "params", "MACs", "peak RAM", "ms (b=1)", title=f"{data} at {img_size} px"
    )
    for r in rows:
        table.add_row(
            r["model"], f"{r['acc']:.2f}%", _millions(r["params"]), f"{r['macs'] / 1e6:.1f}M",
            f"{r['peak_ram_bytes'] / 1024:.1f} KiB", f"{r['latency_ms']:.2f}",
        )  # fmt: skip
    console.print(table)
    console.print(
        "peak RAM: activations of one batch-1 fp32 inference under the layer convention (RNNPool Appendix "
        f"E.2); ms: median batch-1 CPU latency, models timed in interleaved rounds. Report: {out}/"
    )


StrictOpt = Annotated[bool, typer.Option("--strict", help="Fail on corrupt images instead of skipping them.")]


@app.command()
def train(
    model: Annotated[str, typer.Option(help="Registered model name.")],
    data: Annotated[str, typer.Option(help="Dataset spec, e.g. synthetic:lines, fashion-mnist, folder:DIR.")],
    epochs: Annotated[int, typer.Option(help="Epochs to train (a resumed run may raise it).")] = 10,
    batch_size: Annotated[int, typer.Option(help="Images per step and process.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 0.05,
    opt: Annotated[str, typer.Option(help="sgd or adamw.")] = "sgd",
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    nesterov: Annotated[bool, typer.Option("--nesterov", help="Nesterov momentum.")] = False,
    wd: Annotated[float, typer.Option(help="Weight decay (weights only, not biases or norms).")] = 5e-5,
    sched: Annotated[str, typer.Option(help="cosine, step (x0.1 at 50% and 75%) or none.")] = "cosine",
    warmup_epochs: Annotated[int, typer.Option(help="Epochs of linear learning-rate warm-up.")] = 0,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing.")] = 0.0,
    img_size: Annotated[int | None, typer.Option(help="Resize images to this (default: the data's).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of weights, order and augmentation.")] = 0,
    out: Annotated[str | None, typer.Option(help="Output folder (default runs/MODEL).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from last.pt.")] = False,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    amp: Annotated[bool, typer.Option(help="Mixed precision on CUDA.")] = True,
    channels_last: Annotated[
        bool, typer.Option("--channels-last", help="NHWC memory format (faster convolutions on CPU).")
    ] = False,
    strict: StrictOpt = False,
) -> None:
    """Train a model; writes last.pt, metrics.csv, summary.json and curves.png to --out.

    Data-parallel: torchrun --nproc_per_node N $(which leanvision) train ... (gloo on CPU, nccl on CUDA).
    """
    from leanvision.engine.train import NonFiniteLossError, TrainConfig
    from leanvision.engine.train import train as run_training

    config = TrainConfig(
        model=model, data=data, epochs=epochs, batch_size=batch_size, lr=lr, opt=opt, momentum=momentum,
        nesterov=nesterov, wd=wd, sched=sched, warmup_epochs=warmup_epochs, label_smoothing=label_smoothing,
        img_size=img_size, seed=seed, out=out or f"runs/{model}", resume=resume, workers=workers,
        device=device, amp=amp, channels_last=channels_last, strict=strict,
    )  # fmt: skip
    try:
        result = _run(lambda: run_training(config))
    except NonFiniteLossError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from err
    if result.status == "interrupted":
        raise typer.Exit(130)
    if result.main_process:
        console.print(f"{result.status}: val acc {result.val['acc']:.2f}%; results in {result.out}")


@app.command(name="eval")
def evaluate(
    model: Annotated[str, typer.Option(help="Registered model name.")],
    checkpoint: Annotated[str, typer.Option(help="Weights file (a training last.pt or any checkpoint).")],
    data: Annotated[str, typer.Option(help="Dataset spec; its validation split is evaluated.")],
    img_size: Annotated[int | None, typer.Option(help="Image size (default: the checkpoint's run).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 256,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    strict: StrictOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a checkpoint on a dataset's validation split: loss and accuracy."""
    from leanvision.engine.train import evaluate_checkpoint

    metrics = _run(lambda: evaluate_checkpoint(model, checkpoint, data, img_size, batch_size, device, strict))
    if as_json:
        print(json.dumps(metrics))
        return
    extra = f", per-label accuracy {metrics['label_acc']:.2f}%" if "label_acc" in metrics else ""
    console.print(
        f"[bold]{model}[/bold] on {data} ({metrics['samples']} images): loss {metrics['loss']:.4f}, "
        f"accuracy {metrics['acc']:.2f}%{extra}"
    )


@app.command()
def memory(
    name: str,
    convention: Annotated[str, typer.Option(help="layer, min, planner or all.")] = "layer",
    dtype: Annotated[str, typer.Option(help="Element type: fp32, fp16, bf16 or int8.")] = "fp32",
    input_size: Annotated[int, typer.Option(help="Square input resolution.")] = 224,
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
    as_json: JsonOpt = False,
) -> None:
    """Peak inference RAM (activations, batch 1) under the layer, min or planner convention."""
    from leanvision.analysis.memory import CONVENTIONS, DTYPE_BYTES, format_bytes, peak_memory, plot_timeline
    from leanvision.analysis.memory import trace as trace_model

    if convention not in (*CONVENTIONS, "all"):
        _fail(f"--convention must be one of {', '.join(CONVENTIONS)} or all, got {convention!r}")
    if dtype not in DTYPE_BYTES:
        _fail(f"--dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    graph = _run(lambda: trace_model(name, _input_size(input_size)))
    options = dict(dtype_bytes=DTYPE_BYTES[dtype], inplace_depthwise=inplace_depthwise)
    reports = [
        _run(lambda c=c: peak_memory(graph, convention=c, **options))
        for c in (CONVENTIONS if convention == "all" else (convention,))
    ]
    if plot:
        plot_timeline(reports, plot, None if budget_kib is None else int(budget_kib * 2**10))
    if as_json:
        print(json.dumps([r.to_dict() if per_step else {**r.to_dict(), "steps": None} for r in reports]))
        return
    for report in reports if per_step else ():
        table = Table("step", "kind", "live", "detail", title=f"{name}: {report.convention} convention")
        for step in report.steps:
            table.add_row(step.name, step.kind, format_bytes(step.live_bytes), step.detail)
        console.print(table)
    title = f"{name} at {input_size}x{input_size}, {dtype}"
    table = Table("convention", "peak", "bytes", "peak at", title=title)
    for r in reports:
        table.add_row(r.convention, format_bytes(r.peak_bytes), f"{r.peak_bytes:,}", r.peak_layer)
    console.print(table)
    for note in dict.fromkeys(n for r in reports for n in r.notes):
        console.print(f"- {note}")
    if budget_kib is not None:
        from leanvision.analysis.recompute import recompute_cost

        try:
            cost = recompute_cost(graph, int(budget_kib * 2**10), dtype_bytes=DTYPE_BYTES[dtype])
        except ValueError as err:
            console.print(f"- recompute (RNNPool E.3): {err}")
            return
        console.print(
            f"- recompute (RNNPool E.3) for {format_bytes(cost.budget_bytes)}: layer peak "
            f"{format_bytes(cost.peak_bytes)} at {cost.conv_block_a}, {cost.macs / 1e9:.3f}G MACs "
            f"({cost.extra_macs / 1e9:+.3f}G), rebuilding {cost.activation or 'nothing'} patch by patch"
        )


@app.command()
def repro(
    name: Annotated[str, typer.Argument(help="rnnpool-probe, pooling-one-go or rexnet-factors.")],
    out: Annotated[str | None, typer.Option(help="Empty output folder (default runs/repro-NAME).")] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Epochs per model (default 20 probe, 10 one-go, 3 factors).")
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(help="AdamW learning rate (default 0.01 probe, 0.002 one-go, 0.005 factors)."),
    ] = None,
    train_size: Annotated[int, typer.Option(help="rnnpool-probe: generated training images.")] = 4000,
    val_size: Annotated[int, typer.Option(help="rnnpool-probe: generated test images.")] = 1000,
    max_hidden: Annotated[int, typer.Option(help="rnnpool-probe: largest h1, h2 tried.")] = 32,
    data: Annotated[
        list[str] | None,
        typer.Option(help="pooling-one-go: dataset specs; rexnet-factors: one (default fashion-mnist)."),
    ] = None,
) -> None:
    """Run a CPU-sized experiment of the RNNPool or ReXNet paper and print ours beside the paper's numbers.

    rexnet-factors: ReXNet Table 2, four two-bottleneck networks with matched MACs trained on 5000 images
    at 16x16 (see leanvision.experiments.rexnet_factors); test accuracy and nuclear norm of the final feature.
    """
    from leanvision.experiments import repro as experiments
    from leanvision.experiments.rexnet_factors import rexnet_factors

    out = out or f"runs/repro-{name}"
    kwargs = {k: v for k, v in (("epochs", epochs), ("lr", lr)) if v is not None}
    if name == "rnnpool-probe":
        rows = _run(
            lambda: experiments.rnnpool_probe(out, train_size, val_size, max_hidden=max_hidden, **kwargs)
        )
        table = Table(
            "data", "size", "conv", "ours (h1, h2)", "best test acc", "paper (h1, h2)", title="Table 7"
        )
        for r in rows:
            ours = f"{r['ours'][0]}, {r['ours'][1]}" if r["ours"] else f"none <= {max_hidden}"
            paper = f"{r['paper'][0]}, {r['paper'][1]}"
            table.add_row(
                r["data"], str(r["size"]), "yes" if r["conv"] else "no", ours, f"{r['best_acc']:.2f}%", paper
            )
    elif name == "pooling-one-go":
        rows = _run(lambda: experiments.pooling_one_go(out, tuple(data or ["fashion-mnist"]), **kwargs))
        table = Table("data", "pooling", "test acc", "paper (CIFAR-10)", title="Appendix C.2")
        for r in rows:
            table.add_row(r["data"], r["pooling"], f"{r['acc']:.2f}%", f"{r['paper']}%" if r["paper"] else "")
    elif name == "rexnet-factors":
        if data is not None and len(data) != 1:
            _fail(f"rexnet-factors takes one --data spec, got {len(data)}")
        rows = _run(lambda: rexnet_factors(out, *(data or []), **kwargs))
        caption = "; ".join(f"{r['network']}: {r['change']}" for r in rows[1:])
        table = Table(
            "network", "channels", "MACs", "acc", "nuc. norm", "s/max s", "paper FLOPs", "paper acc",
            "paper nuc.", title="ReXNet Table 2 (paper: CIFAR-100, mean of 3)", caption=caption,
        )  # fmt: skip
        for r in rows:
            paper = r["paper"]
            table.add_row(
                r["network"], "-".join(map(str, r["channels"])), f"{r['macs'] / 1e6:.1f}M",
                f"{r['acc']:.2f}%", f"{r['nuclear_norm']:.1f}", f"{r['normalized_nuclear_norm']:.2f}",
                f"{paper['flops_m']}M", f"{paper['top1']}%", f"{paper['nuclear_norm']}",
            )  # fmt: skip
    else:
        _fail(f"unknown experiment {name!r}; expected rnnpool-probe, pooling-one-go or rexnet-factors")
    console.print(table)
    console.print(f"results in {out}")


rrr_app = typer.Typer(help="RRR-Net: reuse, reduce and recycle a pretrained ResNet.", no_args_is_help=True)
app.add_typer(rrr_app, name="rrr")


def _blocks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        _fail(f"--blocks must be four comma-separated integers such as 1,1,1,1, got {text!r}")


@rrr_app.command("reduce")
def rrr_reduce(
    weights: Annotated[str, typer.Option(help="Full torchvision/timm ResNet state_dict file.")],
    out: Annotated[str, typer.Option(help="Output checkpoint (.pth or .safetensors).")],
    backbone: Annotated[str, typer.Option(help="resnet18, resnet34, resnet50, resnet101 or resnet152.")] = (
        "resnet152"
    ),
    blocks: Annotated[str, typer.Option(help="Blocks kept in layer1..layer4, e.g. 1,1,1,1.")] = "1,1,1,1",
    branches: Annotated[int, typer.Option(help="Split layer3/layer4 into this many branches.")] = 1,
    num_classes: Annotated[int, typer.Option(help="Classifier outputs (fresh unless it fits).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the random part of the branch kernel slices.")] = 0,
) -> None:
    """Keep the first blocks of each stage of a pretrained ResNet (by name) and write the checkpoint."""
    from leanvision.experiments.rrr import reduce_checkpoint

    kept = _blocks(blocks)
    model = _run(lambda: reduce_checkpoint(backbone, weights, kept, out, num_classes, branches, seed))
    params = sum(p.numel() for p in model.parameters())
    console.print(
        f"rrrnet_{backbone} blocks {','.join(map(str, kept))}, {branches} branch(es): {params:,} params; "
        f"wrote {out} (load it with create_model('rrrnet_{backbone}', blocks={kept}, branches={branches}, "
        f"num_classes={num_classes}, pretrained='{out}'))"
    )


@rrr_app.command("select")
def rrr_select(
    weights: Annotated[str, typer.Option(help="Full torchvision/timm ResNet state_dict file.")],
    data: Annotated[str, typer.Option(help="One Meta-Album dataset: metaalbum:DIR[,seed=S,per_class=P].")],
    out: Annotated[str, typer.Option(help="Folder of the state file select.json, step runs and plot.")] = (
        "runs/rrr-select"
    ),
    backbone: Annotated[str, typer.Option(help="resnet18, resnet34, resnet50, resnet101 or resnet152.")] = (
        "resnet152"
    ),
    epochs: Annotated[int, typer.Option(help="Epoch budget of every step.")] = 10,
    holdout: Annotated[int, typer.Option(help="Validation images per class, from the training part.")] = 5,
    img_size: Annotated[int, typer.Option(help="Square image size.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and data order.")] = 0,
    patience: Annotated[int | None, typer.Option(help="Stop after N steps without a better score.")] = None,
    target: Annotated[float | None, typer.Option(help="Stop once val accuracy (%) reaches this.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many configurations.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Forward block selection: train 1111, 2111, ... (one block more per step, each warm-started from the
    last), score each on held-out training images, stop by patience or target; re-running continues."""
    from leanvision.experiments.rrr import SelectConfig, select_blocks

    config = SelectConfig(
        weights, data, backbone, out, epochs, holdout, img_size, batch_size, seed=seed, patience=patience,
        target=target, max_steps=max_steps,
    )  # fmt: skip

    def show(step: dict) -> None:
        console.print(f"blocks {step['blocks']}: {step['params']:,} params, val acc {step['val_acc']:.2f}%")

    state = _run(lambda: select_blocks(config, on_step=None if as_json else show))
    if as_json:
        print(json.dumps(state))
        return
    table = Table("step", "blocks", "params", "val acc", title=f"forward block selection, {backbone}")
    for i, step in enumerate(state["steps"]):
        mark = " (best)" if i == state["best"] else ""
        blocks_text = " ".join(map(str, step["blocks"]))
        table.add_row(str(i + 1), blocks_text + mark, f"{step['params']:,}", f"{step['val_acc']:.2f}%")
    console.print(table)
    console.print(f"stopped: {state['stopped']}; state in {out}/select.json, plot {out}/select.png")


@rrr_app.command("run")
def rrr_run(
    weights: Annotated[str, typer.Option(help="Full torchvision/timm ResNet state_dict file.")],
    data: Annotated[str, typer.Option(help="metaalbum:DIR (a dataset) or metaalbum:SETDIR (every dataset).")],
    backbone: Annotated[str, typer.Option(help="resnet152 (the paper's); smaller ones for quick runs.")] = (
        "resnet152"
    ),
    methods: Annotated[
        str | None, typer.Option(help="Comma-separated: linear_probe, fine_tune, resnet1111, rrrnet (all).")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs of every method.")] = 300,
    img_size: Annotated[int, typer.Option(help="Square image size.")] = 128,
    branches: Annotated[int, typer.Option(help="Branches of RRR-Net.")] = 8,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 32,
    warm_epochs: Annotated[int, typer.Option(help="Stem BN warm-up epochs (ResNet 1111, RRR-Net).")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and data order.")] = 0,
    out: Annotated[str, typer.Option(help="Folder of results.json, runs and plot.")] = "runs/rrr-run",
    threads: Annotated[int, typer.Option(help="CPU threads of the latency measurement.")] = 1,
    latency_seconds: Annotated[float, typer.Option(help="Minimum timed seconds per latency.")] = 2.0,
    as_json: JsonOpt = False,
) -> None:
    """The paper's comparison: linear probe, full fine-tuning, ResNet 1111 and RRR-Net on every dataset;
    accuracy per dataset and mean, params, MACs and batch-1 CPU latency. Re-running continues."""
    from leanvision.experiments.rrr import METHODS, RunConfig, run_methods

    config = RunConfig(
        data, weights, backbone, tuple(methods.split(",")) if methods else METHODS, epochs, img_size,
        branches, batch_size, warm_epochs=warm_epochs, seed=seed, out=out, threads=threads,
        latency_seconds=latency_seconds,
    )  # fmt: skip

    def show(entry: dict) -> None:
        console.print(f"{entry['dataset']} {entry['method']}: test acc {entry['acc']:.2f}%")

    report = _run(lambda: run_methods(config, on_result=None if as_json else show))
    if as_json:
        print(json.dumps(report))
        return
    summary = report["methods"]
    title = f"{backbone}, {img_size}px: test accuracy; CPU latency at batch 1, {threads} thread(s)"
    table = Table("dataset", *(entry["label"] for entry in summary.values()), title=title)
    for name in dict.fromkeys(r["dataset"] for r in report["results"]):
        accs = {r["method"]: r["acc"] for r in report["results"] if r["dataset"] == name}
        table.add_row(name, *(f"{accs[m]:.2f}%" for m in summary))
    table.add_row("mean", *(f"{e['mean_acc']:.2f}%" for e in summary.values()))
    table.add_row("params", *(_millions(e["params"]) for e in summary.values()))
    table.add_row("MACs", *(f"{e['macs'] / 1e9:.3f}G" for e in summary.values()))
    table.add_row("latency", *(f"{e['latency_ms']:.2f} ms" for e in summary.values()))
    console.print(table)
    console.print(f"results in {out}/results.json, plot {out}/accuracy_vs_macs.png")


def _ratios(text: str) -> list[float]:
    try:
        start, stop, step = (float(v) for v in text.split(":"))
    except ValueError:
        _fail(f"--ratios must be START:STOP:STEP such as 0.1:1.0:0.1, got {text!r}")
    if step <= 0:
        _fail(f"--ratios step must be positive, got {step}")
    return [round(start + i * step, 6) for i in range(int(round((stop - start) / step)) + 1)]


@app.command("rank-study")
def rank_study_command(
    blocks: Annotated[str, typer.Option(help="Comma-separated block types.")] = (
        "conv1x1,conv3x3,ib_conv,ib_dwconv"
    ),
    activations: Annotated[
        str, typer.Option(help="Comma-separated nonlinearities.")
    ] = "relu,relu6,leaky_relu,elu,softplus,hardswish,silu,identity",
    networks: Annotated[int, typer.Option(help="Random networks averaged per point.")] = 100,
    ratios: Annotated[str, typer.Option(help="Dimension ratios d_in/d_out as START:STOP:STEP.")] = (
        "0.1:1.0:0.1"
    ),
    batch: Annotated[int, typer.Option(help="Inputs N per network (must exceed d_out <= 64).")] = 128,
    rtol: Annotated[
        float,
        typer.Option(help="Rank = singular values above rtol x the largest (torch's default: eps x N)."),
    ] = 0.01,
    energy: Annotated[
        float | None,
        typer.Option(help="Instead: rank = fewest singular values holding this share of sum s^2."),
    ] = None,
    bottleneck_act: Annotated[
        str,
        typer.Option(help="Bottleneck nonlinearity: 'expansion' (once, after the 1x1 expansion) or 'both'."),
    ] = "expansion",
    seed: Annotated[int, typer.Option(help="Seed of sizes, weights and inputs.")] = 0,
    plot: Annotated[str | None, typer.Option(help="Save a Figure 1 style PNG to this file.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """ReXNet Section 3.2: mean rank ratio rank/d_out of random single-block networks vs d_in/d_out.

    Inputs are N vectors (1x1 maps) after BN; every conv is followed by BN; an inverted bottleneck has one
    nonlinearity, after its expansion. The paper states no rank rule and f(WX) is full rank in exact
    arithmetic, so the curves depend on it: the default counts singular values above 1% of the largest.
    See leanvision.analysis.rank for the measured choices.
    """
    from leanvision.analysis.rank import plot_rank_study, rank_study

    study = _run(
        lambda: rank_study(
            blocks=blocks.split(","), activations=activations.split(","), networks=networks,
            ratios=_ratios(ratios), batch=batch, seed=seed, rtol=rtol, energy=energy,
            bottleneck_act=bottleneck_act,
        )
    )  # fmt: skip
    if plot:
        plot_rank_study(study, plot)
    if as_json:
        print(json.dumps(study.to_dict()))
        return
    for block, curves in study.rank_ratio.items():
        table = Table("d_in/d_out", *curves, title=f"{block}: mean rank/d_out over {networks} networks")
        for i, ratio in enumerate(study.ratios):
            table.add_row(f"{ratio:g}", *(f"{values[i]:.3f}" for values in curves.values()))
        console.print(table)
    rule = f"rank keeps {energy:g} of sum s^2" if energy is not None else f"rank rtol {rtol:g}"
    console.print(
        f"N={batch}, d_out in [16, 64], float32 SVD, {rule}, bottleneck f after {bottleneck_act}; seed {seed}"
    )


@app.command("rank")
def rank_command(
    model: Annotated[list[str], typer.Option(help="Registered model name; repeat for several models.")],
    checkpoint: Annotated[list[str], typer.Option(help="Weights file for each --model, in the same order.")],
    data: Annotated[str, typer.Option(help="Dataset spec, e.g. fashion-mnist, cifar100:DIR.")],
    split: Annotated[str, typer.Option(help="val or train (train includes its augmentation).")] = "val",
    max_images: Annotated[int | None, typer.Option(help="Use the first this many images.")] = None,
    img_size: Annotated[int | None, typer.Option(help="Image size (default: the checkpoint's run).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 256,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    plot: Annotated[str | None, typer.Option(help="Save the CDF of normalised singular values here.")] = None,
    strict: StrictOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """ReXNet Section 6, Figure 5: singular values of the penultimate features (the classifier's input).

    Prints the nuclear norm sum(s) (Table 2; grows with the number of images), the normalised nuclear norm
    sum(s)/max(s) (scale-free, in [1, min(N, D)]) and the rank at rtol 0.01; --plot draws the cumulative
    distribution of s/max(s) with all models on one plot.
    """
    from leanvision.experiments.feature_rank import feature_spectrum, plot_spectra

    if len(model) != len(checkpoint):
        _fail(f"give one --checkpoint per --model: got {len(model)} models and {len(checkpoint)} checkpoints")
    options = dict(split=split, max_images=max_images, img_size=img_size, batch_size=batch_size)
    spectra = [
        _run(lambda m=m, c=c: feature_spectrum(m, c, data, device=device, strict=strict, **options))
        for m, c in zip(model, checkpoint)
    ]
    if plot:
        plot_spectra(spectra, plot)
    if as_json:
        print(json.dumps([s.to_dict() for s in spectra]))
        return
    table = Table("model", "images", "dim", "max s", "nuclear norm", "sum s / max s", "rank")
    for s in spectra:
        table.add_row(
            s.model, str(s.images), str(s.dim), f"{s.singular_values[0]:.4g}", f"{s.nuclear_norm:.1f}",
            f"{s.normalized_nuclear_norm:.2f}", str(s.rank),
        )  # fmt: skip
    console.print(table)
    console.print(f"penultimate features of {data} ({split}); rank: singular values above 0.01 x the largest")


search_app = typer.Typer(help="Channel-configuration search (ReXNet Section 4).", no_args_is_help=True)
app.add_typer(search_app, name="search")


def _count(text: str, option: str) -> int:
    """'200000', '200k', '0.2M' or '1.5G' -> an integer count."""
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower(), 1)
    try:
        return round(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        _fail(f"{option} must be a count such as 200000, 200k or 0.2M, got {text!r}")


@search_app.command("channels")
def search_channels(
    data: Annotated[str, typer.Option(help="Dataset spec: cifar100:DIR, fashion-mnist, synthetic:lines...")],
    blocks: Annotated[int, typer.Option(help="Inverted bottlenecks D (>= 2).")] = 5,
    max_params: Annotated[str, typer.Option(help="Parameter limit, e.g. 200k or 0.2M.")] = "0.2M",
    max_macs: Annotated[str, typer.Option(help="MAC limit (the paper's FLOPs), e.g. 30M.")] = "30M",
    models: Annotated[int, typer.Option(help="Configurations sampled and trained (K).")] = 200,
    epochs: Annotated[int, typer.Option(help="Epochs per training run.")] = 30,
    repeats: Annotated[int, typer.Option(help="Training runs per model (seeds seed..seed+R-1).")] = 3,
    act: Annotated[str, typer.Option(help="relu, relu6, silu, hardswish or elu.")] = "relu6",
    block: Annotated[str, typer.Option(help="mbv2 (shortcut when c_in == c_out) or rexnet (partial).")] = (
        "mbv2"
    ),
    fraction: Annotated[float, typer.Option(help="Share of models in each of the three groups.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the sampled configurations and of the runs.")] = 0,
    lr: Annotated[float, typer.Option(help="Peak SGD learning rate (cosine schedule).")] = 0.05,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 64,
    img_size: Annotated[int | None, typer.Option(help="Resize images to this (default: the data's).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    workers: Annotated[int, typer.Option(help="Local worker processes pulling models from the study.")] = 1,
    threads: Annotated[int, typer.Option(help="torch threads per worker.")] = 1,
    out: Annotated[str, typer.Option(help="Output folder (study.db, results, figure, table).")] = (
        "runs/search-channels"
    ),
    storage: Annotated[
        str | None, typer.Option(help="Optuna RDB URL, e.g. postgresql://user@host/db (default: SQLite).")
    ] = None,
    study_name: Annotated[str, typer.Option(help="Study name in the storage.")] = "channels",
    as_json: JsonOpt = False,
) -> None:
    """Sample channel configurations under the limits, train each, report Figure 2 and Table 3 (ReXNet S4).

    Re-run the same command to resume; run it on several machines with one --storage to share the work."""
    from leanvision.experiments.channel_search.study import (
        SearchSettings,
        WorkerError,
        run_search,
        table3_rows,
    )

    settings = SearchSettings(
        blocks=blocks, max_params=_count(max_params, "--max-params"), max_macs=_count(max_macs, "--max-macs"),
        data=data, models=models, epochs=epochs, repeats=repeats, img_size=img_size, act=act, block=block,
        fraction=fraction, seed=seed, lr=lr, batch_size=batch_size, device=device, workers=workers,
        threads=threads, out=out, storage=storage, study_name=study_name,
    )  # fmt: skip
    try:
        report = _run(lambda: run_search(settings))
    except WorkerError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from err
    if as_json:
        print(json.dumps(report.to_dict()))
        raise typer.Exit(1 if report.failed else 0)
    if report.ranked:
        table = Table("ranking", "acc (%)", "params (M)", "MACs (M)", title=f"{len(report.ranked)} models")
        for row in table3_rows(report):
            table.add_row(row["ranking"], row["acc"], row["params_m"], row["macs_m"])
        console.print(table)
        for label, model in (("best", report.ranked[0]), ("worst", report.ranked[-1])):
            channels = "-".join(map(str, model["channels"]))
            console.print(f"{label}: {channels} (acc {model['acc']:.2f}%)")
        console.print(f"results in {out}: results.json, table3.md, table3.json, figure2.png")
    for entry in report.untrained:
        reason = f" ({entry['reason']})" if "reason" in entry else ""
        console.print(f"model {entry['model']}: {entry['state']}{reason}")
    if report.failed:
        console.print(f"[red]error:[/red] {len(report.failed)} models failed; re-run the command to retry")
        raise typer.Exit(1)


def _run(work):
    """Run `work`, turning leanvision's input errors into one clear line and exit code 2; any other
    exception is a bug and keeps its traceback."""
    from leanvision.errors import LeanvisionError

    try:
        return work()
    except LeanvisionError as err:
        _fail(str(err))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
