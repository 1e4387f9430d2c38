"""leanvision: build, measure and slim vision networks for tight compute and memory budgets.

The top-level names are imported lazily so `import leanvision` (and the CLI's start-up) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "create_model": "leanvision.models.registry",
    "list_models": "leanvision.models.registry",
    "get_model_config": "leanvision.models.registry",
    "load_checkpoint": "leanvision.models.weights",
    "save_checkpoint": "leanvision.models.weights",
    "profile": "leanvision.analysis.cost",
    "peak_memory": "leanvision.analysis.memory",
    "measure_peak": "leanvision.analysis.measured",
    "recompute_cost": "leanvision.analysis.recompute",
    "benchmark": "leanvision.bench",
    "fuse_for_inference": "leanvision.deploy",
    "stream": "leanvision.deploy.streaming",
}

__all__ = [
    "benchmark",
    "create_model",
    "fuse_for_inference",
    "get_model_config",
    "list_models",
    "load_checkpoint",
    "measure_peak",
    "peak_memory",
    "profile",
    "recompute_cost",
    "save_checkpoint",
    "stream",
]

if TYPE_CHECKING:
    from leanvision.analysis.cost import profile
    from leanvision.analysis.measured import measure_peak
    from leanvision.analysis.memory import peak_memory
    from leanvision.analysis.recompute import recompute_cost
    from leanvision.bench import benchmark
    from leanvision.deploy import fuse_for_inference
    from leanvision.deploy.streaming import stream
    from leanvision.models.registry import create_model, get_model_config, list_models
    from leanvision.models.weights import load_checkpoint, save_checkpoint


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'leanvision' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
