#!/usr/bin/env bash
# The GPU check in one command, for a CUDA machine without internet: the compiled kernels against the reference,
# then the kernel, grouping and whole-step benchmarks, then the device-side image decode (nvJPEG, its tests and
# scripts/bench_data.py --part device-decode). Each stage has its own time limit and a failing stage does
# not stop the others; logs and JSON results land in $OUT as they come, a summary line per stage last.
#
#   OUT=gpu_check_out bash scripts/gpu_check.sh
#   bash scripts/gpu_check.sh --dry-run          # or GPU_CHECK_DRY_RUN=1: every stage on CPU, see below
#
# Packages the machine lacks (liger-kernel for the LM comparison) are installed from wheels in .whl/ when present.
# Stage limits (seconds) can be changed with T_TESTS, T_ITC, T_LM, T_STEP, T_GROUPING,
# T_STEP_COMPILED (the step with every transformer block compiled, train.compile=true), T_DECODE_TESTS, T_DECODE,
# T_LM_ACCURACY (the LM loss's gradient error with its weight gradient summed in fp32 and in bf16), T_STEP_BF16 (the
# step with bf16 parameters and fp32 master weights, as DeepSpeed's bf16 engine runs it, against the step stage's
# fp32 parameters under autocast), T_OPTIMIZER (one AdamW step: torch's fused against DeepSpeed's FusedAdam).
#
# The dry run runs the same stages on CPU (CUDA hidden), so that a stage an API change broke fails before the GPU
# run: the smallest shapes and steps, the fused kernels through the Triton interpreter (the benchmarks' tiny
# shapes; elsewhere the reference kernels, as on any CPU), torch.compile with the aot_eager backend (the blocks
# are captured as on the GPU, without minutes of C++ code generation), and the CUDA test file collected (its tests
# skip). Outputs go to a new temporary folder unless OUT is set; it exits non-zero when a stage fails or a JSON
# result records an error.
set -u
cd "$(dirname "$0")/.."
DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
case "${1:-}" in
--dry-run) DRY_RUN=1 ;;
"") ;;
*) echo "usage: [OUT=folder] bash scripts/gpu_check.sh [--dry-run]" >&2 && exit 2 ;;
esac

