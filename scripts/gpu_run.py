"""The real training command on a GPU, end to end, as stages with their own time limits (for a CUDA machine without
internet): every log and JSON lands in --out as it comes, with summary.json rewritten after each stage.

    bash scripts/gpu_wheels.sh                                   # here, with PyPI: the packages the GPU machine lacks
    python3 scripts/gpu_run.py --out gpu_run_out                 # there: every stage (estimated 9-11 min on an H100)
    python3 scripts/gpu_run.py --out gpu_run_out --stages demo,resume
    python3 scripts/gpu_run.py --dry-run                         # CPU, smallest sizes, the demo config (the tests)

Stages:
  demo         the README's demo command, `deepspeed scripts/pretrain.py --deepspeed_config ds_configs/zero2.json`,
               writing to a fresh folder (--output_dir): it trains (bf16, fused kernels), evaluates after each epoch,
               checkpoints and exports; its final mean R@1, time and throughput.
  resume       the demo config for 64 steps with a checkpoint every 32, twice: uninterrupted, and killed (kill -9 of
               the launcher's process group) once the checkpoint exists, then the same command with --resume latest;
               the losses of the steps after the checkpoint side by side, and the killed run's export loaded on CPU
               (no GPU visible) and run on a batch.
  shards       photograph-like 640x480 JPEG shards (scripts/make_photo_shards.py) for the trainer runs.
  plain, grit, grit_compiled, grit_device_decode
               vitb16_bert through the trainer itself (scripts/bench_step.py --trainer --variants ""): the DeepSpeed
               engine of ds_configs/zero2_b128.json (bf16, ZeRO-2, 128 per GPU), the loader with the machine's cores
               on those shards, random weights: steps/s, samples/s, TFLOP/s and MFU from the trainer's own FLOP
               count, peak memory, data wait. plain is ALBEF's objective (no grouping, 15 % MLM, sampled negatives, no
               consistency); grit_compiled adds train.compile=true, grit_device_decode data.image_decode=device.
Then summary.json holds the ratios: grit/plain through the trainer, compiled/eager, device/CPU decode.

The first DeepSpeed start on a machine with nvcc compiles its FusedAdam (a minute or two, then cached): the demo's
limit allows for it. A device call runs at most 10 minutes: split the stages over two calls (demo,resume and the
rest). Wheels in .whl/ (scripts/gpu_wheels.sh) are installed into a scratch folder first. A failing stage is recorded and
the next one runs; the exit status is non-zero when one failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("demo", "resume", "shards", "plain", "grit", "grit_compiled", "grit_device_decode")
TRAINER_STAGES = {
    "plain": ["sampling.grit=false", "objectives.mask_prob=0.15", "objectives.itm_negatives=sample",
              "objectives.consistency_weight=0"],
    "grit": [],
    "grit_compiled": ["train.compile=true"],
    "grit_device_decode": ["data.image_decode=device"],
}  # fmt: skip
# Seconds per stage on the GPU (the dry run gets its own, below).
LIMITS = {"demo": 360, "resume": 240, "shards": 120, "plain": 150, "grit": 150, "grit_compiled": 300,
          "grit_device_decode": 150}  # fmt: skip
DRY_LIMITS = {"demo": 600, "resume": 900, "shards": 120, "plain": 600, "grit": 600, "grit_compiled": 900,
              "grit_device_decode": 600}  # fmt: skip
# The dry run's demo: a few steps of a small set (the tests' sizes).
DRY_DEMO = ["data.demo_train_samples=64", "data.demo_test_samples=16", "data.num_workers=1", "train.max_steps=4",
            "train.save_every=2", "train.log_every=1", "train.warmup_steps=2"]  # fmt: skip


class Run:
    """Where the stages write, the environment they run in, and what they found."""

    def __init__(self, out: Path, dry_run: bool):
        self.out, self.dry_run = out, dry_run
        self.work = Path(tempfile.mkdtemp(prefix="gpu_run_work_"))  # runs and shards: not under OUT, which comes back
        # the demo set: the README command's default folder on the GPU; the dry run's small one apart
        self.demo_data = [f"data.demo_dir={self.work / 'demo_data'}"] if dry_run else []
        self.env = prepared_environment(dry_run)
        self.summary = {"dry_run": dry_run, "stages": {}, "environment": environment(self.env)}

    def save(self) -> None:
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")

    def command(self, name: str, argv: list[str], limit: float, **popen) -> subprocess.CompletedProcess:
        """argv in the repository, logged to OUT/name.log (appended), killed with its process group at `limit`."""
        with open(self.out / f"{name}.log", "a") as log:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            proc = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, **popen)  # fmt: skip
            try:
                proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise TimeoutError(f"{name}: {' '.join(argv[:4])} ... ran past {limit:.0f} s") from None
        if proc.returncode:
            raise RuntimeError(f"{name}: exit {proc.returncode} (see {name}.log)")
        return subprocess.CompletedProcess(argv, proc.returncode)


def prepared_environment(dry_run: bool) -> dict:
    """Wheels from .whl/ installed into a scratch folder (not in the dry run: they are built for the GPU machine's
    Python, and this machine has the packages), gritvlp importable from the source tree, the deepspeed launcher on
    PATH; the dry run hides CUDA."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    paths = [str(ROOT)]
    wheels = [] if dry_run else sorted((ROOT / ".whl").glob("*.whl"))
    if wheels:
        target = Path(tempfile.gettempdir()) / "gritvlp_wheels"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, wheels)], check=True)  # fmt: skip
        paths.insert(0, str(target))
        env["PATH"] = f"{target / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    if not (ROOT / "gritvlp" / "kernels").exists():  # run from the source tree: gritvlp.kernels is kernels/
        probe = subprocess.run([sys.executable, "-c", "import gritvlp.kernels"], capture_output=True)
        if probe.returncode:
            (ROOT / "gritvlp" / "kernels").symlink_to("../kernels")
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if dry_run:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return env


