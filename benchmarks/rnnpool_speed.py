"""RNNPoolLayer speed and peak memory at the paper's two layer settings, against literal Algorithm 1.

Settings: VWW layer (batch 32, 8x112x112, patch 6, stride 4, h1=h2=8) and Face-C layer (batch 1,
3x480x640, patch 8, stride 4, h1=h2=16). For each: forward (no grad) and forward+backward time of the
fast layer, and its peak memory (growth of the RSS high-water mark over one run, VmHWM reset first,
in a fresh subprocess per case; Linux only). The literal Algorithm-1 implementation of
tests/rnnpool_reference.py pools one patch at a time in Python; it is timed on the first
--literal-patches output positions and its time is scaled by the number of positions (reported as
extrapolated), so the script runs anywhere in minutes.
Outputs of the two are compared on those positions. A second table times the two implementations of
FastGRNNCell.sweep against each other, interleaved run by run: the numba kernel and the torch fallback.

    python benchmarks/rnnpool_speed.py [--out results/rnnpool_speed.json] [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import rnnpool_reference as literal  # noqa: E402
from leanvision.bench import percentiles  # noqa: E402
from leanvision.layers import rnn_cells  # noqa: E402
from leanvision.layers.rnnpool import RNNPoolLayer  # noqa: E402

SETTINGS = {
    "vww": dict(batch=32, channels=8, height=112, width=112, patch=6, stride=4, hidden=8),
    "face_c": dict(batch=1, channels=3, height=480, width=640, patch=8, stride=4, hidden=16),
}


def build(setting: dict) -> tuple[RNNPoolLayer, torch.Tensor]:
    torch.manual_seed(0)
    layer = RNNPoolLayer(
        setting["channels"], setting["hidden"], setting["hidden"], setting["patch"], setting["stride"]
    )
    with torch.no_grad():  # every parameter random and unsaturated, so every term matters
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    x = torch.randn(setting["batch"], setting["channels"], setting["height"], setting["width"])
    return layer, x


def run_once(layer: RNNPoolLayer, x: torch.Tensor, backward: bool) -> None:
    if backward:
        layer.zero_grad(set_to_none=True)
        layer(x.requires_grad_()).sum().backward()
    else:
        with torch.no_grad():
            layer(x)


def time_fast(layer: RNNPoolLayer, x: torch.Tensor, backward: bool, repeats: int) -> dict:
    run_once(layer, x, backward)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_once(layer, x, backward)
        times.append((time.perf_counter() - start) * 1e3)
    p10, median, p90 = percentiles(times)
    return dict(median_ms=median, p10_ms=p10, p90_ms=p90, runs=repeats)


def time_sweep_paths(layer: RNNPoolLayer, x: torch.Tensor, backward: bool, repeats: int) -> dict | None:
    """FastGRNNCell.sweep's numba kernel against its torch fallback, interleaved (None without numba)."""
    kernels = rnn_cells._numba_kernels
    if kernels() is None:
        return None
    paths = {"numba": kernels, "torch": lambda: None}
    times = {name: [] for name in paths}
    try:
        for i in range(repeats + 1):  # round 0 warms up
            for name in list(paths)[:: 1 if i % 2 else -1]:
                rnn_cells._numba_kernels = paths[name]
                start = time.perf_counter()
                run_once(layer, x, backward)
                if i:
                    times[name].append((time.perf_counter() - start) * 1e3)
    finally:
        rnn_cells._numba_kernels = kernels
    result = {}
    for name, t in times.items():
        p10, median, p90 = percentiles(t)
        result[name] = dict(median_ms=median, min_ms=min(t), p10_ms=p10, p90_ms=p90, runs=repeats)
    result["speedup_median"] = result["torch"]["median_ms"] / result["numba"]["median_ms"]
    result["speedup_min"] = result["torch"]["min_ms"] / result["numba"]["min_ms"]
    return result


