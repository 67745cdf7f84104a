"""Process-group set-up and the one collective of logging steps, shared by the training loops."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("gritvlp.train")


def configure_logging() -> None:
    """Console logging for a launched process: INFO on rank 0, warnings only on the others, each line tagged with its
    rank. Reads RANK from the launcher's environment, so it can run before the process group exists."""
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
    )


def single_process_defaults() -> None:
    """Lets a plain `python script.py` run as one rank: launchers (deepspeed, torchrun) set these variables."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for name, value in defaults.items():
        os.environ.setdefault(name, value)


# How long the ranks wait for a foreign process to free the rendezvous port (seconds; GRITVLP_RENDEZVOUS_WAIT_S).
RENDEZVOUS_WAIT_S = 180.0


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on `port` (any local address), from /proc/net/tcp and tcp6."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def _holders(port: int) -> dict[int, str]:
    """{pid: command line} of the processes listening on `port` (those this user may inspect)."""
    inodes = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    holders = {}
    if not inodes:
        return holders
    for proc in os.listdir("/proc"):
        if not proc.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{proc}/fd")
            if any(os.readlink(f"/proc/{proc}/fd/{fd}") in inodes for fd in fds):
                cmd = open(f"/proc/{proc}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
                holders[int(proc)] = cmd.strip()
        except OSError:
            continue
    return holders


def _parent(pid: int) -> int | None:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def wait_for_rendezvous_port() -> None:
    """On the master node, before the rendezvous: waits while a process of another job listens on MASTER_PORT.

    A job restarted at once after a crash can find the port still held by a process of the previous run that is
    still exiting (or an orphaned one): its rank 0 would fail with EADDRINUSE, and its other ranks could even join the
    old run's store. Every local rank waits here for such a foreign holder to go (the port of a closed socket in
    TIME_WAIT does not block torch's store, which binds with SO_REUSEADDR); the job's own rank 0 (a process of the
    same launcher) is no reason to wait. After GRITVLP_RENDEZVOUS_WAIT_S seconds it fails naming the holder."""
    port, addr = os.environ.get("MASTER_PORT"), os.environ.get("MASTER_ADDR", "127.0.0.1")
    if not port or not os.path.isdir("/proc") or not _is_local(addr):
        return
    wait = float(os.environ.get("GRITVLP_RENDEZVOUS_WAIT_S", RENDEZVOUS_WAIT_S))
    deadline, warned, parent = time.monotonic() + wait, False, os.getppid()
    while True:
        foreign = {pid: cmd for pid, cmd in _holders(int(port)).items() if pid != os.getpid() and _parent(pid) != parent}
        if not foreign:
            return
        pid, cmd = next(iter(foreign.items()))
        if time.monotonic() > deadline:
            raise RuntimeError(f"rendezvous port {port} is still held by pid {pid} ({cmd[:200]}) after {wait:.0f} s: "
                               "stop that process, or pass --master_port to the launcher to use another port")
        if not warned and int(os.environ.get("RANK", 0)) == 0:
            log.warning("rendezvous port %s is held by pid %d (%s), not a process of this job (one of an earlier run "
                        "still exiting?): waiting for it for up to %.0f s", port, pid, cmd[:200], wait)  # fmt: skip
        warned = True
        time.sleep(1.0)


def _is_local(addr: str) -> bool:
    try:
        ip = socket.gethostbyname(addr)
    except OSError:
        return False
    if ip.startswith("127."):
        return True
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))  # only an address of this machine can be bound
        return True
    except OSError:
        return False


def init_distributed(use_cuda: bool) -> tuple[torch.device, int, int]:
    """Joins (or, run without a launcher, forms) the process group; returns this rank's device, rank and world size."""
    import deepspeed

    single_process_defaults()
    wait_for_rendezvous_port()
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    elif dist.get_rank() == 0:
        log.warning("no CUDA device: running on CPU in fp32 with the gloo backend")
    return device, dist.get_rank(), dist.get_world_size()


def any_rank(flag: bool, device) -> bool:
    """True when the flag is set on any rank (a collective; the same answer everywhere)."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def reduce_mean(values: dict[str, torch.Tensor], device) -> dict[str, float]:
    """Averages scalars over ranks in one collective (only on logging steps: the host waits for it)."""
    names = sorted(values)
    stacked = torch.stack([values[n].detach().float().reshape(()).to(device) for n in names])
    if dist.is_initialized():
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(names, stacked.tolist()))


def shared_memory_segment() -> Path:
    """This rank's segment of DeepSpeed's CPU all-reduce (its shm op names it after the user, MASTER_ADDR,
    MASTER_PORT and the rank)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{dist.get_rank()}")


def release_shared_memory() -> None:
    """Removes this rank's segment at the end of a run. DeepSpeed's CPU all-reduce creates one of about 66 MB per
    rank in /dev/shm (memory) and never removes it, so every CPU run, each on its own port, would leave its ranks'
    segments in memory until the machine runs out. Every rank calls this after the run's last collective: after the
    barrier no rank reads another's segment. A run killed before its end still leaves them (rm
    /dev/shm/deepspeed_allreduce_buffer_*)."""
    if not dist.is_initialized():
        return
    dist.barrier()
    shared_memory_segment().unlink(missing_ok=True)
