"""Shared test helpers."""

from __future__ import annotations

import glob
import gzip
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from PIL import Image
from torch import nn

from leanvision.engine.train import TrainConfig
from leanvision.experiments.channel_search.study import SearchSettings

LINES = "synthetic:lines,train=48,val=24"
SEARCH_DATA = "synthetic:lines,train=32,val=16"
TINY_SEARCH = dict(
    blocks=3, max_params=20_000, max_macs=2_000_000, data=SEARCH_DATA, img_size=16, epochs=1, repeats=1
)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BN statistic random values, so layout mix-ups change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture
def image() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


class Tiny(nn.Module):
    """Conv + dropout + linear on 1 x 16 x 16 images; `fail_at` makes training call N raise Ctrl-C's
    KeyboardInterrupt, return NaN or send this process SIGTERM (`fail_with`: interrupt, nan, sigterm)."""

    def __init__(
        self, num_classes: int = 9, fail_at: int | None = None, fail_with: str = "interrupt"
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 7 * 7, num_classes)
        self.drop = nn.Dropout(0.3)
        self.calls, self.fail_at, self.fail_with = 0, fail_at, fail_with

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
        if self.calls == self.fail_at:
            if self.fail_with == "interrupt":
                raise KeyboardInterrupt
            if self.fail_with == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                return torch.full((x.shape[0], self.fc.out_features), float("nan"))
        return self.fc(self.drop(torch.relu(self.conv(x))).flatten(1))


def tiny(**kwargs) -> Tiny:
    """A Tiny with the same initial weights every time."""
    torch.manual_seed(0)
    return Tiny(**kwargs)


def tiny_config(out, **overrides) -> TrainConfig:
    """A 3-epoch run of model "tiny" (pass model=tiny() to train) on 48 + 24 line images to `out`."""
    settings = dict(epochs=3, batch_size=16, lr=0.1, img_size=16, progress=False, out=str(out))
    return TrainConfig("tiny", LINES, **{**settings, **overrides})


def without_time(history: list[dict]) -> list[dict]:
    """Metrics rows without their wall-clock time (the rest of a seeded run is exact)."""
    return [{k: v for k, v in row.items() if k != "time_s"} for row in history]


def tiny_settings(out: Path, **overrides) -> SearchSettings:
    """A channel search of 4 tiny models, one 1-epoch run each, on 32 + 16 line images."""
    return SearchSettings(**{**TINY_SEARCH, "models": 4, "batch_size": 16, "out": str(out), **overrides})


def study_trials(settings: SearchSettings) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=settings.study_name, storage=settings.storage_url).get_trials()


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    path = Path(found[-1]) if found else (Path(shutil.which("initdb")) if shutil.which("initdb") else None)
    return path.parent if path is not None and (path.parent / "pg_ctl").exists() else None


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL cluster on a free loopback port (initdb runs as `nobody` when we are root)."""
    pytest.importorskip("psycopg", reason="needs the postgres extra (psycopg[binary])")
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) in /usr/lib/postgresql/*/bin or on PATH")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="leanvision-pg-"))
    if os.geteuid() == 0:  # initdb refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        shutil.chown(root, "nobody")
        as_user = ["runuser", "-u", "nobody", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    subprocess.run(
        [*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "search", "--auth=trust", "--no-sync"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg_ctl = [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-w"]
    subprocess.run(
        [*pg_ctl, "-l", str(root / "log"), "-o", options, "start"], check=True, capture_output=True
    )
    try:
        yield f"postgresql+psycopg://search@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def write_idx(path: Path, array: np.ndarray) -> None:
    """`array` as a gzipped idx file of unsigned bytes (the MNIST format)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fashion_dir(tmp_path: Path) -> Path:
    """A Fashion-MNIST folder of 6 training and 4 test images (random pixels)."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def image_folder(root: Path, classes: list[str], per_class: int = 2) -> None:
    """A folder:DIR dataset: root/{train,val}/CLASS/*.png, small images that differ by class."""
    for split in ("train", "val"):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (20, 24), (index * 40, i * 50, 90)).save(folder / f"{i}.png")


def make_meta_album(root: Path, shade: int, classes: int = 2, per_class: int = 8) -> None:
    """A Meta-Album dataset folder whose classes differ in colour (`shade` varies it between datasets)."""
    (root / "images").mkdir(parents=True)
    lines = ["FILE_NAME,CATEGORY,SUPER_CATEGORY"]
    for c in range(classes):
        for i in range(per_class):
            name = f"c{c}_{i:02d}.png"
            Image.new("RGB", (24, 24), (200 * c, (shade + 30 * i) % 256, 90)).save(root / "images" / name)
            lines.append(f"{name},class{c},all")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    (root / "info.json").write_text("{}")


def one_line_error(result) -> str:
    """The CLI's answer to bad input (a CliRunner result): exit code 2 and one line `error: ...`; returns
    that line."""
    lines = result.output.splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (
        result.exit_code,
        result.output,
        result.exception,
    )
    return lines[0]
