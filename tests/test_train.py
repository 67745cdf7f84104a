"""End to end on CPU through the deepspeed launcher: ZeRO-2 on 2 processes, exact resume, fp16 export."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SMALL_RUN = [
    "data.demo_train_samples=64",
    "data.demo_test_samples=16",
    "data.num_workers=1",
    "train.max_steps=6",
    "train.save_every=3",
    "train.log_every=1",
    "train.warmup_steps=2",
    "train.keep_checkpoints=5",
    # GRIT: banks of 16 per rank, gathered (32) and grouped every 2 steps: a flush lands mid-epoch.
    "sampling.bank_size=16",
    "sampling.search_space=16",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ds_config(tmp: Path, stage: int) -> Path:
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    config["train_micro_batch_size_per_gpu"] = 8
    config["zero_optimization"] = {"stage": stage}
    path = tmp / f"zero{stage}.json"
    path.write_text(json.dumps(config))
    return path


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def pretrain_cmd(out: Path, ds: Path, procs: int, *extra: str) -> list[str]:
    return [
        "deepspeed", "--num_gpus", str(procs), "--master_port", str(free_port()),
        "scripts/pretrain.py", "--deepspeed_config", str(ds), "--output_dir", str(out),
        f"data.demo_dir={out.parent / 'demo'}", *SMALL_RUN, *extra,
    ]  # fmt: skip


def pretrain(out: Path, ds: Path, procs: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = pretrain_cmd(out, ds, procs, *extra)
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"pretrain failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert shared_memory_segments(cmd) == []  # a finished run leaves no all-reduce segment in /dev/shm (memory)
    return result


def shared_memory_segments(cmd: list[str]) -> list[Path]:
    """DeepSpeed's CPU all-reduce segments of the run `cmd` launched (named after its master port)."""
    port = cmd[cmd.index("--master_port") + 1]
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def losses(run: Path) -> dict[int, dict]:
    merged: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        merged.setdefault(row["step"], {}).update(row)  # epoch-end scalars share a step with the losses
    return merged


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero2")
    ds = ds_config(tmp, 2)
    pretrain(tmp / "full", ds, 2, "train.peak_tflops=1")  # a peak to compute perf/mfu against on a CPU
    return tmp, ds


def test_two_process_zero2_run_logs_every_term(zero2_run):
    tmp, _ = zero2_run
    run = tmp / "full"
    metrics = losses(run)
    assert sorted(metrics) == [1, 2, 3, 4, 5, 6]
    for key in ("loss/total", "loss/itc", "loss/consistency", "loss/itm", "loss/mlm", "train/itm_acc",
                "train/temp", "train/lr", "train/grad_norm", "perf/samples_per_s", "perf/step_time_s",
                "perf/tflops", "perf/mfu", "perf/data_wait_s"):  # fmt: skip
        assert all(torch.isfinite(torch.tensor(m[key])) for m in metrics.values()), key
    for m in metrics.values():
        assert m["perf/tflops"] > 0 and m["perf/mfu"] == pytest.approx(m["perf/tflops"])  # train.peak_tflops=1
        assert 0 < m["perf/data_wait_s"] < m["perf/step_time_s"]
    assert metrics[1]["train/lr"] < metrics[2]["train/lr"]  # warm-up
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    tags = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["global_step3", "global_step6"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "global_step6"
    assert (run / "export_fp16" / "model.safetensors").is_file()
    # zero-shot retrieval on the demo's held-out split: after epoch 0 (step 4) and on the final model (step 6)
    evaluated = {step: m for step, m in metrics.items() if "eval/r_mean" in m}
    assert sorted(evaluated) == [4, 6]
    for m in evaluated.values():
        assert 0 <= m["eval/txt_r1"] <= m["eval/txt_r5"] <= m["eval/txt_r10"] <= 100
        assert m["eval/best_r_mean"] >= m["eval/r_mean"] and "eval/hard_itm_colour" in m
        for attribute in ("shape", "colour", "size"):  # zero-shot classification of single-object test images
            assert 0 <= m[f"eval/zs_{attribute}_top1"] <= 100 and 0 <= m[f"eval/zs_{attribute}_mean_recall"] <= 100


def test_killed_run_resumes_exactly(zero2_run):
    """The same run, killed (SIGKILL, whole process group) once its first checkpoint exists, then resumed."""
    tmp, ds = zero2_run
    run = tmp / "killed"
    cmd = pretrain_cmd(run, ds, 2)
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )  # fmt: skip
    latest, deadline = run / "checkpoints" / "latest", time.time() + 600
    while not latest.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    leaked = shared_memory_segments(cmd)  # a killed run cannot remove its ranks' segments: they exist, one per rank
    assert len(leaked) == 2
    for segment in leaked:
        segment.unlink()
    assert latest.read_text().strip() == "global_step3"  # killed mid-epoch 0 (4 steps per epoch)
    pretrain(run, ds, 2, "--resume", "latest")
    full, resumed = losses(tmp / "full"), losses(run)
    for step in (4, 5, 6):  # the resume crosses into epoch 1, which runs in the grouped order
        for key in ("loss/total", "loss/itc", "loss/itm", "loss/mlm"):
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-6), (step, key)
    # Epoch 1 ran in the grouped batches built from epoch 0's features, half of them restored from the banks;
    # each rank's batches are in its own state file, and together they are every sample once.
    epoch1 = []
    for rank in range(2):
        samplers = [rank_state(r / "checkpoints" / "global_step6", rank)["sampler"] for r in (tmp / "full", run)]
        assert samplers[0]["epoch"] == 1 and samplers[0]["batches"] is not None
        assert torch.equal(samplers[0]["batches"]["samples"], samplers[1]["batches"]["samples"])
        epoch1 += samplers[0]["batches"]["samples"].tolist()
    assert sorted(epoch1) == list(range(64))