if [ "$DRY_RUN" = 1 ]; then
    OUT="${OUT:-$(mktemp -d -t gpu_check_dry_run.XXXXXX)}"
    export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
    : "${T_TESTS:=120}" "${T_ITC:=300}" "${T_LM:=300}" "${T_GROUPING:=120}" "${T_STEP:=300}" "${T_STEP_COMPILED:=600}"
    : "${T_DECODE_TESTS:=240}" "${T_DECODE:=120}" "${T_LM_ACCURACY:=300}" "${T_STEP_BF16:=300}" "${T_OPTIMIZER:=120}"
    DEV=cpu
    KERNELS=(--skip-compile --quick --reps 1 --warmup 0)
    GROUPING=(--device cpu --bank 1920 --search-space 480 --batch-size 32 --reference-spaces 1 --repeats 1)
    STEP=(--config demo --batch 8 --device cpu --steps 1 --warmup 0 --breakdown-steps 1)
    STEP_COMPILED=(--config demo --batch 8 --device cpu --steps 1 --warmup 1)
    DECODE=(--sizes 320x240 --samples 8 --rounds 1 --decode-batch 8)
    LM_ACCURACY=(--rows 300 --vocab 1000 --hidden 32)
    OPTIMIZER=(--params 1e6 --reps 2 --warmup 1)
    # python3 running the script named after it, with torch.compile's backend set to aot_eager
    COMPILING=(python3 -c 'import functools, runpy, sys, torch
torch.compile = functools.partial(torch.compile, backend="aot_eager")
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")')
else
    OUT="${OUT:-gpu_check_out}"
    export TRITON_INTERPRET=0
    DEV=cuda
    KERNELS=(--skip-compile)
    GROUPING=(--device cuda --large --reference-spaces 5 --repeats 2)
    STEP=(--steps 10 --warmup 3)
    STEP_COMPILED=(--steps 10 --warmup 4)
    DECODE=(--samples 64 --rounds 3)
    LM_ACCURACY=()
    OPTIMIZER=()
    COMPILING=(python3)
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gritvlp_wheels .whl/*.whl &&
        export PYTHONPATH="/tmp/gritvlp_wheels:${PYTHONPATH:-}"
fi
# Run from the source tree when the package is not installed: gritvlp.kernels is the top-level kernels/ folder.
if ! python3 -c "import gritvlp.kernels" 2>/dev/null; then
    [ -e gritvlp/kernels ] || ln -s ../kernels gritvlp/kernels
    export PYTHONPATH="$PWD:${PYTHONPATH:-}"
fi

FAILED=""
stage() {
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name (limit ${limit} s)"
    start=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    [ "$rc" -eq 0 ] || FAILED="$FAILED $name"
    echo "$name: exit $rc after $(($(date +%s) - start)) s" | tee -a "$OUT/summary.txt"
    tail -n "${TAIL:-14}" "$OUT/$name.log"
}

{
    if [ "$DRY_RUN" = 1 ]; then
        echo "dry run on CPU: $(uname -m), $(nproc --all) cores, output in $OUT"
    else
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    fi
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stage tests "${T_TESTS:-75}" python3 -m pytest -q -p no:cacheprovider --durations=5 tests/test_kernels_cuda.py \
    tests/test_fused_attention.py
stage itc "${T_ITC:-45}" python3 scripts/bench_kernels.py --only itc "${KERNELS[@]}" --out "$OUT/kernels_itc_$DEV.json"
stage lm "${T_LM:-30}" python3 scripts/bench_kernels.py --only lm "${KERNELS[@]}" --out "$OUT/kernels_lm_$DEV.json"
stage lm_accuracy "${T_LM_ACCURACY:-60}" python3 scripts/lm_grad_accuracy.py "${LM_ACCURACY[@]}" \
    --out "$OUT/lm_grad_accuracy_$DEV.json"
stage optimizer "${T_OPTIMIZER:-60}" python3 scripts/bench_optimizer.py "${OPTIMIZER[@]}" --out "$OUT/optimizer_$DEV.json"
stage grouping "${T_GROUPING:-30}" python3 scripts/bench_grouping.py "${GROUPING[@]}" --out "$OUT/grouping_$DEV.json"
stage step "${T_STEP:-60}" python3 scripts/bench_step.py "${STEP[@]}" --sync-check-steps 2 \
    --profile "$OUT/step_profile.txt" --out "$OUT/step_$DEV.json"
stage step_bf16_params "${T_STEP_BF16:-60}" python3 scripts/bench_step.py --params bf16 --variants plain,grit \
    "${STEP[@]}" --sync-check-steps 0 --breakdown-steps 0 --out "$OUT/step_${DEV}_bf16_params.json"
stage step_compiled "${T_STEP_COMPILED:-240}" "${COMPILING[@]}" scripts/bench_step.py --compile --variants plain,grit \
    "${STEP_COMPILED[@]}" --sync-check-steps 0 --breakdown-steps 0 --out "$OUT/step_${DEV}_compiled.json"
stage decode_tests "${T_DECODE_TESTS:-120}" python3 -m pytest -q -p no:cacheprovider -rs tests/test_device_images.py
stage data_decode "${T_DECODE:-300}" python3 scripts/bench_data.py --part device-decode "${DECODE[@]}" \
    --out "$OUT/data_decode_$DEV.json"

if [ "$DRY_RUN" = 1 ]; then
    # a benchmark records a failing implementation or variant as {"error": ...} and goes on: count those too
    stage results 60 python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path

def errors(node, where):
    if isinstance(node, dict):
        if "error" in node:
            yield f"{where}: {node['error']}"
        for key, value in node.items():
            yield from errors(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from errors(value, f"{where}[{i}]")

found = [e for path in sorted(Path(sys.argv[1]).glob("*.json")) for e in errors(json.loads(path.read_text()), path.name)]
print("\n".join(found) or "no errors recorded in the JSON results")
sys.exit(1 if found else 0)
PY
fi
echo "== summary"
cat "$OUT/summary.txt"
if [ "$DRY_RUN" = 1 ]; then
    [ -z "$FAILED" ] || { echo "dry run: failed stages:$FAILED ($OUT)" >&2 && exit 1; }
    echo "dry run: every stage passed ($OUT)"
fi
