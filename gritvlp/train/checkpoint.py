"""Checkpoints: DeepSpeed's own format (zero_to_fp32 compatible) plus gritvlp's client state.

Every rank writes its part of a tag folder; only when all have finished does rank 0 mark the tag complete (a
`complete` file) and point 'latest' at it, so a run killed at any moment of a save resumes from a complete
checkpoint. A save that fails on any rank (a full disk, say) is reported, its partial folder removed and the previous
checkpoint kept. Rotation counts complete tags only: it never deletes the newest complete one.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from gritvlp.train.faults import kill_point

log = logging.getLogger("gritvlp.train")

TAG_PREFIX = "global_step"
COMPLETE = "complete"  # written into a tag folder once every rank has written its part


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rank_state_path(folder: Path, tag: str) -> Path:
    return folder / tag / f"gritvlp_rank{_rank():05d}.pt"


def _all_ranks_ok(ok: bool) -> bool:
    flag = torch.tensor([1 if ok else 0])
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def save(
    engine, output_dir: str | Path, step: int, client_state: dict, keep: int, rank_state: dict | None = None
) -> Path | None:
    """Saves on every rank (ZeRO shards live on each), with each rank's own state (its GRIT feature bank) beside
    them. Returns the tag folder, or None when the save failed on some rank (logged; the previous checkpoint stays
    'latest', the partial folder is removed). A collective: every rank must call it."""
    folder = checkpoint_dir(output_dir)
    tag = f"{TAG_PREFIX}{step}"
    error = None
    try:
        (folder / tag / COMPLETE).unlink(missing_ok=True)  # a tag saved again is incomplete until this save ends
        engine.save_checkpoint(str(folder), tag=tag, client_state=client_state, save_latest=False)
        kill_point("after_shards", step)
        if rank_state is not None:
            torch.save(rank_state, rank_state_path(folder, tag))
        kill_point("after_rank_state", step)
    except OSError as err:  # a full disk, a quota, a vanished mount: report it, keep training on the last checkpoint
        error = err
    if not _all_ranks_ok(error is None):
        if error is not None:
            log.error("checkpoint %s could not be written on rank %d (%s)", tag, _rank(), error)
        if _rank() == 0:
            shutil.rmtree(folder / tag, ignore_errors=True)
            log.error("checkpoint %s failed and was removed; the previous checkpoint %s is kept and the next save "
                      "tries again", tag, latest_tag(folder) or "(none)")  # fmt: skip
        _barrier()
        return None
    if _rank() == 0:
        (folder / tag / COMPLETE).write_text(tag)
        kill_point("before_latest", step)
        pending = folder / "latest.tmp"
        pending.write_text(tag)
        os.replace(pending, folder / "latest")  # atomic
        kill_point("before_rotation", step)
        _rotate(folder, keep, tag)
    _barrier()
    return folder / tag


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rotate(folder: Path, keep: int, current: str) -> None:
    """Keeps the newest `keep` complete tags (0: all) and removes incomplete ones older than the current tag (left by
    a save that was killed); never the current one."""
    tags = sorted((p for p in folder.glob(f"{TAG_PREFIX}*") if p.is_dir()), key=_step_of)
    complete = [p for p in tags if (p / COMPLETE).is_file()]
    doomed = complete[:-keep] if keep > 0 else []
    doomed += [p for p in tags if not (p / COMPLETE).is_file() and _step_of(p) < _step_of(folder / current)]
    for old in doomed:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def _step_of(path: Path) -> int:
    try:
        return int(path.name[len(TAG_PREFIX) :])
    except ValueError:
        return -1


def is_complete(tag_dir: Path) -> bool:
    """A tag folder every rank finished writing (marked so by rank 0 after the save's collective check). Tags of
    earlier releases carry no mark: 'latest' is trusted for them (latest_tag), and rotation treats them as
    incomplete once a newer complete tag exists."""
    return (tag_dir / COMPLETE).is_file()


def latest_tag(folder: Path) -> str | None:
    """The tag to resume from: 'latest' when it names a complete tag (or an unmarked tag of an earlier release), else
    the newest complete tag; None when there is none."""
    named = (folder / "latest").read_text().strip() if (folder / "latest").is_file() else None
    complete = sorted((p for p in folder.glob(f"{TAG_PREFIX}*") if is_complete(p)), key=_step_of)
    if named and (is_complete(folder / named) or (not complete and any((folder / named).glob("*model_states.pt")))):
        return named
    if named:
        log.warning("'latest' names %s, which is incomplete; resuming from the newest complete checkpoint instead",
                    named)  # fmt: skip
    return complete[-1].name if complete else None


def has_checkpoints(output_dir: str | Path) -> bool:
    folder = checkpoint_dir(output_dir)
    return (folder / "latest").is_file() or any(p.is_dir() for p in folder.glob(f"{TAG_PREFIX}*"))


def resolve_resume(resume: str | None, output_dir: str | Path) -> tuple[Path, str | None] | None:
    """'latest' -> the run's newest complete checkpoint (None if it has none yet); a path -> (folder, tag).

    A path may be a checkpoints folder holding a 'latest' file, or one tag folder inside it.
    """
    if not resume:
        return None
    if resume == "latest":
        folder = checkpoint_dir(output_dir)
        tag = latest_tag(folder) if folder.is_dir() else None
        if tag is None:
            log.warning("--resume latest: no complete checkpoint in %s yet, starting from scratch", folder)
            return None
        return folder, tag
    path = Path(resume)
    if (path / "latest").is_file():
        tag = latest_tag(path)
        if tag is None:
            raise FileNotFoundError(f"--resume {resume}: no complete checkpoint in it")
        return path, tag
    if path.is_dir() and any(path.glob("*model_states.pt")):
        return path.parent, path.name
    raise FileNotFoundError(f"--resume {resume}: neither a checkpoints folder with 'latest' nor a checkpoint tag folder")


def load(engine, folder: Path, tag: str | None) -> tuple[dict, dict | None]:
    """Returns the client state and this rank's own state (None if the checkpoint has none)."""
    tag = tag or (folder / "latest").read_text().strip()
    path, client_state = engine.load_checkpoint(str(folder), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load a checkpoint from {folder} (tag {tag})")
    own = rank_state_path(folder, tag)
    rank_state = torch.load(own, map_location="cpu", weights_only=False) if own.is_file() else None
    log.info("resumed from %s", path)
    return client_state or {}, rank_state
