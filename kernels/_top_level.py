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
    one, an empty namespace package (no __file__, nothing to import from it)."""
    path = [entry for entry in sys.path if Path(entry or ".").resolve() != REPOSITORY]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    sys.modules.pop(__name__, None)  # this module is not part of the package taking over the name
    if spec is None:
        # Nothing installed: the name becomes what a folder without __init__.py would be, an empty namespace package.
        # Libraries that probe for an installed `kernels` (transformers does, when it imports any model) take a
        # namespace package for "not installed"; an import error would instead break their import.
        spec = importlib.machinery.ModuleSpec("kernels", None, is_package=True)
        spec.submodule_search_locations = []
        sys.modules["kernels"] = importlib.util.module_from_spec(spec)
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)
