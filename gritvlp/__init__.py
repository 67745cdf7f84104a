"""gritvlp: vision-language pre-training (GRIT-VLP, DiHT) on DeepSpeed with fused Triton kernels.

    from gritvlp import GritVLP, load_config
    model = GritVLP.from_pretrained("runs/demo/export_fp16")

The names below are imported on first use, so `import gritvlp` stays light (no torch import) for CLI start-up.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "GritVLP": "gritvlp.model.gritvlp",
    "PretrainingObjective": "gritvlp.objectives.pretraining",
    "Config": "gritvlp.config",
    "load_config": "gritvlp.config",
    "export_fp16": "gritvlp.export",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'gritvlp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
