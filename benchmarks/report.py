"""Shared by the benchmark scripts: interleaved timing, and the end (JSON report, summary, exit status)."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path


def interleaved_ms(
    calls: dict[str, Callable[[], object]], min_rounds: int, seconds: float
) -> dict[str, list]:
    """Milliseconds per call of each candidate, over rounds that run every candidate once in a rotating
    order (so a noisy machine's slow spells hit all alike): at least `min_rounds` rounds and `seconds`."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    start, rounds = time.perf_counter(), 0
    while rounds < min_rounds or time.perf_counter() - start < seconds:
        for name in names[rounds % len(names) :] + names[: rounds % len(names)]:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return times


def paired_speedup(base_ms: list[float], candidate_ms: list[float]) -> float:
    """Median over rounds of base / candidate time (each pair ran back to back in one round)."""
    return statistics.median(b / c for b, c in zip(base_ms, candidate_ms))


def finish(
    out: Path, report: dict, print_summary: Callable[[], None], outputs_match: bool, error: str
) -> int:
    """Write `report` to `out`, print the summary; exit status 1 (with `error`) when outputs differ."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print_summary()
    print(f"wrote {out}")
    if not outputs_match:
        print(f"ERROR: {error}", file=sys.stderr)
        return 1
    return 0
