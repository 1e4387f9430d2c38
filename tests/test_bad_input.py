"""Issue 19 §3: bad input at every public entry.

Every CLI command (and sub-command) over wrong names, out-of-range numbers and wrong sizes: exit code 2 and
one line naming what was expected and what was given. The public functions: the LeanvisionError a user can
fix from its message. Property tests (hypothesis) for RNNPoolLayer's output shapes, the memory conventions'
arena and orderings, and ReXNet's and the channel search's linear channel rules.
"""

from __future__ import annotations

import math
import re
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import leanvision
from conftest import one_line_error
from leanvision.analysis.memory import CONVENTIONS, peak_memory, trace
from leanvision.analysis.memory_planner import Buffer, place_greedy_by_size
from leanvision.analysis.recompute import recompute_cost
from leanvision.cli import app
from leanvision.deploy.streaming import stream
from leanvision.detection.data import build_detection_data
from leanvision.engine.data import build_dataset
from leanvision.errors import (
    CheckpointError,
    DataError,
    LeanvisionError,
    MissingFileError,
    OutputError,
    UnknownModelError,
)
from leanvision.errors import InvalidArgumentError as IAE
from leanvision.experiments.channel_search.space import (
    SearchSpace,
    check_channels,
    network_cost,
    sample_candidate,
    widest_flat,
)
from leanvision.layers.rnnpool import RNNPool, RNNPoolLayer
from leanvision.models.rexnet import make_divisible, rexnet_channels

