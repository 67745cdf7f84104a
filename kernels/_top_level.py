"""The name `kernels` for the installed PyPI package of that name, when this folder is imported under it by accident.

This folder is installed as gritvlp.kernels. From the repository root (on sys.path under `python -m`), `import
kernels` finds it first and would shadow Hugging Face's `kernels`, which transformers imports when it is installed.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def hand_over_to_installed_package() -> None:
    """Loads the installed `kernels` into sys.modules["kernels"], which the import statement then returns; without
    one, `import kernels` fails as it would without this folder."""
    path = [entry for entry in sys.path if Path(entry or ".").resolve() != REPOSITORY]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    sys.modules.pop(__name__, None)  # this module is not part of the package taking over the name
    if spec is None:
        sys.modules.pop("kernels", None)
        raise ModuleNotFoundError(
            "No module named 'kernels' (the repository's kernels/ folder is gritvlp.kernels)", name="kernels"
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)
