"""The `search` group: ReXNet's channel-configuration search (Section 4)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from leanvision.cli.common import (
    AutoDeviceOpt,
    DataImgSizeOpt,
    JsonOpt,
    StepBatchOpt,
    console,
    fail,
    parse_count,
    run,
)

if TYPE_CHECKING:
    from leanvision.experiments.channel_search.study import SearchReport

search_app = typer.Typer(help="Channel-configuration search (ReXNet Section 4).", no_args_is_help=True)


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
    batch_size: StepBatchOpt = 64,
    img_size: DataImgSizeOpt = None,
    device: AutoDeviceOpt = None,
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
    from leanvision.experiments.channel_search.study import SearchSettings, WorkerError, run_search

    settings = SearchSettings(
        blocks=blocks, max_params=parse_count(max_params, "--max-params"),
        max_macs=parse_count(max_macs, "--max-macs"), data=data, models=models, epochs=epochs,
        repeats=repeats, img_size=img_size, act=act, block=block, fraction=fraction, seed=seed, lr=lr,
        batch_size=batch_size, device=device, workers=workers, threads=threads, out=out, storage=storage,
        study_name=study_name,
    )  # fmt: skip
    try:
        report = run(lambda: run_search(settings))
    except WorkerError as err:
        fail(str(err), code=1)
    if as_json:
        print(json.dumps(report.to_dict()))
        raise typer.Exit(1 if report.failed else 0)
    _print_report(report, out)
    if report.failed:
        fail(f"{len(report.failed)} models failed; re-run the command to retry", code=1)


def _print_report(report: SearchReport, out: str) -> None:
    """Table 3 with the best and worst configuration, then every model that is not trained yet."""
    from leanvision.experiments.channel_search.study import table3_rows

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
