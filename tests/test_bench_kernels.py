"""scripts/bench_kernels.py on CPU (the reference; the fused kernels through the Triton interpreter at tiny shapes)
and the CPU dry run of scripts/gpu_check.sh, which runs every stage of the GPU check on the current API."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from script_loader import load_script as load_script_named

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_kernels.py"
STAGES = [
    "tests",
    "itc",
    "lm",
    "lm_accuracy",
    "optimizer",
    "grouping",
    "step",
    "step_bf16_params",
    "step_compiled",
    "decode_tests",
    "data_decode",
    "results",
]


def load_script():
    return load_script_named("bench_kernels")


def run(argv, timeout, **env):
    proc = subprocess.run(argv, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return proc


def assert_measured(row, impls):
    """Every implementation ran and has finite, positive timings; fused and compiled ones have their ratios."""
    assert set(row["results"]) == set(impls), row
    for name, result in row["results"].items():
        assert "error" not in result, (row["shape"], name, result)
        for key in ("fwd_ms", "fwd_bwd_ms", "first_call_s"):
            assert math.isfinite(result[key]) and result[key] >= 0, (row["shape"], name, key, result)
        assert result["fwd_ms"] > 0 and result["fwd_bwd_ms"] > 0
        if name != "compile":  # compiled code allocates outside the dispatcher: no CPU peak
            assert math.isfinite(result["peak_mib"]) and result["peak_mib"] >= 0
    for name in set(impls) - {"eager"}:
        ratios = row["ratios"][name]
        assert math.isfinite(ratios["fwd_speedup"]) and math.isfinite(ratios["fwd_bwd_speedup"])


def test_quick_benchmark_writes_itc_and_lm_rows(tmp_path):
    bench = load_script()
    out = tmp_path / "kernels.json"
    run([sys.executable, str(SCRIPT), "--quick", "--reps", "1", "--warmup", "0", "--skip-compile", "--out", str(out)],
        timeout=600, TRITON_INTERPRET="1")  # fmt: skip
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["quick"] and report["reps"] == 1
    assert report["fused_ran"] is False and report["fused_interpreted"] is True
    suites = {"itc": (bench.INTERPRETED_ITC, bench.QUICK_ITC), "lm": (bench.INTERPRETED_LM, bench.QUICK_LM)}
    for suite, (tiny, quick) in suites.items():
        rows = report[suite]
        assert [row["shape"] for row in rows] == tiny + quick
        fused = {"fused"} | ({"fused_bf16_sum"} if suite == "lm" else set())
        for row in rows[: len(tiny)]:  # the fused kernels run interpreted at the tiny shapes only
            assert_measured(row, {"eager"} | fused)
        for row in rows[len(tiny) :]:
            assert_measured(row, {"eager"})
    # the ITC kernels' autotuners are read under the interpreter too: a renamed kernel fails here
    assert set(report["autotuned"]) == {"fwd", "merge", "dq", "dk"} and all(report["autotuned"].values())


def test_compiled_reference_runs(tmp_path, monkeypatch):
    """torch.compile of the reference losses (left out of the dry run, as of the GPU check), at tiny shapes."""
    bench = load_script()
    monkeypatch.setattr(bench, "QUICK_ITC", [bench.itc_case(16, 32, 32, stop_grad_keys=False)])
    monkeypatch.setattr(bench, "QUICK_LM", [bench.lm_case(16, 64, 32)])
    monkeypatch.setattr(bench, "INTERPRETED_ITC", [])
    monkeypatch.setattr(bench, "INTERPRETED_LM", [])
    out = tmp_path / "kernels.json"
    bench.main(["--quick", "--reps", "1", "--warmup", "0", "--out", str(out)])
    report = json.loads(out.read_text())
    for suite in ("itc", "lm"):
        assert len(report[suite]) == 1
        assert_measured(report[suite][0], {"eager", "compile"})


def test_gpu_check_rejects_unknown_arguments():
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dryrun"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_stage(tmp_path):
    """Every stage of the GPU check on CPU at the smallest sizes (about two minutes on two cores)."""
    out = tmp_path / "gpu_check"
    proc = run(["bash", "scripts/gpu_check.sh"], timeout=1800, GPU_CHECK_DRY_RUN="1", OUT=str(out))
    assert "dry run: every stage passed" in proc.stdout
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == STAGES
    assert all(": exit 0 after " in line for line in summary), summary
    for stage in STAGES:
        assert (out / f"{stage}.log").read_text().strip(), stage
    # the CUDA-only tests were collected and skipped themselves
    assert "skipped" in (out / "tests.log").read_text()

    def result(name):
        return json.loads((out / name).read_text())

    itc, lm = result("kernels_itc_cpu.json"), result("kernels_lm_cpu.json")
    assert itc["itc"] and not itc["lm"] and lm["lm"] and not lm["itc"]
    for row in itc["itc"] + lm["lm"]:
        assert "compile" not in row["results"]  # --skip-compile, as on the GPU
        assert all(math.isfinite(r["fwd_bwd_ms"]) for r in row["results"].values())
    assert any("fused" in row["results"] for row in itc["itc"]) and any("fused" in row["results"] for row in lm["lm"])
    accuracy = result("lm_grad_accuracy_cpu.json")["results"]
    assert set(accuracy) == {"eager_bf16", "fused_fp32_sum", "fused_bf16_sum"}
    assert all(0 < r["grad_weight"]["relative_frobenius"] < 0.05 for r in accuracy.values()), accuracy
    assert result("grouping_cpu.json")["results"][0]["ours_s"] > 0
    step = result("step_cpu.json")
    assert set(step["variants"]) == {"plain", "grit", "grit_reference_kernels", "grit_smoothed", "grit_mafa"}
    assert all(v["step_s_median"] > 0 for v in step["variants"].values())
    assert (out / "step_profile_grit.txt").read_text()
    compiled = result("step_cpu_compiled.json")
    assert compiled["compile"] is True and set(compiled["variants"]) == {"plain", "grit"}
    assert all(v["step_s_median"] > 0 for v in compiled["variants"].values())
    decode = result("data_decode_cpu.json")["device_decode"]
    assert decode["device"] == "cpu" and decode["results"][0]["device_samples_per_s"] > 0
    assert "skipped" in (out / "decode_tests.log").read_text()  # the nvJPEG test, without CUDA