def rank_state(tag: Path, rank: int) -> dict:
    return torch.load(tag / f"gritvlp_rank{rank:05d}.pt", map_location="cpu", weights_only=False)


def test_grit_epoch_is_grouped_and_logged(zero2_run):
    tmp, _ = zero2_run
    metrics = losses(tmp / "full")
    epoch_end = [m for m in metrics.values() if "grit/grouping_time_s" in m]
    assert len(epoch_end) == 1 and epoch_end[0]["grit/grouping_time_s"] > 0
    for m in metrics.values():
        assert -1 <= m["similarity/neg"] <= 1 and -1 <= m["similarity/itm_neg"] <= 1
    assert (tmp / "full" / "checkpoints" / "global_step3" / "gritvlp_rank00001.pt").is_file()


def check_export_matches(checkpoint: Path, out: Path):
    from gritvlp.export import export_fp16, fp32_state_dict
    from gritvlp.model.gritvlp import GritVLP

    export_fp16(checkpoint, out)
    weights, model_config = fp32_state_dict(checkpoint)
    reference = GritVLP.from_config_dict(model_config).eval()
    reference.load_state_dict(weights)
    loaded = GritVLP.from_pretrained(out).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 64, 64, generator=g)
    ids = torch.tensor([[101, 1037, 2417, 4418, 102]] * 3)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        for model_out, ref_out in zip(
            (loaded.encode_image(images)[1], loaded.encode_text(ids, mask)[1]),
            (reference.encode_image(images)[1], reference.encode_text(ids, mask)[1]),
        ):
            torch.testing.assert_close(model_out, ref_out, rtol=0, atol=1e-2)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_export_zero2_then_from_pretrained(zero2_run, tmp_path):
    tmp, _ = zero2_run
    check_export_matches(tmp / "full" / "checkpoints", tmp_path / "export")


@pytest.mark.parametrize("stage", [1, 3])
def test_export_zero_stage_1_and_3(stage, tmp_path):
    ds = ds_config(tmp_path, stage)
    pretrain(tmp_path / "run", ds, 1, "train.max_steps=2", "train.export_fp16=false")
    check_export_matches(tmp_path / "run" / "checkpoints" / "global_step2", tmp_path / "export")
    for m in losses(tmp_path / "run").values():  # no peak known for a CPU: throughput without MFU
        assert m["perf/tflops"] > 0 and "perf/mfu" not in m


def test_fp16_overflow_is_a_clear_error():
    from gritvlp.export import to_fp16

    with pytest.raises(ValueError, match="'vision_proj.weight' has a value of magnitude 1e\\+05"):
        to_fp16({"temp": torch.tensor([0.07]), "vision_proj.weight": torch.tensor([1.0, 1e5])})
    assert to_fp16({"w": torch.tensor([1.0, -2.0])})["w"].dtype == torch.float16


def test_bad_config_key_fails_before_training(tmp_path):
    cmd = [
        sys.executable,
        "scripts/pretrain.py",
        "--deepspeed_config",
        "ds_configs/zero2.json",
        "objectives.mask_rate=0.3",
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "unknown config key 'objectives.mask_rate'" in result.stderr
