"""Checkpoints: DeepSpeed's own format (zero_to_fp32 compatible) plus gritvlp's client state.

Every rank writes its part of a tag folder; only when all have finished does rank 0 point 'latest' at it,
so an interrupted save leaves the previous checkpoint in place. Old tags are pruned after that.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("gritvlp.train")

TAG_PREFIX = "global_step"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def rank_state_path(folder: Path, tag: str) -> Path:
    rank = dist.get_rank() if dist.is_initialized() else 0
    return folder / tag / f"gritvlp_rank{rank:05d}.pt"


def save(engine, output_dir: str | Path, step: int, client_state: dict, keep: int, rank_state: dict | None = None) -> Path:
    """Saves on every rank (ZeRO shards live on each), with each rank's own state (its GRIT feature bank)
    beside them. 'latest' moves to the new tag only once every rank has finished writing, so a run killed
    at any moment resumes from a complete checkpoint; older tags are pruned after that."""
    folder = checkpoint_dir(output_dir)
    tag = f"{TAG_PREFIX}{step}"
    engine.save_checkpoint(str(folder), tag=tag, client_state=client_state, save_latest=False)
    if rank_state is not None:
        torch.save(rank_state, rank_state_path(folder, tag))
    if dist.is_initialized():
        dist.barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        pending = folder / "latest.tmp"
        pending.write_text(tag)
        os.replace(pending, folder / "latest")  # atomic
        if keep > 0:
            tags = sorted((p for p in folder.glob(f"{TAG_PREFIX}*") if p.is_dir()), key=_step_of)
            for old in tags[:-keep]:
                if old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return folder / tag


def _step_of(path: Path) -> int:
    try:
        return int(path.name[len(TAG_PREFIX) :])
    except ValueError:
        return -1


def resolve_resume(resume: str | None, output_dir: str | Path) -> tuple[Path, str | None] | None:
    """'latest' -> the run's checkpoints folder (None if it has none yet); a path -> (folder, tag).

    A path may be a checkpoints folder holding a 'latest' file, or one tag folder inside it.
    """
    if not resume:
        return None
    if resume == "latest":
        folder = checkpoint_dir(output_dir)
        if not (folder / "latest").is_file():
            log.warning("--resume latest: no checkpoint in %s yet, starting from scratch", folder)
            return None
        return folder, None
    path = Path(resume)
    if (path / "latest").is_file():
        return path, None
    if path.is_dir() and any(path.glob("*model_states.pt")):
        return path.parent, path.name
    raise FileNotFoundError(f"--resume {resume}: neither a checkpoints folder with 'latest' nor a checkpoint tag folder")


def load(engine, folder: Path, tag: str | None) -> tuple[dict, dict | None]:
    """Returns the client state and this rank's own state (None if the checkpoint has none)."""
    path, client_state = engine.load_checkpoint(str(folder), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load a checkpoint from {folder} (tag {tag or 'latest'})")
    tag = tag or (folder / "latest").read_text().strip()
    own = rank_state_path(folder, tag)
    rank_state = torch.load(own, map_location="cpu", weights_only=False) if own.is_file() else None
    log.info("resumed from %s", path)
    return client_state or {}, rank_state
