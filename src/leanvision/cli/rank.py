"""Commands of ReXNet's rank analysis: `rank-study` (random blocks) and `rank` (trained features)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from leanvision.cli.common import (
    DeviceOpt,
    ForwardBatchOpt,
    JsonOpt,
    RunImgSizeOpt,
    StrictOpt,
    console,
    fail,
    parse_ratios,
    plot_file,
    run,
)

if TYPE_CHECKING:
    from leanvision.analysis.rank import RankStudy


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

    plot_file(plot)
    study = run(
        lambda: rank_study(
            blocks=blocks.split(","), activations=activations.split(","), networks=networks,
            ratios=parse_ratios(ratios), batch=batch, seed=seed, rtol=rtol, energy=energy,
            bottleneck_act=bottleneck_act,
        )
    )  # fmt: skip
    if plot:
        plot_rank_study(study, plot)
    if as_json:
        print(json.dumps(study.to_dict()))
        return
    _print_rank_study(study, networks)
    rule = f"rank keeps {energy:g} of sum s^2" if energy is not None else f"rank rtol {rtol:g}"
    console.print(
        f"N={batch}, d_out in [16, 64], float32 SVD, {rule}, bottleneck f after {bottleneck_act}; seed {seed}"
    )


def _print_rank_study(study: RankStudy, networks: int) -> None:
    """One table per block type: a row per ratio d_in/d_out, a column per nonlinearity."""
    for block, curves in study.rank_ratio.items():
        table = Table("d_in/d_out", *curves, title=f"{block}: mean rank/d_out over {networks} networks")
        for i, ratio in enumerate(study.ratios):
            table.add_row(f"{ratio:g}", *(f"{values[i]:.3f}" for values in curves.values()))
        console.print(table)


def rank_command(
    model: Annotated[list[str], typer.Option(help="Registered model name; repeat for several models.")],
    checkpoint: Annotated[list[str], typer.Option(help="Weights file for each --model, in the same order.")],
    data: Annotated[str, typer.Option(help="Dataset spec, e.g. fashion-mnist, cifar100:DIR.")],
    split: Annotated[str, typer.Option(help="val or train (train includes its augmentation).")] = "val",
    max_images: Annotated[int | None, typer.Option(help="Use the first this many images.")] = None,
    img_size: RunImgSizeOpt = None,
    batch_size: ForwardBatchOpt = 256,
    device: DeviceOpt = "cpu",
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
        fail(f"give one --checkpoint per --model: got {len(model)} models and {len(checkpoint)} checkpoints")
    plot_file(plot)
    options = dict(split=split, max_images=max_images, img_size=img_size, batch_size=batch_size)
    spectra = [
        run(lambda m=m, c=c: feature_spectrum(m, c, data, device=device, strict=strict, **options))
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
