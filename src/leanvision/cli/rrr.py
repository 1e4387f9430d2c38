"""The `rrr` group: reduce a pretrained ResNet, select its blocks, and run the paper's comparison."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from leanvision.cli.common import (
    JsonOpt,
    ResNetOpt,
    ResNetWeightsOpt,
    SquareImgSizeOpt,
    StepBatchOpt,
    TrainSeedOpt,
    console,
    millions,
    parse_ints,
    run,
)

rrr_app = typer.Typer(help="RRR-Net: reuse, reduce and recycle a pretrained ResNet.", no_args_is_help=True)


@rrr_app.command("reduce")
def rrr_reduce(
    weights: ResNetWeightsOpt,
    out: Annotated[str, typer.Option(help="Output checkpoint (.pth or .safetensors).")],
    backbone: ResNetOpt = "resnet152",
    blocks: Annotated[str, typer.Option(help="Blocks kept in layer1..layer4, e.g. 1,1,1,1.")] = "1,1,1,1",
    branches: Annotated[int, typer.Option(help="Split layer3/layer4 into this many branches.")] = 1,
    num_classes: Annotated[int, typer.Option(help="Classifier outputs (fresh unless it fits).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the random part of the branch kernel slices.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file.")] = False,
) -> None:
    """Keep the first blocks of each stage of a pretrained ResNet (by name) and write the checkpoint."""
    from leanvision.experiments.rrr import reduce_checkpoint

    kept = parse_ints(blocks, "--blocks", "four comma-separated integers such as 1,1,1,1")
    model = run(
        lambda: reduce_checkpoint(backbone, weights, kept, out, num_classes, branches, seed, overwrite)
    )
    params = sum(p.numel() for p in model.parameters())
    console.print(
        f"rrrnet_{backbone} blocks {','.join(map(str, kept))}, {branches} branch(es): {params:,} params; "
        f"wrote {out} (load it with create_model('rrrnet_{backbone}', blocks={kept}, branches={branches}, "
        f"num_classes={num_classes}, pretrained='{out}'))"
    )


@rrr_app.command("select")
def rrr_select(
    weights: ResNetWeightsOpt,
    data: Annotated[str, typer.Option(help="One Meta-Album dataset: metaalbum:DIR[,seed=S,per_class=P].")],
    out: Annotated[str, typer.Option(help="Folder of the state file select.json, step runs and plot.")] = (
        "runs/rrr-select"
    ),
    backbone: ResNetOpt = "resnet152",
    epochs: Annotated[int, typer.Option(help="Epoch budget of every step.")] = 10,
    holdout: Annotated[int, typer.Option(help="Validation images per class, from the training part.")] = 5,
    img_size: SquareImgSizeOpt = 128,
    batch_size: StepBatchOpt = 32,
    seed: TrainSeedOpt = 0,
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

    state = run(lambda: select_blocks(config, on_step=None if as_json else show))
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
    weights: ResNetWeightsOpt,
    data: Annotated[str, typer.Option(help="metaalbum:DIR (a dataset) or metaalbum:SETDIR (every dataset).")],
    backbone: Annotated[str, typer.Option(help="resnet152 (the paper's); smaller ones for quick runs.")] = (
        "resnet152"
    ),
    methods: Annotated[
        str | None, typer.Option(help="Comma-separated: linear_probe, fine_tune, resnet1111, rrrnet (all).")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs of every method.")] = 300,
    img_size: SquareImgSizeOpt = 128,
    branches: Annotated[int, typer.Option(help="Branches of RRR-Net.")] = 8,
    batch_size: StepBatchOpt = 32,
    warm_epochs: Annotated[int, typer.Option(help="Stem BN warm-up epochs (ResNet 1111, RRR-Net).")] = 10,
    seed: TrainSeedOpt = 0,
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

    report = run(lambda: run_methods(config, on_result=None if as_json else show))
    if as_json:
        print(json.dumps(report))
        return
    title = f"{backbone}, {img_size}px: test accuracy; CPU latency at batch 1, {threads} thread(s)"
    console.print(_run_table(report, title))
    console.print(f"results in {out}/results.json, plot {out}/accuracy_vs_macs.png")


def _run_table(report: dict[str, Any], title: str) -> Table:
    """One column per method: test accuracy per dataset, their mean, params, MACs and latency."""
    summary = report["methods"]
    table = Table("dataset", *(entry["label"] for entry in summary.values()), title=title)
    for name in dict.fromkeys(r["dataset"] for r in report["results"]):
        accs = {r["method"]: r["acc"] for r in report["results"] if r["dataset"] == name}
        table.add_row(name, *(f"{accs[m]:.2f}%" for m in summary))
    table.add_row("mean", *(f"{e['mean_acc']:.2f}%" for e in summary.values()))
    table.add_row("params", *(millions(e["params"]) for e in summary.values()))
    table.add_row("MACs", *(f"{e['macs'] / 1e9:.3f}G" for e in summary.values()))
    table.add_row("latency", *(f"{e['latency_ms']:.2f} ms" for e in summary.values()))
    return table
