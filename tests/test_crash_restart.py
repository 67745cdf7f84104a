"""Crash and restart as a cluster does it, with real processes through the deepspeed launcher (CPU, gloo): a restart
while the rendezvous port is still taken, a fresh run over an earlier run's checkpoints, a kill inside a checkpoint
save, a dead rank during training and during the evaluation."""

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from test_train import ENV, REPO, SMALL_RUN, ds_config, free_port, losses

pytestmark = pytest.mark.slow


def launch(out: Path, ds: Path, procs: int, *extra: str, env: dict | None = None, port: int | None = None,
           timeout: int = 600) -> subprocess.CompletedProcess:  # fmt: skip
    cmd = ["deepspeed", "--num_gpus", str(procs), "--master_port", str(port or free_port()), "scripts/pretrain.py",
           "--deepspeed_config", str(ds), "--output_dir", str(out), f"data.demo_dir={out.parent / 'demo'}",
           *SMALL_RUN, *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return ds_config(tmp_path_factory.mktemp("ds"), 2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ds):
    """An uninterrupted 6-step run of two processes, checkpoints every 2 steps."""
    out = tmp_path_factory.mktemp("reference") / "run"
    ok(launch(out, ds, 2, "train.save_every=2", "train.keep_checkpoints=1", "train.export_fp16=false"))
    return losses(out)


def test_restart_waits_while_a_process_of_an_earlier_run_holds_the_port(tmp_path, ds):
    """A listener of another job on the master port (an earlier run's rank 0 still exiting): every rank waits for it
    to go instead of failing (rank 0) or joining the wrong store (the others); here it goes after 25 s."""
    port = free_port()
    blocker = socket.socket(socket.AF_INET6)
    blocker.bind(("::", port))
    blocker.listen()
    threading.Timer(25.0, blocker.close).start()
    start = time.monotonic()
    result = ok(launch(tmp_path / "run", ds, 2, "train.max_steps=2", "train.export_fp16=false", port=port))
    assert time.monotonic() - start > 25
    assert f"rendezvous port {port} is held by pid {os.getpid()}" in result.stderr + result.stdout


def test_restart_right_after_a_kill_of_the_whole_job(tmp_path, ds):
    """kill -9 of the launcher's process group once a checkpoint exists, then the same command with --resume at once:
    the port's closed sockets (TIME_WAIT) do not block the new rendezvous."""
    out, port = tmp_path / "run", free_port()
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "scripts/pretrain.py", "--deepspeed_config",
           str(ds), "--output_dir", str(out), f"data.demo_dir={tmp_path / 'demo'}", *SMALL_RUN, "train.save_every=2",
           "train.export_fp16=false"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "latest").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    start = time.monotonic()
    ok(launch(out, ds, 2, "train.save_every=2", "train.export_fp16=false", "--resume", "latest", port=port))
    print(f"restart right after the kill: {time.monotonic() - start:.1f} s to the end of the resumed run")
    assert time.monotonic() - start < 120
    assert max(step for step, m in losses(out).items() if "loss/total" in m) == 6


def test_fresh_run_over_checkpoints_is_refused_and_overwrite_starts_again(tmp_path, ds):
    out = tmp_path / "run"
    ok(launch(out, ds, 2, "train.max_steps=2", "train.export_fp16=false"))
    before = {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*") if p.is_file()}
    metrics = (out / "metrics.jsonl").read_text()
    refused = launch(out, ds, 2, "train.max_steps=2", "train.export_fp16=false")
    assert refused.returncode != 0
    assert "holds checkpoints of an earlier run (latest: global_step2): pass --resume latest to continue it, or " \
           "--overwrite" in refused.stderr  # fmt: skip
    assert {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*") if p.is_file()} == before
    assert (out / "metrics.jsonl").read_text() == metrics
    ok(launch(out, ds, 2, "train.max_steps=2", "train.export_fp16=false", "--overwrite"))
    steps = [s for s, m in losses(out).items() if "loss/total" in m]
    assert steps == [1, 2]  # one run's rows, not two
    assert (out / "metrics.jsonl").read_text().count('"loss/total"') == 2


@pytest.mark.parametrize("point", ["after_shards:1:4", "after_rank_state:0:4", "before_latest:0:4",
                                   "before_rotation:0:4"])  # fmt: skip
def test_kill_inside_a_save_resumes_from_the_newest_complete_checkpoint(tmp_path, ds, reference, point):
    out = tmp_path / "run"
    common = ("train.save_every=2", "train.keep_checkpoints=1", "train.export_fp16=false")
    killed = launch(out, ds, 2, *common, env={"GRITVLP_KILL_AT": point})
    assert killed.returncode != 0
    folder = out / "checkpoints"
    latest = (folder / "latest").read_text().strip()
    assert (folder / latest / "complete").is_file()  # 'latest' never names an incomplete tag
    assert latest == ("global_step4" if point.startswith("before_rotation") else "global_step2")
    ok(launch(out, ds, 2, *common, "--resume", "latest"))
    resumed = losses(out)
    for step in (5, 6):
        for key in ("loss/total", "loss/itc", "loss/itm"):
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-6), (step, key)
    assert sorted(p.name for p in folder.glob("global_step*")) == ["global_step6"]  # rotation kept the newest
    assert sum('"loss/total"' in line for line in (out / "metrics.jsonl").read_text().splitlines()) == 6


def _rank_pid(out: Path, rank: int) -> int | None:
    """The pid of a training process of this run with --local_rank=rank."""
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"--local_rank={rank}".encode() in cmd and str(out).encode() in cmd:
            return int(proc.name)
    return None


def test_a_dead_rank_ends_the_job_within_seconds(tmp_path, ds):
    out = tmp_path / "run"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "scripts/pretrain.py",
           "--deepspeed_config", str(ds), "--output_dir", str(out), f"data.demo_dir={tmp_path / 'demo'}", *SMALL_RUN,
           "train.max_steps=400", "train.epochs=100", "train.save_every=1000", "train.export_fp16=false"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").is_file() and time.monotonic() < deadline:  # training has started
            time.sleep(0.2)
        pid = _rank_pid(out, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        assert proc.wait(timeout=120) != 0
        print(f"job ended {time.monotonic() - killed:.1f} s after rank 1 was killed")
        assert time.monotonic() - killed < 60
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_rank_dying_in_the_evaluation_ends_the_job(tmp_path, ds):
    """Rank 1 dies as the evaluation after epoch 0 starts: rank 0 must not wait in the evaluation's collectives."""
    start = time.monotonic()
    result = launch(tmp_path / "run", ds, 2, "train.export_fp16=false", env={"GRITVLP_KILL_AT": "evaluation:1:4"},
                    timeout=300)  # fmt: skip
    assert result.returncode != 0
    print(f"job with rank 1 killed in the evaluation ended after {time.monotonic() - start:.1f} s in all")
    assert time.monotonic() - start < 240
    assert not (tmp_path / "run" / "checkpoints" / "global_step6").exists()