def environment(env: dict) -> dict:
    probe = ("import json, torch; print(json.dumps({'torch': torch.__version__, 'cuda': torch.cuda.is_available(), "
             "'device': torch.cuda.get_device_name() if torch.cuda.is_available() else None, "
             "'cores': __import__('os').cpu_count()}))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, cwd=ROOT)
    info = json.loads(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else {"error": result.stderr}
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return {**info, "git_commit": commit.stdout.strip() or None}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def pretrain(output_dir: Path, *extra: str, port: int | None = None) -> list[str]:
    """The README's command (one process per GPU; --master_port so that stages never share a rendezvous)."""
    return ["deepspeed", "--master_port", str(port or free_port()), "scripts/pretrain.py", "--deepspeed_config",
            "ds_configs/zero2.json", "--output_dir", str(output_dir), *extra]  # fmt: skip


def remove_shared_memory(port: int) -> None:
    """What a killed CPU run leaves: DeepSpeed's all-reduce segments of its ranks in /dev/shm (memory)."""
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        path.unlink(missing_ok=True)


def metrics(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl merged per step (epoch-end rows share a step with the losses)."""
    merged: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        merged.setdefault(row["step"], {}).update(row)
    return merged


def mean_r1(row: dict) -> float | None:
    if "eval/txt_r1" not in row:
        return None
    return (row["eval/txt_r1"] + row["eval/img_r1"]) / 2


# -- stages --------------------------------------------------------------------------------------------------------
def stage_demo(run: Run, limit: float) -> dict:
    out = run.work / "demo"
    extra = [*run.demo_data, *DRY_DEMO] if run.dry_run else []
    start = time.monotonic()
    run.command("demo", pretrain(out, *extra), limit)
    seconds = time.monotonic() - start
    rows = metrics(out)
    evals = {step: mean_r1(row) for step, row in sorted(rows.items()) if mean_r1(row) is not None}
    rates = [row["perf/samples_per_s"] for row in rows.values() if "perf/samples_per_s" in row]
    shutil.copy(out / "metrics.jsonl", run.out / "demo_metrics.jsonl")
    export = out / "export_fp16"
    return {
        "seconds": seconds,
        "steps": max(rows),
        "mean_r1_after_each_evaluation": evals,
        "final_mean_r1": evals[max(evals)] if evals else None,
        "cpu_figure_final_mean_r1": 19.6,  # README, 2 CPU cores, fp32
        "samples_per_s_last_window": rates[-1] if rates else None,
        "checkpoints": sorted(p.name for p in (out / "checkpoints").glob("global_step*")),
        "export_files": sorted(p.name for p in export.iterdir()) if export.is_dir() else [],
    }


def stage_resume(run: Run, limit: float) -> dict:
    """Uninterrupted against killed-and-resumed, then the killed run's export on CPU."""
    steps, every = (6, 3) if run.dry_run else (64, 32)
    common = [*run.demo_data, f"train.max_steps={steps}", f"train.save_every={every}", "train.log_every=1",
              *(DRY_DEMO[:3] if run.dry_run else [])]  # fmt: skip
    started = time.monotonic()
    run.command("resume", pretrain(run.work / "uninterrupted", *common), limit)
    killed, port = run.work / "killed", free_port()
    proc = subprocess.Popen(pretrain(killed, *common, port=port), cwd=ROOT, env=run.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + limit / 2
    while not (killed / "checkpoints" / "latest").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    remove_shared_memory(port)
    killed_at = max(int(m) for m in re.findall(r"\d+", (killed / "checkpoints" / "latest").read_text()))
    remaining = max(30.0, limit - (time.monotonic() - started))
    run.command("resume", pretrain(killed, *common, "--resume", "latest"), remaining)
    reference, resumed = metrics(run.work / "uninterrupted"), metrics(killed)
    after = [s for s in sorted(resumed) if s > killed_at and "loss/total" in resumed[s] and s in reference]
    pairs = {s: (reference[s]["loss/total"], resumed[s]["loss/total"]) for s in after}
    worst = max((abs(a - b) / abs(a) for a, b in pairs.values()), default=None)
    export = killed / "export_fp16"
    check = ("import sys, torch; from gritvlp.model.gritvlp import GritVLP; m = GritVLP.from_pretrained(sys.argv[1]); "
             "s = m.config.image_size; t = torch.randint(5, 1000, (2, 8)); "
             "e, f = m.encode_image(torch.randn(2, 3, s, s)); h, g = m.encode_text(t, torch.ones_like(t)); "
             "assert torch.isfinite(f).all() and torch.isfinite(g).all(); print('export loads and runs on', e.device)")  # fmt: skip
    cpu_env = {**run.env, "CUDA_VISIBLE_DEVICES": ""}
    loaded = subprocess.run([sys.executable, "-c", check, str(export)], cwd=ROOT, env=cpu_env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    return {
        "killed_after_checkpoint_step": killed_at,
        "losses_after_resume": {s: {"uninterrupted": a, "resumed": b} for s, (a, b) in pairs.items()},
        "max_relative_loss_difference": worst,
        "export_loads_on_cpu": loaded.returncode == 0,
        "export_check_output": (loaded.stdout + loaded.stderr).strip()[-2000:],
    }


def stage_shards(run: Run, limit: float) -> dict:
    samples, size = (64, "160x120") if run.dry_run else (16384, "640x480")
    folder = run.work / "photos"
    argv = [sys.executable, "scripts/make_photo_shards.py", str(folder), "--samples", str(samples), "--size", size,
            "--per-shard", str(min(1024, samples))]  # fmt: skip
    run.command("shards", argv, limit)
    pattern = (run.out / "shards.log").read_text().strip().splitlines()[-1]
    run.summary["shards"] = pattern
    return {"pattern": pattern, "samples": samples, "size": size}


def stage_trainer(run: Run, name: str, limit: float) -> dict:
    pattern = run.summary.get("shards")
    if not pattern:
        raise RuntimeError(f"{name} needs the shards stage first")
    if run.dry_run:
        config, batch, warmup, steps, workers = "demo", 8, 1, 2, 1
        ds_config = "ds_configs/zero2.json"
    else:
        config, batch, warmup, steps, workers = "vitb16_bert", 128, 10, 40, max(1, (os.cpu_count() or 2) - 2)
        ds_config = "ds_configs/zero2_b128.json"
    out = run.out / f"trainer_{name}.json"
    argv = [sys.executable, "scripts/bench_step.py", "--config", config, "--variants", "", "--trainer", "--batch",
            str(batch), "--warmup", str(warmup), "--steps", str(steps), "--ds-config", ds_config, "--out", str(out),
            f"data.train_shards={pattern}", f"data.num_workers={workers}", f"data.index_dir={run.work / 'index'}",
            *TRAINER_STAGES[name]]  # fmt: skip
    run.command(name, argv, limit)
    trainer = json.loads(out.read_text())["trainer"]
    if "error" in trainer:
        raise RuntimeError(f"{name}: {trainer['error']}")
    keep = ("step_s_mean", "samples_per_s", "achieved_tflops", "mfu", "peak_memory_gib", "data_wait_s",
            "data_wait_share", "flops_per_step", "dtype", "batch_per_rank", "steps")  # fmt: skip
    return {"overrides": TRAINER_STAGES[name], "data_workers": workers, **{k: trainer.get(k) for k in keep}}


def ratios(stages: dict) -> dict:
    def step(name):
        result = stages.get(name, {})
        return result.get("step_s_mean") if result.get("ok") else None

    pairs = {"grit_vs_plain_step_time": ("grit", "plain"), "compiled_vs_eager_step_time": ("grit_compiled", "grit"),
             "device_decode_vs_cpu_decode_step_time": ("grit_device_decode", "grit")}  # fmt: skip
    return {key: step(a) / step(b) for key, (a, b) in pairs.items() if step(a) and step(b)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="default gpu_run_out (dry run: a temporary folder)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset, in this order")
    parser.add_argument("--dry-run", action="store_true", help="on CPU (CUDA hidden), smallest sizes, demo config")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; known: {', '.join(STAGES)}")
    if any(s in TRAINER_STAGES for s in stages) and "shards" not in stages:
        stages.insert(0, "shards")  # the trainer stages read them
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu_run_dry_")) if args.dry_run else ROOT / "gpu_run_out")
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, args.dry_run)
    limits = DRY_LIMITS if args.dry_run else LIMITS
    functions = {"demo": stage_demo, "resume": stage_resume, "shards": stage_shards}
    for name in STAGES:
        if name not in stages:
            continue
        print(f"== {name} (limit {limits[name]} s)", flush=True)
        start = time.monotonic()
        try:
            if name in TRAINER_STAGES:
                result = {"ok": True, **stage_trainer(run, name, limits[name])}
            else:
                result = {"ok": True, **functions[name](run, limits[name])}
        except Exception as err:  # noqa: BLE001 - a failing stage is recorded, the next one runs
            result = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        result["stage_seconds"] = round(time.monotonic() - start, 1)
        run.summary["stages"][name] = result
        run.summary["ratios"] = ratios(run.summary["stages"])
        run.save()
        print(json.dumps({name: result})[:1500], flush=True)
    if args.dry_run:
        shutil.rmtree(run.work, ignore_errors=True)
    failed = [name for name, r in run.summary["stages"].items() if not r["ok"]]
    print(f"summary: {out / 'summary.json'}" + (f"; failed: {', '.join(failed)}" if failed else "; every stage ran"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
