"""Commands that run a study over several models: `demo`, `compare` and the `repro` group."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn
from rich.table import Table

from leanvision.cli.common import (
    BackendOpt,
    JsonOpt,
    ReproEpochsOpt,
    ReproLrOpt,
    ReproOutOpt,
    ThreadsOpt,
    console,
    fail,
    millions,
    parse_ints,
    run,
)
from leanvision.experiments.demo import DEMO_DATA, DEMO_FALLBACK, DemoConfig

_DEMO = DemoConfig()  # the demo's options default to its config's defaults


def compare(
    names: Annotated[list[str] | None, typer.Argument(help="Models (default: ReXNet Table 5 set).")] = None,
    threads: ThreadsOpt = None,
    min_seconds: Annotated[float, typer.Option(help="Minimum timed seconds, all models together.")] = 1.0,
    backend: BackendOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare models side by side: params, MACs, batch-1 CPU latency, and the papers' numbers.

    --backend (repeatable; default eager) adds a latency column per backend; every model on every backend
    runs in one interleaved loop."""
    backends = backend or ["eager"]
    rows = run(lambda: _measure(names, threads, min_seconds, backends, show_progress=not as_json))
    if as_json:
        print(json.dumps(rows))
        return
    table = Table("model", "params", "MACs", *(f"ms {b} (b=1)" for b in backends), "top-1*", "params*",
                  "FLOPs*")  # fmt: skip
    for r in rows:
        table.add_row(
            r["model"],
            millions(r["params"]),
            f"{r['macs'] / 1e9:.3f}G",
            *(f"{r['backends'][b]['median_ms']:.1f}" for b in backends),
            f"{r['paper_top1']}%" if r["paper_top1"] else "",
            f"{r['paper_params_m']}M" if r["paper_params_m"] else "",
            f"{r['paper_flops_b']}B" if r["paper_flops_b"] else "",
        )
    console.print(table)
    console.print(
        "At each model's input size. MACs: conv + linear multiply-accumulates (papers print them as FLOPs). "
        "ms: median batch-1 CPU latency on this machine, all models and backends timed in interleaved "
        "rounds (eager: PyTorch as built; see `leanvision bench --help` for the others). "
        "*: ImageNet numbers published in the ReXNet paper (Tables 4, 5, A1, A2)."
    )


def _measure(
    names: list[str] | None, threads: int | None, min_seconds: float, backends: list[str], show_progress: bool
) -> list[dict[str, Any]]:
    """The rows of `compare`; on a terminal a spinner names the step (elsewhere it would only leave a
    blank line)."""
    from leanvision.experiments.compare import TABLE5_MODELS
    from leanvision.experiments.compare import compare as run_compare

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), console=console, transient=True,
        disable=not (show_progress and console.is_terminal),
    ) as progress:  # fmt: skip
        task = progress.add_task("measuring")
        return run_compare(
            names or TABLE5_MODELS,
            threads=threads,
            min_seconds=min_seconds,
            backends=backends,
            on_model=lambda step: progress.update(task, description=step),
        )


def demo(
    data: Annotated[
        str | None,
        typer.Option(
            help=f"Dataset spec (default: {DEMO_DATA} where Fashion-MNIST is installed, `make data`; else "
            f"the generated {DEMO_FALLBACK})."
        ),
    ] = _DEMO.data,
    models: Annotated[str, typer.Option(help="Comma-separated registered model names.")] = ",".join(
        _DEMO.models
    ),
    epochs: Annotated[int, typer.Option(help="Epochs per model.")] = _DEMO.epochs,
    img_size: Annotated[int, typer.Option(help="Square image size the data is resized to.")] = _DEMO.img_size,
    seeds: Annotated[
        str, typer.Option(help="Comma-separated seeds (data order, initialisation): one run per model each.")
    ] = ",".join(map(str, _DEMO.seeds)),
    out: Annotated[str, typer.Option(help="Empty report folder.")] = _DEMO.out,
    latency_seconds: Annotated[float, typer.Option(help="Timed seconds of latency per model.")] = (
        _DEMO.latency_seconds
    ),
) -> None:
    """The main job: train a MobileNetV2, a ReXNet and an RNNPool net on the same data, once per seed, and
    compare accuracy and costs."""
    from leanvision.experiments.demo import (
        LATENCY_NOTE,
        MEASURED_NOTE,
        acc_cell,
        measured_cell,
        run_demo,
        separation,
    )

    config = DemoConfig(
        data, tuple(models.split(",")), epochs, img_size, seeds=parse_ints(seeds, "--seeds"), out=out,
        latency_seconds=latency_seconds,
    )  # fmt: skip
    run(config.check)
    console.print(config.plan())
    rows = run(lambda: run_demo(config, log=console.print))
    table = Table(
        "model", f"test acc (seeds {', '.join(map(str, config.seeds))})", "params", "MACs", "peak RAM",
        "measured peak RAM", "ms eager", "ms int8 ORT",
        title=f"{config.data_spec()} at {img_size} px, {epochs} epochs",
    )  # fmt: skip
    for r in rows:
        table.add_row(
            r["model"], acc_cell(r), millions(r["params"]), f"{r['macs'] / 1e6:.1f}M",
            f"{r['peak_ram_bytes'] / 1024:.1f} KiB", measured_cell(r), f"{r['latency_ms']:.2f}",
            f"{r['int8_latency_ms']:.2f}",
        )  # fmt: skip
    console.print(table)
    if len(config.seeds) > 1:
        console.print("\n".join(separation(rows)))
    console.print(
        "test acc: mean ± half the range over the seeds, then each seed's. peak RAM: activations of one "
        f"batch-1 fp32 inference under the layer convention (RNNPool Appendix E.2); {MEASURED_NOTE}; "
        f"{LATENCY_NOTE}. Report: {out}/"
    )


