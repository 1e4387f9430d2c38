"""JSON state files of resumable experiments: written atomically, refused when made with other settings."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from leanvision.errors import CheckpointError, InvalidArgumentError, first_line


def write_json_atomic(data: Any, path: Path) -> None:
    """Write JSON to a temporary file in the same folder, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def load_state(path: Path, settings: dict[str, Any], fresh: dict[str, Any]) -> dict[str, Any]:
    """The state at `path`, or `{"settings": settings, **fresh}` when there is none; a state made with other
    settings raises a ValueError naming them."""
    if not path.is_file():
        return {"settings": settings, **fresh}
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{path} is not a JSON state file ({first_line(err)}); remove it to start over, or pass "
            "another --out"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} holds a JSON {type(state).__name__}, not this experiment's state object; remove it to "
            "start over, or pass another --out"
        )
    saved = state.get("settings", {})
    if saved != settings:
        changed = sorted(k for k in settings.keys() | saved.keys() if saved.get(k) != settings.get(k))
        raise InvalidArgumentError(
            f"{path} was made with other settings ({', '.join(changed)} differ); run with the same settings "
            "to continue it, or pass another --out"
        )
    return state
