"""Issue 19 §2: hostile and broken files at every place that takes one.

A malicious pickle (its __reduce__ runs a shell command that creates a marker file), garbage bytes, a
truncated checkpoint, a checkpoint of another model or width and a safetensors file with a missing tensor
go to every command option and library function that reads weights: nothing executes, the CLI exits with 2
and one line naming the file and what was expected, the library raises a CheckpointError. Datasets: broken
idx, CSV, image and annotation files are named, skipped or (--strict) refused as the README says.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

import leanvision
from conftest import image_folder, make_meta_album, one_line_error
from leanvision.cli import app
from leanvision.detection.data import build_detection_data
from leanvision.engine.data import build_dataset
from leanvision.engine.train_state import load_training_checkpoint
from leanvision.errors import CheckpointError, DataError, MissingFileError
from leanvision.models.weights import load_checkpoint, read_state_dict

LINES = "synthetic:lines,train=8,val=8"  # 9 classes
FACES = "synthetic:faces,train=2,val=2"


class Payload:
    """Unpickling this runs `touch marker` (what a hostile checkpoint would do with any command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_payload_runs_when_unpickled(tmp_path):
    """The probe can fail: plain pickle.loads of the hostile file runs its command."""
    pickle.loads(pickle.dumps(Payload(tmp_path / "PWNED")))
    assert (tmp_path / "PWNED").exists()


def without(model: torch.nn.Module, key: str) -> dict[str, torch.Tensor]:
    """The model's state_dict less its tensor `key` (for safetensors, contiguous)."""
    state = model.state_dict()
    assert key in state
    return {k: v.contiguous() for k, v in state.items() if k != key}


def unreadable_files(root: Path) -> None:
    """hostile.pt (torch.save zip), hostile_raw.pt (protocol-4 pickle), hostile.safetensors (the zip
    renamed), garbage.pt, truncated.pt."""
    marker = root / "PWNED"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Payload(marker)}, root / "hostile.pt")
    (root / "hostile_raw.pt").write_bytes(pickle.dumps({"w": Payload(marker)}, protocol=4))
    shutil.copy(root / "hostile.pt", root / "hostile.safetensors")
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    (root / "garbage.pt").write_bytes(bytes(noise.tolist()))
    torch.save(torchvision.models.resnet18().state_dict(), root / "whole.pt")
    whole = (root / "whole.pt").read_bytes()
    (root / "truncated.pt").write_bytes(whole[: len(whole) // 2])


# kind -> what the one line says (after naming the file)
UNREADABLE = {
    "hostile": r"is not a weights-only checkpoint: it holds objects other than tensors and plain "
    r"containers \(posix\.system\)",
    "hostile_raw": r"is not a weights-only checkpoint \(a state_dict saved by torch\.save\)",
    "garbage": r"is not a (weights-only|readable PyTorch) checkpoint",
    "truncated": r"is not a readable PyTorch checkpoint \(truncated or not one; expected a state_dict",
}
DISGUISED = {"hostile.safetensors": r"is not a readable safetensors file: Error while deserializing header"}
# family -> the model the entries load, and per misfit kind: (file writer, what the line says)
MOBILENET = lambda: leanvision.create_model("mobilenetv2_035", num_classes=9)  # noqa: E731
FACE = lambda: leanvision.create_model("rnnpool_face_quant")  # noqa: E731
FAMILIES: dict[str, dict[str, tuple[Callable[[Path], None], str]]] = {
    "classifier": {
        "other_model": (
            lambda p: torch.save(torchvision.models.resnet18().state_dict(), p),
            r"it does not fit MobileNetV2: missing \['features\.0\.0\.weight'",
        ),
        "other_width": (
            lambda p: torch.save(leanvision.create_model("mobilenetv2_050", num_classes=9).state_dict(), p),
            r"tensor 'features\.\S+' has shape \[[\d, ]+\], the model expects \[[\d, ]+\]: the checkpoint "
            r"was made for another width",
        ),
        "missing_tensor": (
            lambda p: save_file(without(MOBILENET(), "features.3.conv.1.0.weight"), p),
            r"it does not fit MobileNetV2: missing \['features\.3\.conv\.1\.0\.weight'\], unexpected \[\]",
        ),
    },
    "face": {  # `detect` reads EdgeML's layout too (models/face/checkpoint.py), `eval --task detection` not
        "other_model": (
            lambda p: torch.save(MOBILENET().state_dict(), p),
            r"(is not a rnnpool_face_quant checkpoint: it has no RNNPool|it does not fit RNNPoolFace: "
            r"missing \['stem\.0\.0\.weight')",
        ),
        "other_width": (
            lambda p: torch.save(leanvision.create_model("rnnpool_face_m4").state_dict(), p),
            r"(is not a rnnpool_face_quant checkpoint: it has 1 input channels, 1 stem convs, RNNPool 4->64"
            r"|it does not fit RNNPoolFace: missing \['stem\.1\.0\.weight')",
        ),
        "missing_tensor": (
            lambda p: save_file(without(FACE(), "heads.0.loc.0.0.weight"), p),
            r"missing \['heads\.0\.loc\.0\.0\.weight'\], unexpected \[\]",
        ),
    },
    "resnet": {
        "other_model": (
            lambda p: torch.save(MOBILENET().state_dict(), p),
            r"is not a torchvision/timm ResNet state_dict \(needs 'conv1\.weight'",
        ),
        "other_width": (
            lambda p: torch.save(torchvision.models.resnet50().state_dict(), p),
            r"holds resnet50 weights \(Bottleneck blocks \(3, 4, 6, 3\)\), .*: pass resnet18 weights",
        ),
        "missing_tensor": (
            lambda p: save_file(without(torchvision.models.resnet18(), "layer1.0.bn2.weight"), p),
            r"lacks 1 tensor\(s\) of the resnet18 blocks the model keeps "
            r"\(first: \['layer1\.0\.bn2\.weight'\]\)",
        ),
    },
}
SUFFIX = {"missing_tensor": ".safetensors"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Every bad file (`<kind>.pt`, `<family>_<kind>.pt|.safetensors`), a photo and a Meta-Album set."""
    root = tmp_path_factory.mktemp("hostile")
    unreadable_files(root)
    for family, misfits in FAMILIES.items():
        for kind, (write, _) in misfits.items():
            write(root / f"{family}_{kind}{SUFFIX.get(kind, '.pt')}")
    Image.new("RGB", (64, 48), (120, 80, 60)).save(root / "photo.png")
    make_meta_album(root / "META", 0, per_class=4)
    return root


def bad_file(root: Path, family: str, kind: str) -> Path:
    if kind in UNREADABLE or kind in DISGUISED:
        return root / (kind if kind in DISGUISED else f"{kind}.pt")
    return root / f"{family}_{kind}{SUFFIX.get(kind, '.pt')}"


META = "metaalbum:{root}/META,per_class=2"
MBV2 = "mobilenetv2_035 --num-classes 9 --pretrained {file}"
EVAL = f"eval --model mobilenetv2_035 --checkpoint {{file}} --data {LINES}"
# (id, family, command line: {file} the bad file, {root} the fixture folder, {tmp} an output folder)
COMMANDS: list[tuple[str, str, str]] = [
    ("eval", "classifier", EVAL),
    ("eval ort", "classifier", EVAL + " --backend ort"),
    ("rank", "classifier", f"rank --model mobilenetv2_035 --checkpoint {{file}} --data {LINES}"),
    ("export", "classifier", f"export {MBV2} --out {{tmp}}/m.onnx"),
    ("bench", "classifier", f"bench {MBV2} --min-seconds 0"),
    ("bench --backend", "classifier", f"bench {MBV2} --backend eager"),
    ("eval detection", "face",
     f"eval --task detection --model rnnpool_face_quant --checkpoint {{file}} --data {FACES}"),
    ("detect", "face", "detect rnnpool_face_quant {root}/photo.png --checkpoint {file} --out {tmp}/det"),
    ("rrr reduce", "resnet", "rrr reduce --weights {file} --backbone resnet18 --out {tmp}/r.pth"),
    ("rrr select", "resnet", f"rrr select --weights {{file}} --backbone resnet18 --data {META} --holdout 1 "
                             "--epochs 1 --img-size 32 --out {tmp}/sel"),
    ("rrr run", "resnet", f"rrr run --weights {{file}} --backbone resnet18 --data {META} --epochs 1 "
                          "--img-size 32 --out {tmp}/run"),
]  # fmt: skip


def command(line: str, file: Path, root: Path, tmp: Path) -> list[str]:
    """The arguments of a COMMANDS line (paths without spaces)."""
    return [word.format(file=file, root=root, tmp=tmp) for word in line.split()]


# (function id, family, call)
FUNCTIONS: list[tuple[str, str, Callable[[Path], object]]] = [
    ("create_model", "classifier", lambda f: leanvision.create_model("mobilenetv2_035", num_classes=9,
                                                                     pretrained=f)),
    ("create_model face", "face", lambda f: leanvision.create_model("rnnpool_face_quant", pretrained=f)),
    ("create_model rrrnet", "resnet", lambda f: leanvision.create_model("rrrnet_resnet18", pretrained=f)),
    ("load_checkpoint", "classifier", lambda f: load_checkpoint(MOBILENET(), f)),
]  # fmt: skip
KINDS = [*UNREADABLE, *DISGUISED, "other_model", "other_width", "missing_tensor"]


def expected(family: str, kind: str) -> str:
    return {**UNREADABLE, **DISGUISED}.get(kind) or FAMILIES[family][kind][1]


def assert_one_line_error(result, path: Path, message: str) -> None:
    """Exit code 2 and one line `error: ...` naming `path` and matching `message`."""
    line = one_line_error(result)
    assert str(path) in line and re.search(message, line), line


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name, family, line", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_command_refuses_bad_weights_in_one_line(root, tmp_path, name, family, line, kind):
    path = bad_file(root, family, kind)
    result = CliRunner().invoke(app, command(line, path, root, tmp_path))
    assert_one_line_error(result, path, expected(family, kind))
    assert not (root / "PWNED").exists()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name, family, load", FUNCTIONS, ids=[f[0] for f in FUNCTIONS])
def test_every_function_refuses_bad_weights(root, name, family, load, kind):
    path = bad_file(root, family, kind)
    with pytest.raises(CheckpointError) as caught:
        load(path)
    assert str(path) in str(caught.value) and re.search(expected(family, kind), str(caught.value))
    assert "weights_only=False" not in str(caught.value) and not (root / "PWNED").exists()


def resume_args(out: Path) -> list[str]:
    """`leanvision train --resume` of a tiny run in `out`."""
    return ["train", "--model", "mobilenetv2_035", "--data", LINES, "--out", str(out), "--resume"]


@pytest.mark.parametrize("kind", UNREADABLE)
def test_resume_and_readers_refuse_unreadable_files(root, tmp_path, kind):
    """`train --resume` on a hostile or broken last.pt, and the two readers under every loader; torch's
    note on an unusual pickle protocol is not printed either."""
    (tmp_path / "run").mkdir()
    last = tmp_path / "run" / "last.pt"
    shutil.copy(bad_file(root, "", kind), last)
    args = resume_args(tmp_path / "run")
    assert_one_line_error(CliRunner().invoke(app, args), last, UNREADABLE[kind])
    for read in (read_state_dict, load_training_checkpoint):
        with warnings.catch_warnings(record=True) as caught_warnings:
            warnings.simplefilter("always")
            with pytest.raises(CheckpointError, match=UNREADABLE[kind]):
                read(last)
        assert caught_warnings == []
    assert not (root / "PWNED").exists()


def test_resume_of_a_weights_file_says_it_is_not_a_training_checkpoint(root, tmp_path):
    (tmp_path / "run").mkdir()
    shutil.copy(root / "whole.pt", tmp_path / "run" / "last.pt")
    args = resume_args(tmp_path / "run")
    result = CliRunner().invoke(app, args)
    assert_one_line_error(
        result, tmp_path / "run" / "last.pt", r"is not a leanvision training checkpoint \(missing \['config'"
    )


def test_damaged_state_files_of_resumable_experiments(root, tmp_path):
    """rrr select / rrr run keep a JSON state, search channels an SQLite study: damaged ones are named."""
    select = next(line for name, _, line in COMMANDS if name == "rrr select")
    (tmp_path / "sel").mkdir()
    for content, message in ((b"{not json", "is not a JSON state file"), (b"[1, 2]", "holds a JSON list")):
        (tmp_path / "sel" / "select.json").write_bytes(content)
        result = CliRunner().invoke(app, command(select, root / "whole.pt", root, tmp_path))
        assert_one_line_error(result, tmp_path / "sel" / "select.json", message)
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "study.db").write_bytes(bytes(range(256)) * 8)
    args = [
        "search",
        "channels",
        "--data",
        LINES,
        "--models",
        "1",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "search"),
    ]
    result = CliRunner().invoke(app, args)
    assert_one_line_error(
        result, tmp_path / "search" / "study.db", "cannot open the study storage .*file is not a database"
    )


# ------------------------------------------------------------------------------------------------ datasets
def idx_bytes(array: np.ndarray) -> bytes:
    return (
        bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()
    )


IMAGES = np.random.default_rng(0).integers(0, 256, (6, 28, 28)).astype(np.uint8)
IDX_DAMAGE: dict[str, tuple[str, bytes, str]] = {  # file, its content, what the error says
    "truncated body": ("train-images-idx3-ubyte.gz", gzip.compress(idx_bytes(IMAGES)[:2000]),
                       r"is truncated or corrupt: header says \[6, 28, 28\] \(4704 bytes\), found 1984"),
    "truncated header": ("train-images-idx3-ubyte.gz", gzip.compress(idx_bytes(IMAGES)[:10]),
                         r"is truncated: 10 bytes, its header alone takes 16"),
    "overflowing dims": ("train-images-idx3-ubyte.gz",
                         gzip.compress(bytes([0, 0, 8, 3]) + (2**31).to_bytes(4, "big") * 3),
                         r"is truncated or corrupt: header says \[2147483648, 2147483648, 2147483648\]"),
    "truncated gzip": ("train-images-idx3-ubyte.gz", gzip.compress(idx_bytes(IMAGES))[:1000],
                       r"is not a readable idx file: Compressed file ended"),
    "corrupt deflate": ("train-images-idx3-ubyte.gz", gzip.compress(idx_bytes(IMAGES))[:10] + b"\xff" * 50,
                        r"is not a readable idx file: Error -3 while decompressing data"),
    "not gzip": ("train-images-idx3-ubyte.gz", b"garbage" * 20, r"is not a readable idx file: Not a gzipped"),
    "bad magic": ("train-labels-idx1-ubyte.gz", gzip.compress(bytes([0, 0, 13, 1]) + (6).to_bytes(4, "big")),
                  r"is not an idx file of unsigned bytes \(bad magic number 00000d01\)"),
    "label out of range": ("train-labels-idx1-ubyte.gz", gzip.compress(idx_bytes(np.full(6, 200, np.uint8))),
                           r"holds label 200; Fashion-MNIST's are 0\.\.9"),
}  # fmt: skip


@pytest.mark.parametrize("damage", IDX_DAMAGE)
def test_damaged_idx_files_are_named(fashion_dir, damage):
    name, content, message = IDX_DAMAGE[damage]
    (fashion_dir / name).write_bytes(content)
    with pytest.raises(DataError, match=f"{re.escape(str(fashion_dir / name))} {message}"):
        build_dataset(f"fashion-mnist:{fashion_dir}")


LABELS_DAMAGE: dict[str, tuple[bytes, str]] = {  # labels.csv content, what the error says
    "binary": (bytes(range(128, 256)), r" is not a UTF-8 CSV file of FILE_NAME and CATEGORY .*'utf-8' codec"),
    "latin-1": ("FILE_NAME,CATEGORY\ncafé.png,a\n".encode("latin-1"), r" is not a UTF-8 CSV file"),
    "short row": (b"FILE_NAME,CATEGORY\nc0_00.png\n", r", line 2: empty FILE_NAME or CATEGORY"),
    "empty cell": (b"FILE_NAME,CATEGORY\nc0_00.png,\n", r", line 2: empty FILE_NAME or CATEGORY"),
    "no header": (b"", r": missing column\(s\) \['CATEGORY', 'FILE_NAME'\]"),
    "header only": (b"FILE_NAME,CATEGORY\n", r" has a header but no rows"),
}  # fmt: skip


@pytest.mark.parametrize("damage", LABELS_DAMAGE)
def test_labels_csv_that_does_not_parse_is_named(tmp_path, damage):
    """A label file decides the split, so a row that does not parse fails (with its line) in both modes."""
    make_meta_album(tmp_path / "DS", 0, per_class=4)
    content, message = LABELS_DAMAGE[damage]
    (tmp_path / "DS" / "labels.csv").write_bytes(content)
    for strict in (False, True):
        with pytest.raises(DataError, match=re.escape(str(tmp_path / "DS" / "labels.csv")) + message):
            build_dataset(f"metaalbum:{tmp_path / 'DS'},per_class=2", strict=strict)


def test_garbage_images_are_skipped_or_refused_with_strict(tmp_path):
    """folder:DIR and metaalbum:DIR: a garbage or missing image is named in a warning and skipped; --strict
    fails on it in one line."""
    image_folder(tmp_path / "F", ["a", "b"])
    (tmp_path / "F" / "val" / "b" / "junk.jpg").write_bytes(b"\xff\xd8garbage")
    make_meta_album(tmp_path / "M", 0, per_class=4)
    (tmp_path / "M" / "images" / "c1_03.png").write_bytes(b"garbage")
    for spec, bad, sizes in (
        (f"folder:{tmp_path / 'F'}", tmp_path / "F" / "val" / "b" / "junk.jpg", (4, 4)),
        (f"metaalbum:{tmp_path / 'M'},per_class=2", tmp_path / "M" / "images" / "c1_03.png", (3, 4)),
    ):
        with pytest.warns(
            UserWarning, match=f"skipped 1 corrupt or missing image.*first: {re.escape(str(bad))}"
        ):
            data = build_dataset(spec, img_size=16)
        assert (len(data.train), len(data.val)) == sizes
        args = ["eval", "--model", "mobilenetv2_035", "--checkpoint", "x.pt", "--data", spec, "--strict"]
        assert_one_line_error(
            CliRunner().invoke(app, args), bad, "corrupt or missing image .*cannot identify"
        )


def test_the_command_prints_a_skip_warning_in_one_line(monkeypatch):
    """The skip warnings reach a command's user as `warning: ...`, without leanvision's source line."""
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after the test
    assert CliRunner().invoke(app, ["models", "rexnet_100"]).exit_code == 0
    shown = warnings.formatwarning(UserWarning("skipped 1 image"), UserWarning, "data.py", 304, "x = 1")
    assert shown == "warning: skipped 1 image\n"


def test_empty_folders_say_what_was_expected(tmp_path):
    (tmp_path / "E" / "train").mkdir(parents=True)
    (tmp_path / "E" / "val").mkdir()
    cases = [
        (
            f"folder:{tmp_path / 'none'}",
            MissingFileError,
            r"none/train is not a folder \(expected DIR/train/CLASS",
        ),
        (f"folder:{tmp_path / 'E'}", DataError, r"no class folders in .*E/train"),
        (f"metaalbum:{tmp_path / 'E'}", MissingFileError, r"labels\.csv not found \(expected DIR/images/"),
        (f"cifar10:{tmp_path / 'E'}", MissingFileError, r"\['data_batch_1', .*not found in"),
        (f"fashion-mnist:{tmp_path / 'E'}", MissingFileError, r"train-images-idx3-ubyte\.gz not found in"),
    ]
    for spec, error, message in cases:
        with pytest.raises(error, match=message):
            build_dataset(spec)
    (tmp_path / "E" / "train" / "a").mkdir()
    (tmp_path / "E" / "val" / "a").mkdir()
    (tmp_path / "E" / "train" / "a" / "x.png").write_bytes(b"not a png")
    with (
        pytest.warns(UserWarning, match="skipped 1"),
        pytest.raises(DataError, match="no readable images under"),
    ):
        build_dataset(f"folder:{tmp_path / 'E'}")


def test_a_hostile_cifar_batch_is_refused_unexecuted(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (base / name).write_bytes(pickle.dumps({"data": Payload(tmp_path / "PWNED"), "labels": [0]}))
    with pytest.raises(
        DataError, match="data_batch_1 is not a readable CIFAR batch file: refusing to load posix"
    ):
        build_dataset(f"cifar10:{tmp_path}")
    assert not (tmp_path / "PWNED").exists()


def test_detect_names_an_image_it_cannot_decode(root, tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"garbage")
    args = ["detect", "rnnpool_face_quant", str(root / "photo.png"), str(tmp_path / "junk.jpg"),
            "--random-weights", "--out", str(tmp_path / "out")]  # fmt: skip
    assert_one_line_error(CliRunner().invoke(app, args), tmp_path / "junk.jpg", "cannot decode image")
    assert not (tmp_path / "out").exists()  # every image is read before anything is written


# -------------------------------------------------------------------------------------- detection annotations
def picture(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), (120, 80, 60)).save(path)


def widerface(root: Path, train_gt: bytes) -> str:
    """WIDER FACE's layout with two images per split, empty eval_tools lists and `train_gt` as the train
    annotations."""
    from scipy.io import savemat

    for split in ("train", "val"):
        for name in ("a", "b"):
            picture(root / f"WIDER_{split}" / "images" / "0--x" / f"{name}.jpg")
    (root / "wider_face_split").mkdir()
    good = "0--x/a.jpg\n1\n1 2 20 20 0 0 0 0 0 0\n0--x/b.jpg\n1\n5 5 30 30 0 0 0 0 0 0\n"
    (root / "wider_face_split" / "wider_face_val_bbx_gt.txt").write_text(good)
    (root / "wider_face_split" / "wider_face_train_bbx_gt.txt").write_bytes(train_gt)
    empty = np.empty((0, 1), dtype=object)
    for subset in ("easy", "medium", "hard"):
        savemat(root / f"wider_{subset}_val.mat", {"file_list": empty, "gt_list": empty})
    return f"widerface:{root}"


VOC = (
    "<annotation><object><bndbox><xmin>{}</xmin><ymin>2</ymin><xmax>30</xmax><ymax>30</ymax></bndbox></object>"
    "</annotation>"
)


def scut_head(root: Path, broken_xml: bytes) -> str:
    """A SCUT-HEAD part of four annotated images, the second one's annotation `broken_xml`."""
    for i in range(4):
        picture(root / "JPEGImages" / f"{i}.jpg")
        (root / "Annotations").mkdir(exist_ok=True)
        (root / "Annotations" / f"{i}.xml").write_text(VOC.format(1))
    (root / "Annotations" / "1.xml").write_bytes(broken_xml)
    return f"scut-head:{root}"


def coco(root: Path, annotations: list) -> str:
    """COCO's layout with two images per split; `annotations` are the training split's."""
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        for i in range(2):
            picture(root / f"{split}2017" / f"{i}.jpg")
        anns = (
            annotations if split == "train" else [{"image_id": 1, "bbox": [1, 2, 20, 20], "category_id": 1}]
        )
        data = {"images": [{"id": 1, "file_name": "0.jpg"}, {"id": 2, "file_name": "1.jpg"}],
                "annotations": anns, "categories": [{"id": 1, "name": "face"}]}  # fmt: skip
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    return f"coco-boxes:{root}"


GT = "0--x/a.jpg\n{}\n{}\n0--x/b.jpg\n1\n5 5 30 30 0 0 0 0 0 0\n"
WIDER_GT = "wider_face_train_bbx_gt.txt"


# dataset writer, the annotation file named, what the line says, train + val images kept when skipped
ANNOTATION_DAMAGE = [
    pytest.param(lambda r: widerface(r, GT.format("xx", "1 2 20 20").encode()), WIDER_GT,
                 r":1: expected an image path and a face count, got '0--x/a\.jpg', 'xx'", 3,
                 id="wider count"),
    pytest.param(lambda r: widerface(r, GT.format("1", "foo bar").encode()), WIDER_GT,
                 r":3: expected 'x y w h \.\.\.' of a face, got 'foo bar'", 4, id="wider face line"),
    pytest.param(lambda r: widerface(r, GT.format("99", "1 2 20 20").encode()), WIDER_GT,
                 r":4: expected 'x y w h \.\.\.' of a face, got '0--x/b\.jpg' \(the count 99 runs into",
                 3, id="wider count past its lines"),
    pytest.param(lambda r: scut_head(r, VOC.format("abc").encode()), "1.xml",
                 r": not a VOC annotation with numeric bndbox .*'abc'", 3, id="voc not numeric"),
    pytest.param(lambda r: scut_head(r, b"\x00\xffgarbage"), "1.xml",
                 r": not a VOC annotation .*\(syntax error", 3, id="voc not xml"),
    pytest.param(lambda r: coco(r, [{"image_id": 1, "bbox": [1, 2], "category_id": 1}]),
                 "instances_train2017.json", r": annotation 0 has no known image_id or no \[x, y, w, h\]",
                 4, id="coco short bbox"),
]  # fmt: skip


@pytest.mark.parametrize("write, file, message, kept", ANNOTATION_DAMAGE)
def test_malformed_annotations_are_named_and_skipped_or_refused(tmp_path, write, file, message, kept):
    """README: malformed annotation lines are named and skipped (--strict: fail)."""
    spec = write(tmp_path)
    pattern = re.escape(file) + message
    with pytest.warns(UserWarning, match=r"skipped 1 malformed annotation\(s\) in .*" + pattern):
        data = build_detection_data(spec)
    assert len(data.train) + len(data.val) == kept
    with pytest.raises(DataError, match=pattern):
        build_detection_data(spec, strict=True)


DAMAGED_ANNOTATION_FILES = [
    pytest.param(lambda r: widerface(r, bytes(range(128, 256))), id="wider gt not UTF-8"),
    pytest.param(lambda r: coco(r, [{"image_id": 1, "bbox": ["a", "b", "c", "d"], "category_id": 1}]),
                 id="coco bbox not numbers"),
    pytest.param(lambda r: coco(r, [[1, 2, 3, 4]]), id="coco annotation not an object"),
    pytest.param(lambda r: coco(r, [{"image_id": [1], "bbox": [1, 2, 3, 4], "category_id": 1}]),
                 id="coco unhashable image_id"),
]  # fmt: skip


@pytest.mark.parametrize("write", DAMAGED_ANNOTATION_FILES)
def test_broken_annotation_files_are_data_errors(tmp_path, write):
    """Each should be a DataError naming the file under strict=True (a named skip without it), not a
    traceback."""
    spec = write(tmp_path)
    with pytest.raises(DataError, match=f"instances_train2017.json|{WIDER_GT}"):
        build_detection_data(spec, strict=True)