repro_app = typer.Typer(
    help="Run a CPU-sized experiment of the RNNPool or ReXNet paper and print ours beside the paper's "
    "numbers.",
    no_args_is_help=True,
)


def _given(**options: Any) -> dict[str, Any]:
    """The options that were given (not None); the experiment keeps its own defaults for the others."""
    return {k: v for k, v in options.items() if v is not None}


def _show(table: Table, out: str) -> None:
    """Print an experiment's table and where its results are."""
    console.print(table)
    console.print(f"results in {out}")


@repro_app.command("rnnpool-probe")
def repro_rnnpool_probe(
    out: ReproOutOpt = "runs/repro-rnnpool-probe",
    epochs: ReproEpochsOpt = None,
    lr: ReproLrOpt = None,
    train_size: Annotated[int, typer.Option(help="Generated training images.")] = 4000,
    val_size: Annotated[int, typer.Option(help="Generated test images.")] = 1000,
    max_hidden: Annotated[int, typer.Option(help="Largest h1, h2 tried.")] = 32,
) -> None:
    """RNNPool Table 7 and Figure 4: the smallest RNNPool that lets one linear layer fit each probe dataset.

    By default each model trains 20 epochs at lr 0.01.
    """
    from leanvision.experiments.repro import rnnpool_probe

    overrides = _given(epochs=epochs, lr=lr)
    rows = run(lambda: rnnpool_probe(out, train_size, val_size, max_hidden=max_hidden, **overrides))
    table = Table("data", "size", "conv", "ours (h1, h2)", "best test acc", "paper (h1, h2)", title="Table 7")
    for r in rows:
        ours = f"{r['ours'][0]}, {r['ours'][1]}" if r["ours"] else f"none <= {max_hidden}"
        paper = f"{r['paper'][0]}, {r['paper'][1]}"
        table.add_row(
            r["data"], str(r["size"]), "yes" if r["conv"] else "no", ours, f"{r['best_acc']:.2f}%", paper
        )
    _show(table, out)


@repro_app.command("pooling-one-go")
def repro_pooling_one_go(
    out: ReproOutOpt = "runs/repro-pooling-one-go",
    epochs: ReproEpochsOpt = None,
    lr: ReproLrOpt = None,
    data: Annotated[list[str] | None, typer.Option(help="Dataset specs (default fashion-mnist).")] = None,
) -> None:
    """RNNPool Appendix C.2: the whole image pooled in one go by RNNPool, a strided conv, or max or average
    pooling, then a linear layer.

    By default each model trains 10 epochs at lr 0.002.
    """
    from leanvision.experiments.repro import pooling_one_go

    overrides = _given(epochs=epochs, lr=lr, datasets=tuple(data) if data else None)
    rows = run(lambda: pooling_one_go(out, **overrides))
    table = Table("data", "pooling", "test acc", "paper (CIFAR-10)", title="Appendix C.2")
    for r in rows:
        table.add_row(r["data"], r["pooling"], f"{r['acc']:.2f}%", f"{r['paper']}%" if r["paper"] else "")
    _show(table, out)


@repro_app.command("rexnet-factors")
def repro_rexnet_factors(
    out: ReproOutOpt = "runs/repro-rexnet-factors",
    epochs: ReproEpochsOpt = None,
    lr: ReproLrOpt = None,
    data: Annotated[list[str] | None, typer.Option(help="One dataset spec (default fashion-mnist).")] = None,
) -> None:
    """ReXNet Table 2: four two-bottleneck networks with matched MACs trained on 5000 images at 16x16
    (see leanvision.experiments.rexnet_factors); test accuracy and nuclear norm of the final feature.

    By default each model trains 3 epochs at lr 0.005.
    """
    from leanvision.experiments.rexnet_factors import rexnet_factors

    if data is not None and len(data) != 1:
        fail(f"rexnet-factors takes one --data spec, got {len(data)}")
    overrides = _given(epochs=epochs, lr=lr, data=data[0] if data else None)
    rows = run(lambda: rexnet_factors(out, **overrides))
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
    _show(table, out)
