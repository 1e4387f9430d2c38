"""The end of every benchmark script: write the JSON report, print the summary, fail on wrong outputs."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path


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
