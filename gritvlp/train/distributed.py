"""Process-group set-up and the one collective of logging steps, shared by the training loops."""

from __future__ import annotations

import logging
import os
import socket

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


def init_distributed(use_cuda: bool) -> tuple[torch.device, int, int]:
    """Joins (or, run without a launcher, forms) the process group; returns this rank's device, rank and world size."""
    import deepspeed

    single_process_defaults()
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    elif dist.get_rank() == 0:
        log.warning("no CUDA device: running on CPU in fp32 with the gloo backend")
    return device, dist.get_rank(), dist.get_world_size()


def reduce_mean(values: dict[str, torch.Tensor], device) -> dict[str, float]:
    """Averages scalars over ranks in one collective (only on logging steps: the host waits for it)."""
    names = sorted(values)
    stacked = torch.stack([values[n].detach().float().reshape(()).to(device) for n in names])
    if dist.is_initialized():
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(names, stacked.tolist()))
