"""scripts/gpu_run.py, the GPU run of the real training command, dry-run on CPU: every stage on the current API, so
that the next GPU run does not spend its minutes on a broken stage."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from script_loader import load_script as load_script_named

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_run.py"


def load_script():
    return load_script_named("gpu_run")


def test_ratios_need_both_stages_to_have_run():
    gpu_run = load_script()
    stages = {"plain": {"ok": True, "step_s_mean": 0.2}, "grit": {"ok": True, "step_s_mean": 0.21},
              "grit_compiled": {"ok": False, "error": "x"}}  # fmt: skip
    assert gpu_run.ratios(stages) == {"grit_vs_plain_step_time": pytest.approx(1.05)}


def test_unknown_stage_is_refused():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--stages", "demo,warp"], capture_output=True,
                          text=True, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2 and "unknown stages ['warp']" in proc.stderr


@pytest.mark.slow
def test_dry_run_runs_every_stage(tmp_path):
    """The compiled stage is left out: on CPU it would spend minutes in C++ code generation (the GPU check's dry run
    covers compiling the blocks through bench_step with the aot_eager backend)."""
    out = tmp_path / "gpu_run"
    stages = "demo,resume,shards,plain,grit,grit_device_decode"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--stages", stages],
                          capture_output=True, text=True, cwd=ROOT, timeout=2400)  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert proc.returncode == 0, (proc.stdout[-4000:], json.dumps(summary)[-4000:])
    results = summary["stages"]
    assert list(results) == stages.split(",") and all(r["ok"] for r in results.values())
    demo = results["demo"]
    assert demo["steps"] == 4 and demo["checkpoints"] and "config.json" in " ".join(demo["export_files"])
    assert 0 <= demo["final_mean_r1"] <= 100
    resume = results["resume"]
    assert resume["killed_after_checkpoint_step"] == 3
    assert sorted(map(int, resume["losses_after_resume"])) == [4, 5, 6]
    assert resume["max_relative_loss_difference"] < 1e-4  # CPU, fp32: the resumed run repeats the uninterrupted one
    assert resume["export_loads_on_cpu"], resume["export_check_output"]
    for name in ("plain", "grit", "grit_device_decode"):
        trainer = results[name]
        assert trainer["samples_per_s"] > 0 and trainer["flops_per_step"] > 0, (name, trainer)
        assert 0 <= trainer["data_wait_share"] <= 1
    assert set(summary["ratios"]) == {"grit_vs_plain_step_time", "device_decode_vs_cpu_decode_step_time"}