def time_literal(layer: RNNPoolLayer, x: torch.Tensor, backward: bool, positions: int) -> dict:
    """Literal Algorithm 1 on the first `positions` patches of image 0, scaled to all positions."""
    (kh, _), (sh, sw) = layer.patch_size, layer.stride
    oh, ow = (x.shape[2] - kh) // sh + 1, (x.shape[3] - layer.patch_size[1]) // sw + 1
    total = x.shape[0] * oh * ow
    cut = [(i // ow, i % ow) for i in range(min(positions, total))]
    patches = [x[0, :, i * sh : i * sh + kh, j * sw : j * sw + layer.patch_size[1]] for i, j in cut]
    start = time.perf_counter()
    with torch.set_grad_enabled(backward):
        out = torch.stack([literal.rnnpool_patch(layer.pool.rnn1, layer.pool.rnn2, p) for p in patches])
        if backward:
            out.sum().backward()
    elapsed = (time.perf_counter() - start) * 1e3
    with torch.no_grad():
        fast = layer(x[:1]).permute(0, 2, 3, 1)[0]
        diff = max((fast[i, j] - o).abs().max().item() for (i, j), o in zip(cut, out.detach()))
    return dict(
        extrapolated_ms=elapsed * total / len(cut),
        timed_patches=len(cut),
        total_patches=total,
        max_abs_diff_vs_fast=diff,
    )


def _status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak(name: str, backward: bool) -> None:
    """Child-process side of peak_memory_mib: print the RSS high-water mark growth of one run, in KiB."""
    layer, x = build(SETTINGS[name])
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    run_once(layer, x, backward)
    print(_status_kib("VmHWM") - base)


def peak_memory_mib(name: str, backward: bool, threads: int) -> float:
    """Peak RSS growth of one run, in a fresh process (the baseline includes the layer and its input)."""
    code = (
        f"import sys, torch; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
        f"import rnnpool_speed as s; torch.set_num_threads({threads}); s.measure_peak({name!r}, {backward})"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1]) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/rnnpool_speed.json"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--literal-patches", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for name, setting in SETTINGS.items():
        layer, x = build(setting)
        row = dict(setting=setting)
        for mode, backward in (("forward", False), ("forward_backward", True)):
            fast = time_fast(layer, x, backward, args.repeats)
            slow = time_literal(layer, x, backward, args.literal_patches)
            fast["peak_rss_growth_mib"] = peak_memory_mib(name, backward, args.threads)
            row[mode] = dict(
                fast=fast,
                literal=slow,
                speedup_vs_literal=slow["extrapolated_ms"] / fast["median_ms"],
                numba_vs_torch_sweep=time_sweep_paths(layer, x, backward, args.repeats),
            )
        results[name] = row
    report = dict(
        threads=args.threads,
        torch=torch.__version__,
        machine=platform.machine(),
        note="literal = tests/rnnpool_reference.py, timed on a few patches and scaled to all of them",
        results=results,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(
        f"{'layer':<8} {'mode':<17} {'fast ms':>9} {'p10':>8} {'p90':>8} {'peak MiB':>9} "
        f"{'literal ms*':>12} {'x':>7}"
    )
    for name, row in results.items():
        for mode in ("forward", "forward_backward"):
            f, s, speedup = row[mode]["fast"], row[mode]["literal"], row[mode]["speedup_vs_literal"]
            print(
                f"{name:<8} {mode:<17} {f['median_ms']:>9.1f} {f['p10_ms']:>8.1f} {f['p90_ms']:>8.1f} "
                f"{f['peak_rss_growth_mib']:>9.1f} {s['extrapolated_ms']:>12.0f} {speedup:>6.0f}x"
            )
    print("* literal Algorithm 1, extrapolated from the timed patches")
    print(f"\n{'layer':<8} {'mode':<17} {'numba ms':>9} {'min':>8} {'torch ms':>9} {'min':>8}", end="")
    print(f" {'x med':>6} {'x min':>6}")
    for name, row in results.items():
        for mode in ("forward", "forward_backward"):
            paths = row[mode]["numba_vs_torch_sweep"]
            if paths is None:
                print(f"{name:<8} {mode:<17} numba not installed")
                continue
            k, t = paths["numba"], paths["torch"]
            print(
                f"{name:<8} {mode:<17} {k['median_ms']:>9.1f} {k['min_ms']:>8.1f} {t['median_ms']:>9.1f} "
                f"{t['min_ms']:>8.1f} {paths['speedup_median']:>5.2f}x {paths['speedup_min']:>5.2f}x"
            )
    print(f"FastGRNN sweep: numba kernel vs torch fallback, interleaved; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
