"""scripts/bench_step.py runs end to end on CPU and writes the figures the README describes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from script_loader import load_script as load_script_named

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_step.py"


def load_script():
    return load_script_named("bench_step")


def test_bench_step_on_cpu_writes_every_variant(tmp_path):
    bench = load_script()
    out = tmp_path / "step_cpu.json"
    bench.main(["--config", "demo", "--batch", "8", "--steps", "1", "--warmup", "0", "--device", "cpu",
                "--breakdown-steps", "1", "--out", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert set(report["variants"]) == {"plain", "grit", "grit_reference_kernels", "grit_smoothed", "grit_mafa"}
    for name, result in report["variants"].items():
        assert "error" not in result, (name, result)
        assert result["step_s_median"] > 0 and result["samples_per_s"] > 0 and result["flops_per_step"] > 0
        assert result["mfu"] is None  # no peak to compare with on a CPU
        phases = result["breakdown"]["ms_per_step"]
        assert all(phases[p] > 0 for p in ("forward", "vision", "text", "itm", "mlm", "backward", "optimizer"))
        assert phases["vision"] + phases["text"] <= phases["forward"]  # parts of the forward range
        assert (phases["bank"] > 0) == (name != "plain")  # only GRIT fills a feature bank
    # 50% MLM costs more vocabulary projections than 15%: the FLOP count sees the objectives
    assert report["variants"]["grit"]["flops_per_step"] > report["variants"]["plain"]["flops_per_step"]
    # the filter model's forward is work too
    assert report["variants"]["grit_mafa"]["flops_per_step"] > report["variants"]["grit_smoothed"]["flops_per_step"]
    assert (
        report["ratios"]["grit_mafa_vs_grit_step_time"] > 0 and report["ratios"]["grit_smoothed_vs_grit_step_time"] > 0
    )
    assert report["grouping"]["per_step_s"] > 0
    assert report["ratios"]["grit_vs_plain_step_time"] > 0
    assert "grit_with_grouping_vs_plain_step_time" in report["ratios"]
    assert report["batch"] == 8 and report["dtype"] == "float32" and report["torch"]


def test_bf16_parameters_with_fp32_master_weights():
    """--params bf16: the module in bf16 (DeepSpeed's bf16 engine), AdamW on fp32 masters; after each step every
    parameter is its master rounded to bf16, the masters moved, and no forward runs under autocast."""
    import torch

    from gritvlp.config import load_config

    bench = load_script()
    args = bench.parse_args(["--config", "demo", "--batch", "4", "--device", "cpu", "--params", "bf16"])
    cfg = load_config("demo")
    settings = bench.optimizer_settings(bench.ROOT / "ds_configs" / "zero2.json")
    run = bench.build_runner(cfg, bench.VARIANTS["grit"], args, torch.device("cpu"), torch.bfloat16, settings)
    start = [m.detach().clone() for m in run.masters.masters]
    assert not run.engine.autocast and all(p.dtype == torch.bfloat16 for p in run.engine.objective.parameters())
    assert all(m.dtype == torch.float32 for m in run.params)
    for step in range(2):
        run(step)
    assert all(torch.equal(p.detach(), m.detach().to(torch.bfloat16)) for p, m in zip(run.masters.params, run.params))
    moved = [not torch.equal(m, s) for m, s in zip(run.masters.masters, start)]
    assert sum(moved) > 0.9 * len(moved)
    run.guard.check(2)  # finite losses


def test_peak_tflops_by_device_name(monkeypatch):
    bench = load_script()
    cuda = bench.torch.device("cuda")
    for name, peak in (("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0),
                       ("NVIDIA H100 PCIe", 756.0), ("NVIDIA L40", None)):  # fmt: skip
        monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert bench.peak_tflops(cuda, None) == peak, name
    assert bench.peak_tflops(cuda, 500.0) == 500.0
    assert bench.peak_tflops(bench.torch.device("cpu"), None) is None


@pytest.mark.slow
def test_trainer_mode_writes_its_figures_beside_the_harness(tmp_path):
    """The trainer itself (DeepSpeed, loader, monitor) on the demo config, beside the grit variant; in its own
    process, since the trainer forms a process group."""
    out = tmp_path / "step.json"
    cmd = [
        sys.executable, str(SCRIPT), "--config", "demo", "--variants", "grit", "--trainer", "--batch", "8",
        "--steps", "2", "--warmup", "1", "--device", "cpu", "--breakdown-steps", "0", "--out", str(out),
        f"data.demo_dir={tmp_path / 'demo'}", "data.demo_train_samples=64", "data.demo_test_samples=16",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    result = subprocess.run(cmd, cwd=SCRIPT.parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    harness, trainer = report["variants"]["grit"], report["trainer"]
    assert "error" not in harness and "error" not in trainer, trainer
    assert trainer["steps"] == 2 and trainer["log_every"] == 1 and len(trainer["windows"]) == 3
    assert trainer["batch_per_rank"] == 8 and trainer["dtype"] == "float32"
    assert trainer["step_s_mean"] > 0 and trainer["samples_per_s"] > 0 and trainer["achieved_tflops"] > 0
    assert trainer["mfu"] is None  # no peak known for a CPU
    assert 0 < trainer["data_wait_s"] < trainer["step_s_mean"] and 0 < trainer["data_wait_share"] < 1
    # Counted inside DeepSpeed's engine, the same model's step is the harness's work (the captions' padded widths
    # differ); a count that missed the backward would be a third of it.
    assert 0.8 < trainer["flops_per_step"] / harness["flops_per_step"] < 1.25
    assert "trainer (float32" in result.stdout
