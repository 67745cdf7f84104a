#!/usr/bin/env bash
# The GPU check in one command, for a CUDA machine without internet: the compiled kernels against the reference,
# then the kernel, grouping and whole-step benchmarks. Each stage has its own time limit and a failing stage does
# not stop the others; logs and JSON results land in $OUT as they come, a summary line per stage last.
#
#   OUT=gpu_check_out bash scripts/gpu_check.sh
#
# Packages the machine lacks (liger-kernel for the LM comparison) are installed from wheels in .whl/ when present.
# Stage limits (seconds) can be changed with T_TESTS, T_ITC, T_LM, T_STEP, T_GROUPING,
# T_STEP_COMPILED (the step with every transformer block compiled, train.compile=true).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 TOKENIZERS_PARALLELISM=false

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gritvlp_wheels .whl/*.whl &&
        export PYTHONPATH="/tmp/gritvlp_wheels:${PYTHONPATH:-}"
fi
# Run from the source tree when the package is not installed: gritvlp.kernels is the top-level kernels/ folder.
if ! python3 -c "import gritvlp.kernels" 2>/dev/null; then
    [ -e gritvlp/kernels ] || ln -s ../kernels gritvlp/kernels
    export PYTHONPATH="$PWD:${PYTHONPATH:-}"
fi

stage() {
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name (limit ${limit} s)"
    start=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc after $(($(date +%s) - start)) s" | tee -a "$OUT/summary.txt"
    tail -n "${TAIL:-14}" "$OUT/$name.log"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stage tests "${T_TESTS:-75}" python3 -m pytest -q -p no:cacheprovider --durations=5 tests/test_kernels_cuda.py
stage itc "${T_ITC:-45}" python3 scripts/bench_kernels.py --only itc --skip-compile --out "$OUT/kernels_itc_cuda.json"
stage lm "${T_LM:-30}" python3 scripts/bench_kernels.py --only lm --skip-compile --out "$OUT/kernels_lm_cuda.json"
stage grouping "${T_GROUPING:-30}" python3 scripts/bench_grouping.py --device cuda --large --reference-spaces 5 \
    --repeats 2 --out "$OUT/grouping_cuda.json"
stage step "${T_STEP:-60}" python3 scripts/bench_step.py --steps 10 --warmup 3 --sync-check-steps 2 \
    --profile "$OUT/step_profile.txt" --out "$OUT/step_cuda.json"
stage step_compiled "${T_STEP_COMPILED:-240}" python3 scripts/bench_step.py --compile --variants plain,grit --steps 10 \
    --warmup 4 --sync-check-steps 0 --breakdown-steps 0 --out "$OUT/step_cuda_compiled.json"
echo "== summary"
cat "$OUT/summary.txt"
