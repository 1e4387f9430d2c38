"""Shared by the benchmark scripts: interleaved timing, and the end (JSON report, summary, exit status)."""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from leanvision.bench import interleaved_ms

__all__ = ["finish", "interleaved_ms", "paired_speedup"]


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
