"""The repository's kernels/ folder is gritvlp.kernels; imported as a top-level `kernels` (the repository root on
sys.path, as under `python -m pytest` there) it hands the name to the installed PyPI package of that name (Hugging
Face's, which transformers imports when it is installed) instead of shadowing it."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(code: str, *extra_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *map(str, extra_path)])}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)


def test_top_level_import_gets_the_installed_package(tmp_path):
    package = tmp_path / "site" / "kernels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("MARKER = 'installed'\nclass CUDAProperties:\n    pass\n")
    (package / "layers.py").write_text("LAYER = 1\n")
    result = run(
        "import kernels, kernels.layers; from kernels import CUDAProperties; import gritvlp.kernels as g; "
        "print(kernels.MARKER, kernels.layers.LAYER, g.lm_loss.__module__)",
        tmp_path / "site",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["installed", "1", "gritvlp.kernels.dispatch"]


def test_the_top_level_name_never_resolves_to_this_folder():
    """Whatever is installed: the installed package (transformers depends on one since 5.25), or an empty namespace."""
    result = run("import kernels; print(getattr(kernels, '__file__', None))")
    assert result.returncode == 0, result.stderr
    assert not result.stdout.strip().startswith(str(ROOT / "kernels")), result.stdout


def test_without_an_installed_package_the_name_is_an_empty_namespace():
    """`python -S`: no site-packages, so certainly no installed `kernels`; the name then is what a folder without
    __init__.py gives, which is how libraries that probe for the package recognise "not installed"."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = (
        "import importlib.util, kernels\n"
        "assert getattr(kernels, '__file__', None) is None and not hasattr(kernels, 'lm_loss'), vars(kernels)\n"
        "try:\n    import kernels.itc\nexcept ModuleNotFoundError:\n    print('no submodules')\n"
    )
    result = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "no submodules"


def test_transformers_models_import_with_the_repository_root_on_the_path():
    """transformers probes for `kernels` when it imports a model: find_spec finds this folder first, then it asks for
    the distribution's version and, failing that, imports the module; neither may break the model import."""
    result = run("from transformers import BertModel; print(BertModel.__name__)")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["BertModel"]


def test_gritvlp_kernels_binds_the_functions_not_the_submodules():
    import gritvlp.kernels as kernels

    assert callable(kernels.lm_loss) and callable(kernels.itc_terms)
    assert sys.modules["gritvlp.kernels.lm_loss"].lm_loss is not kernels.lm_loss  # the fused module's own entry