LINES = "synthetic:lines,train=8,val=8"
UNKNOWN_MODEL = r"unknown model 'nosuch'"
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A mobilenetv2_035 checkpoint for synthetic:lines (1 channel, 9 classes)."""
    path = tmp_path_factory.mktemp("weights") / "mb.pt"
    leanvision.save_checkpoint(leanvision.create_model("mobilenetv2_035", num_classes=9, in_chans=1), path)
    return path


@cache
def traced(name: str, size: int):
    """The memory graph of a registered model at size x size, traced once per test session."""
    return trace(name, (3, size, size))


EVAL = f"eval --model mobilenetv2_035 --checkpoint {{weights}} --data {LINES}"
RANK = f"rank --model mobilenetv2_035 --checkpoint {{weights}} --data {LINES}"
TRAIN_ON = "train --model mobilenetv2_035 --out {tmp}/run --data"
TRAIN = f"{TRAIN_ON} {LINES}"
REDUCE = "rrr reduce --weights {weights} --out {tmp}/r.pth"
DETECT = "detect rnnpool_face_quant {tmp}/none.png --random-weights --out {tmp}/det"
SEARCH = f"search channels --data {LINES} --out {{tmp}}/search"
# (command line with {weights} and {tmp}, what its one line says: expected and given)
CLI_CASES = [
    ("models nosuch*", r"no registered model matches 'nosuch\*'"),
    ("profile nosuch", UNKNOWN_MODEL),
    ("profile rexnet_100 --input-size 0", r"--input-size must be a positive number of pixels, got 0"),
    ("profile rexnet_100 --input-size 8", r"rexnet_100 downsamples by 32: .* must be >= 32, got 8x8"),
    ("profile rexnet_100 --num-classes -3", r"num_classes must be an int >= 0 .*got -3"),
    ("bench nosuch", UNKNOWN_MODEL),
    ("bench rexnet_100 --batch-size 0", r"batch_size must be >= 1, got 0"),
    ("bench rexnet_100 --threads -2", r"threads must be >= 1 .*got -2"),
    ("bench rexnet_100 --min-seconds nan", r"finite min_seconds >= 0, got 10, 20, nan"),
    ("bench rexnet_100 --min-seconds inf", r"finite min_seconds >= 0, got 10, 20, inf"),
    ("bench rexnet_100 --device gpu", r"device must be 'cpu' or 'cuda' .*got 'gpu'"),
    ("bench rexnet_100 --backend nosuch", r"backend must be one of eager, .*got 'nosuch'"),
    ("memory nosuch", UNKNOWN_MODEL),
    ("memory rexnet_100 --dtype int3", r"--dtype must be one of fp32, fp16, bf16, int8, uint8, got 'int3'"),
    ("memory rexnet_100 --convention nosuch", r"--convention must be one of layer, min, planner or all"),
    ("memory rexnet_100 --input-size -1", r"--input-size must be a positive number of pixels, got -1"),
    ("memory rexnet_100 --budget-kib -5", r"--budget-kib must be a positive number of KiB, got -5\.0"),
    ("memory rexnet_100 --budget-kib nan", r"--budget-kib must be a positive number of KiB, got nan"),
    ("memory rexnet_100 --split-blocks 0 --streamed", r"--split-blocks needs --streamed and K >= 1, got 0"),
    ("compare nosuch", UNKNOWN_MODEL),
    ("compare mobilenetv2_035 --threads 0 --min-seconds 0", r"threads >= 1 .*got 10, 0\.0, 0"),
    ("compare mobilenetv2_035 --backend nosuch", r"backend must be one of eager, .*got 'nosuch'"),
    (f"{TRAIN} --epochs 0", r"need epochs >= 1, .*got 0, 64, 0"),
    (f"{TRAIN} --epochs -1", r"need epochs >= 1, .*got -1, 64, 0"),
    (f"{TRAIN} --lr nan", r"need finite lr > 0, .*got lr=nan"),
    (f"{TRAIN} --lr inf", r"need finite lr > 0, .*got lr=inf"),
    (f"{TRAIN} --lr -0.1", r"need finite lr > 0, .*got lr=-0\.1"),
    (f"{TRAIN} --batch-size 0", r"batch_size >= 1, .*got 10, 0, 0"),
    (f"{TRAIN} --img-size 4", r"img_size must be >= 16, got 4"),
    (f"{TRAIN} --img-size 16", r"cannot take the \[1, 16, 16\] images .* must be >= 32, got 16x16"),
    (f"{TRAIN} --opt nosuch", r"opt must be one of \('sgd', 'adamw'\), got 'nosuch'"),
    (f"{TRAIN} --sched nosuch", r"sched must be one of \('cosine', 'step', 'none'\), got 'nosuch'"),
    (f"{TRAIN} --task nosuch", r"--task must be classification or detection, got 'nosuch'"),
    (f"{TRAIN} --device gpu", r"device must be cpu, cuda or cuda:N, got 'gpu'"),
    (f"{TRAIN} --warmup-epochs 20", r"warmup_epochs must be in \[0, epochs=10\], got 20"),
    (f"{TRAIN} --label-smoothing 1.5", r"0 <= label_smoothing < 1, .*label_smoothing=1\.5"),
    ("train --model nosuch --data synthetic:lines --out {tmp}/run", UNKNOWN_MODEL),
    (f"{TRAIN_ON} nosuch", r"unknown data spec 'nosuch'; expected one of"),
    (f"{TRAIN_ON} synthetic:lines,train=0", r"a count >= 1, .*count 0"),
    (f"{TRAIN_ON} synthetic:lines,n=5", r"bad option 'n=5' in 'synthetic:lines,n=5': expected key=integer"),
    ("train --task detection --model mobilenetv2_035 --data synthetic:faces --out {tmp}/run",
     r"--task detection trains a face detector \(rnnpool_face_a, "),
    ("train --task detection --model rnnpool_face_quant --data synthetic:faces --img-size 33 --out {tmp}/run",
     r"detection img_size must be a multiple of 32, >= 32; got 33"),
    (f"eval --model mobilenetv2_035 --data {LINES}", r"classification eval needs --model and --checkpoint"),
    (f"{EVAL} --backend nosuch", r"--backend must be eager, ort or ort-int8, got 'nosuch'"),
    (f"{EVAL} --img-size 16", r"must be >= 32, got 16x16 \(change --img-size\)"),
    (f"eval --model nosuch --checkpoint {{weights}} --data {LINES}", UNKNOWN_MODEL),
    (f"{EVAL} --device gpu", r"device must be"),
    (f"{EVAL} --batch-size 0", r"batch_size must be >= 1, got 0"),
    ("detect nosuch {tmp}/none.png --random-weights --out {tmp}/det", r"'nosuch' is not a face detector"),
    (DETECT, r"image file not found: .*none\.png"),
    (f"{DETECT} --threshold nan", r"--threshold must be a score .*got nan"),
    (f"{DETECT} --device gpu", r"device must be 'cpu' or 'cuda' .*got 'gpu'"),
    ("detect rnnpool_face_quant {tmp}/none.png --out {tmp}/det", r"needs --checkpoint FILE"),
    ("export nosuch --out {tmp}/m.onnx", UNKNOWN_MODEL),
    ("export rexnet_100 --out {tmp}/m.onnx --input-size 0", r"--input-size must be N or HxW .*got '0'"),
    ("export rexnet_100 --out {tmp}/m.onnx --input-size axb", r"--input-size must be N or HxW .*got 'axb'"),
    ("export rexnet_100 --out {tmp}/m.onnx --in-chans 0", r"in_chans must be a positive int, got 0"),
    ("export rexnet_100 --out {tmp}/m.onnx --int8", r"--int8 needs calibration data"),
    ("export rexnet_100 --out {tmp}/m.onnx --int8 --calib synthetic:lines --calib-images 0",
     r"--calib-images must be >= 1, got 0"),
    ("export rexnet_100 --out {tmp}/m.onnx --int8 --calib synthetic:lines --calib-method nosuch",
     r"--calib-method must be one of .*got 'nosuch'"),
    ("rank-study --networks 0", r"networks must be at least 1, got 0"),
    ("rank-study --ratios 0:1:0", r"--ratios step must be positive, got 0\.0"),
    ("rank-study --ratios a:b", r"--ratios must be START:STOP:STEP .*got 'a:b'"),
    ("rank-study --blocks nosuch", r"unknown block \['nosuch'\]; expected some of conv1x1"),
    ("rank-study --activations nosuch", r"unknown activation \['nosuch'\]; expected some of relu"),
    ("rank-study --rtol nan", r"rtol must lie in \[0, 1\), got nan"),
    ("rank-study --energy 2", r"energy must lie in \(0, 1\], got 2\.0"),
    ("rank-study --bottleneck-act nosuch", r"unknown bottleneck_act 'nosuch'"),
    (f"rank --model nosuch --checkpoint {{weights}} --data {LINES}", UNKNOWN_MODEL),
    (f"{RANK} --split nosuch", r"split must be one of val, train, got 'nosuch'"),
    (f"{RANK} --max-images 0", r"max_images must be at least 1, got 0"),
    (f"{RANK} --batch-size 0", r"batch_size must be >= 1, got 0"),
    (f"{RANK} --device gpu", r"device must be 'cpu' or 'cuda' .*got 'gpu'"),
    (f"{RANK} --checkpoint {{weights}}", r"give one --checkpoint per --model: got 1 models and 2"),
    ("repro rnnpool-probe --max-hidden 0 --out {tmp}/r", r"max_hidden must be an integer >= 4"),
    ("repro rnnpool-probe --epochs 0 --out {tmp}/r", r"need epochs >= 1, .*got 0,"),
    ("repro rnnpool-probe --lr nan --out {tmp}/r", r"need finite lr > 0, .*lr=nan"),
    ("repro rnnpool-probe --train-size 0 --out {tmp}/r", r"a count >= 1, .*count 0"),
    ("repro pooling-one-go --data nosuch --out {tmp}/r", r"unknown data spec 'nosuch'"),
    ("repro rexnet-factors --data a --data b --out {tmp}/r", r"rexnet-factors takes one --data spec, got 2"),
    (f"{REDUCE} --backbone resnet19", r"unknown backbone 'resnet19'"),
    (f"{REDUCE} --blocks 1,1", r"blocks must be four integers \(layer1\.\.layer4\), got \(1, 1\)"),
    (f"{REDUCE} --blocks a", r"--blocks must be four comma-separated integers such as 1,1,1,1, got 'a'"),
    (f"{REDUCE} --blocks 9,1,1,1", r"layer1 of resnet152 has 3 blocks, so its count must be in 1\.\.3"),
    (f"{REDUCE} --branches 0", r"branches must be an integer >= 1, got 0"),
    (f"rrr select --weights {{weights}} --data {LINES} --out {{tmp}}/s", r"pass --data metaalbum:DIR, got"),
    (f"rrr run --weights {{weights}} --data {LINES} --epochs 0 --out {{tmp}}/r", r"need epochs, .*got 0, 8"),
    (f"rrr run --weights {{weights}} --data {LINES} --methods nosuch --out {{tmp}}/r", r"unknown method"),
    (f"{SEARCH} --blocks 1", r"blocks must be >= 2 \(ReXNet footnote 4"),
    (f"{SEARCH} --models 0", r"must be >= 1, got \{'models': 0,"),
    (f"{SEARCH} --act nosuch", r"unknown activation 'nosuch'; expected one of \['elu'"),
    (f"{SEARCH} --block nosuch", r"unknown block type 'nosuch'; expected one of \['mbv2', 'rexnet'\]"),
    (f"{SEARCH} --fraction 2", r"fraction .* must be in \(0, 1\], got 2\.0"),
    (f"{SEARCH} --lr nan", r"lr must be positive, got nan"),
    (f"{SEARCH} --max-params 1e400", r"--max-params must be a count .*got '1e400'"),
    ("demo --epochs 0 --out {tmp}/demo", r"need epochs >= 1 and at least one model, got 0"),
    ("demo --img-size 4 --out {tmp}/demo", r"img_size must be >= 16, got 4"),
    ("demo --latency-seconds -1 --out {tmp}/demo", r"need latency_seconds > 0, .*got -1\.0"),
    ("demo --models nosuch --out {tmp}/demo", UNKNOWN_MODEL),
    ("demo --data nosuch --out {tmp}/demo", r"unknown data spec 'nosuch'"),
    ("demo --seeds 0,x --out {tmp}/demo", r"--seeds must be comma-separated integers such as 0,1, got '0,x'"),
]  # fmt: skip


@pytest.mark.parametrize("line, message", CLI_CASES)
def test_bad_cli_input_is_one_line_naming_expected_and_given(weights, tmp_path, line, message):
    args = [word.format(weights=weights, tmp=tmp_path) for word in line.split()]
    result = CliRunner().invoke(app, args)
    assert re.search(message, one_line_error(result)), result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "m.onnx").exists()


def test_every_command_is_probed():
    """Each command and sub-command of `leanvision --help` has a row in CLI_CASES."""
    import typer.main

    group = typer.main.get_command(app)
    commands = {
        f"{name} {sub}" if hasattr(command, "commands") else name
        for name, command in group.commands.items()
        for sub in getattr(command, "commands", [""])
    }
    lines = [case.values[0] if hasattr(case, "values") else case[0] for case in CLI_CASES]
    probed = {" ".join(line.split()[:2]) for line in lines} | {line.split()[0] for line in lines}
    assert commands <= probed, commands - probed


MOBILENET = "mobilenetv2_035"
FACES = "synthetic:faces"
create = leanvision.create_model
# (call, error class, what the message says)
LIBRARY_CASES = [
    (lambda: create("nosuch"), UnknownModelError, UNKNOWN_MODEL),
    (lambda: create("rexnet_1000"), UnknownModelError, r"did you mean rexnet_100"),
    (lambda: create("rexnet", width_mult=0), IAE, r"width_mult must be a pos"),
    (lambda: create("rexnet", width_mult=-1.0), IAE, r"got -1\.0"),
    (lambda: create("rexnet", width_mult=math.nan), IAE, r"finite: got nan"),
    (lambda: create(MOBILENET, num_classes=-1), IAE, r"int >= 0 .*got -1"),
    (lambda: create(MOBILENET, num_classes=1.5), IAE, r"int >= 0 .*got 1\.5"),
    (lambda: create(MOBILENET, in_chans=0), IAE, r"in_chans must be a pos"),
    (lambda: create(MOBILENET, pretrained=5), IAE, r"path of a local"),
    (lambda: create(MOBILENET, features_only=True, out_indices=(9,)), IAE,
     r"out_indices \[9\] out of range: mobilenetv2_035 has 5 feature levels"),
    (lambda: create("mobilenetv2_rnnpool", downsample="nosuch"), IAE,
     r"downsample must be one of \('rnnpool', .*got 'nosuch'"),
    (lambda: create("rrrnet_resnet18", blocks=(0, 1, 1, 1)), IAE,
     r"count must be in 1\.\.2 \(got 0\)"),
    (lambda: create(MOBILENET)(torch.randn(1, 1, 64, 64)), IAE,
     r"expects input \[B, 3, H, W\], got \[1, 1, 64, 64\]"),
    (lambda: create(MOBILENET)(torch.randn(3, 64, 64)), IAE, r"got \[3, 64, 64\]"),
    (lambda: create(MOBILENET)(torch.randn(1, 3, 8, 8)), IAE, r"got 8x8"),
    (lambda: create("rnnpool_face_quant").eval()([torch.rand(1, 48, 64)]), IAE,
     r"takes 3-channel \(RGB\) images, got 1 channels"),
    (lambda: leanvision.profile(MOBILENET, input_size=(3, 0, 224)), IAE, r"got \(3, 0, 224\)"),
    (lambda: leanvision.benchmark(MOBILENET, device="gpu"), IAE, r"got 'gpu'"),
    (lambda: leanvision.benchmark(MOBILENET, batch_size=0), IAE, r"batch_size must be >= 1"),
    (lambda: leanvision.benchmark(MOBILENET, min_seconds=math.inf), IAE, r"finite min_seconds"),
    (lambda: peak_memory(MOBILENET, convention="nosuch"), IAE, r"convention must be one of"),
    (lambda: peak_memory(MOBILENET, dtype_bytes=3), IAE, r"dtype_bytes must be 1 .*got 3"),
    (lambda: peak_memory(MOBILENET, input_size=(224, 224)), IAE, r"got \(224, 224\)"),
    (lambda: peak_memory(MOBILENET, input_size=(3, 4, 4)), IAE, r"must be >= 32, got 4x4"),
    (lambda: recompute_cost(traced("mobilenetv2_rnnpool", 32), 0), IAE,
     r"budget_bytes must be a positive int, got 0"),
    (lambda: recompute_cost(traced("mobilenetv2_rnnpool", 32), 10), IAE,
     r"budget 0\.0 KiB \(10 bytes\) is below the smallest peak recomputation reaches"),
    (lambda: stream(MOBILENET, (3, 64, 64)), IAE, r"stream takes a built model .*got 'mobilenetv2_035'"),
    (lambda: leanvision.fuse_for_inference(MOBILENET), IAE, r"fuse_for_inference takes a built model"),
    (lambda: leanvision.load_checkpoint(create(MOBILENET), "/"), CheckpointError, r"/ is a folder; expected"),
    (lambda: leanvision.load_checkpoint(create(MOBILENET), "/no.pt"), MissingFileError, r"not found: /no"),
    (lambda: stream(leanvision.create_model("mobilenetv2_rnnpool").eval(), (64, 64)), IAE,
     r"input_size must be \(C, H, W\) .*got \(64, 64\)"),
    (lambda: stream(leanvision.create_model("mobilenetv2_rnnpool").eval(), (3, 4, 4)), IAE,
     r"must be >= 32, got 4x4"),
    (lambda: stream(leanvision.create_model("mobilenetv2_100").eval(), (3, 64, 64)), IAE,
     r"has no RNNPoolLayer to stream; .* pass split_blocks=K"),
    (lambda: stream(leanvision.create_model("mobilenetv2_100").eval(), (3, 64, 64), split_blocks=99),
     IAE, r"split_blocks must count leading blocks"),
    (lambda: leanvision.save_checkpoint(leanvision.create_model(MOBILENET), "/"), OutputError,
     r"cannot write the checkpoint /"),
    (lambda: RNNPool(4, 0, 8), IAE, r"hidden_size must be a positive integer, got 0"),
    (lambda: RNNPoolLayer(4, 8, 8, 0, 2), IAE, r"patch_size must be a positive int .*got 0"),
    (lambda: RNNPoolLayer(4, 8, 8, 4, -1), IAE, r"stride must be a positive int .*got -1"),
    (lambda: RNNPoolLayer(4, 8, 8, 4, 2, cell="nosuch"), IAE, r"unknown cell 'nosuch'"),
    (lambda: RNNPoolLayer(4, 8, 8, 4, 2, padding="nosuch"), IAE, r"padding must be one of"),
    (lambda: RNNPoolLayer(4, 8, 8, 4, 2)(torch.randn(1, 3, 16, 16)), IAE,
     r"RNNPoolLayer expects input \[B, 4, H, W\], got \[1, 3, 16, 16\]"),
    (lambda: RNNPool(4, 8, 8)(torch.randn(2, 3, 6, 6)), IAE,
     r"RNNPool expects patches \[N, 4, kh, kw\], got \[2, 3, 6, 6\]"),
    (lambda: build_dataset("mnist"), DataError, r"unknown data spec 'mnist'; expected one of"),
    (lambda: build_dataset(LINES, img_size=8), DataError, r"img_size must be >= 16, got 8"),
    (lambda: build_detection_data("nosuch"), DataError, r"unknown detection data spec 'nosuch'"),
    (lambda: build_detection_data(FACES, channels=2), DataError, r"channels must be 1 or 3, got 2"),
    (lambda: build_detection_data(FACES, img_size=33), DataError, r"multiple of 32, >= 32; got 33"),
    (lambda: build_detection_data(f"{FACES},train=-1,val=0"), DataError, r"counts must be >= 1, got -1 and"),
    (lambda: SearchSpace(blocks=1), IAE, r"blocks must be >= 2"),
    (lambda: check_channels([8, 4], SearchSpace(blocks=2)), IAE, r"must be non-decreasing"),
]  # fmt: skip


@pytest.mark.parametrize("call, error, message", LIBRARY_CASES)
def test_bad_library_input_raises_a_named_leanvision_error(call, error, message):
    with pytest.raises(error, match=message) as caught:
        call()
    assert isinstance(caught.value, LeanvisionError)


# -------------------------------------------------------------------------------------------- properties
@PROPERTY
@given(
    size=st.tuples(st.integers(1, 24), st.integers(1, 24)),
    patch=st.tuples(st.integers(1, 8), st.integers(1, 8)),
    stride=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    padding=st.sampled_from(["edgeml", "valid", "same"]),
)
def test_rnnpool_layer_output_shape(size, patch, stride, padding):
    """[B, C, H, W] -> [B, 4 h2, oh, ow]: VALID patches (H - k) // s + 1, one replicated row and column more
    with "edgeml", ceil(H / s) with "same"; VALID patches larger than the map are refused, naming both."""
    layer = RNNPoolLayer(2, 3, 2, patch, stride, padding=padding, cell="gru")
    x = torch.randn(1, 2, *size)
    if padding == "same":
        expected = tuple(math.ceil(n / s) for n, s in zip(size, stride))
    elif all(n >= k for n, k in zip(size, patch)):
        expected = tuple((n - k) // s + 1 + (padding == "edgeml") for n, k, s in zip(size, patch, stride))
    else:
        with pytest.raises(IAE, match=f"patch {patch[0]}x{patch[1]} is larger than the "):
            layer(x)
        return
    assert layer(x).shape == (1, 8, *expected) and layer.output_size(*size) == expected


@PROPERTY
@given(
    st.lists(
        st.tuples(st.integers(1, 64), st.integers(0, 15), st.integers(0, 8)).map(
            lambda t: Buffer(size=t[0], start=t[1], end=t[1] + t[2])
        ),
        min_size=1,
        max_size=12,
    )
)
def test_planner_arena_places_live_buffers_apart(buffers):
    """The planner convention's greedy-by-size arena: buffers alive at the same operator never overlap, so
    the arena holds at least the most bytes alive at once and the largest buffer, at most their sum."""
    arena = place_greedy_by_size(buffers)
    for i, a in enumerate(buffers):
        assert a.offset >= 0 and a.offset + a.size <= arena
        for b in buffers[i + 1 :]:
            if a.start <= b.end and b.start <= a.end:  # alive together
                assert a.offset + a.size <= b.offset or b.offset + b.size <= a.offset
    live = max(sum(b.size for b in buffers if b.start <= t <= b.end) for t in range(24))
    assert max(b.size for b in buffers) <= live <= arena <= sum(b.size for b in buffers)


@settings(max_examples=6, deadline=None)
@given(
    name=st.sampled_from(["mobilenetv2_035", "mobilenetv2_rnnpool"]),
    size=st.just(32),
    dtype_bytes=st.sampled_from([1, 2, 4]),
)
def test_memory_conventions_order_and_scale(name, size, dtype_bytes):
    """min (row by row, Proposition 2) <= layer (Appendix E.2) <= planner (whole tensors); each report's
    peak is its largest step (the planner's arena at least that and at least the largest tensor), and every
    figure is elements x dtype_bytes."""
    graph = traced(name, size)
    reports = {c: peak_memory(graph, convention=c, dtype_bytes=dtype_bytes) for c in CONVENTIONS}
    assert reports["min"].peak_bytes <= reports["layer"].peak_bytes <= reports["planner"].peak_bytes
    for convention, report in reports.items():
        largest_step = max(s.live_bytes for s in report.steps)
        if convention == "planner":
            assert report.peak_bytes >= largest_step >= max(op.numel for op in graph.ops) * dtype_bytes
        else:
            assert report.peak_bytes == largest_step
        one = peak_memory(graph, convention=convention, dtype_bytes=1)
        assert report.peak_bytes == one.peak_bytes * dtype_bytes


@PROPERTY
@given(width=st.floats(0.25, 4.0), lite=st.booleans())
def test_rexnet_channel_rule(width, lite):
    """16 block widths, non-decreasing, growing by about final/16 x width per block (v1) from 16 (below
    x1.0 the first block keeps 16); lite's are multiples of 8."""
    stem, widths = rexnet_channels(width, lite)
    assert len(widths) == 16 and widths == sorted(widths) and stem > 0
    if lite:
        assert all(w % 8 == 0 and w >= 8 for w in widths)
        return
    assert widths[0] == (16 if width < 1 else round(16 * width))
    slope = 180 / 16 * width
    assert all(abs(b - a - slope) <= 1 for a, b in zip(widths, widths[1:]))


@PROPERTY
@given(value=st.floats(0.5, 5000), divisor=st.sampled_from([1, 4, 8, 16]))
def test_make_divisible(value, divisor):
    """A multiple of the divisor, at least the divisor, never more than 10% below the value and less than a
    divisor above it (or the divisor itself); within half a divisor unless that would cut 10%."""
    rounded = make_divisible(value, divisor)
    assert rounded % divisor == 0 and rounded >= divisor and rounded >= 0.9 * value
    assert rounded < value + divisor or rounded == divisor
    nearest = max(divisor, round(value / divisor) * divisor)
    assert rounded == nearest or nearest < 0.9 * value or abs(value / divisor % 1 - 0.5) < 1e-9


@settings(max_examples=25, deadline=None)
@given(blocks=st.integers(2, 8), seed=st.integers(0, 2**16), budget=st.sampled_from([60_000, 200_000]))
def test_channel_search_rule(blocks, seed, budget):
    """Sampled widths c_i = round(a f(i) + b): one per block, non-decreasing from b >= min_channels, and the
    network within both limits (costs as network_cost counts them)."""
    space = SearchSpace(blocks=blocks, img_size=16, num_classes=10)
    max_macs = 50 * budget
    b_max = widest_flat(space, budget, max_macs)
    candidate = sample_candidate(space, budget, max_macs, np.random.default_rng(seed), b_max)
    channels = list(candidate.channels)
    check_channels(channels, space)  # blocks positive, non-decreasing widths
    assert channels[0] == candidate.b and space.min_channels <= candidate.b <= b_max
    assert (candidate.params, candidate.macs) == network_cost(channels, space)
    assert candidate.params <= budget and candidate.macs <= max_macs
