"""Fault injection for the crash tests: GRITVLP_KILL_AT=<point>[:<rank>[:<step>]] makes that rank (every rank when
left out) SIGKILL itself, as a failing node would, when it reaches that point (at that step, when given).

Points: in a checkpoint save, after_shards, after_rank_state, before_latest and before_rotation; in the evaluation
during training, evaluation. Unset (the normal case), a point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

import torch.distributed as dist


def kill_point(point: str, step: int | None = None) -> None:
    wanted = os.environ.get("GRITVLP_KILL_AT")
    if not wanted:
        return
    name, rank, at_step = (wanted.split(":") + ["", ""])[:3]
    this_rank = dist.get_rank() if dist.is_initialized() else 0
    if name == point and rank in ("", str(this_rank)) and at_step in ("", str(step)):
        os.kill(os.getpid(), signal.SIGKILL)
