"""Runs the CAT filter over shards, one shard per task.

Each output shard is written under a temporary name and renamed when complete; then its report part
(OUT_DIR/NAME.cat.json) is written. A shard counts as done only when its part exists with the same settings,
so a killed run resumes at the next unfinished shard and never leaves half a shard under a final name.
One run at a time per OUT_DIR: a starting run removes the temporary files a killed one left behind.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from gritvlp.filtering.cat import UNREADABLE, Thresholds, failed_rule
from gritvlp.filtering.ocr import Ocr, UnreadableImage
from gritvlp.filtering.parse import Parser
from gritvlp.filtering.report import empty_counts, summarize, write_json
from gritvlp.filtering.tario import Sample, SampleReader, SampleWriter

REPORT_NAME = "cat_report.json"
PART_SUFFIX = ".cat.json"


@dataclass(frozen=True)
class FilterJob:
    out_dir: str
    parse: Parser
    ocr: Ocr
    thresholds: Thresholds  # with the action rule
    parser_name: str  # recorded with the thresholds: a part made with other settings is redone

    @property
    def settings(self) -> dict:
        # every field of Thresholds, action_rule included: a part written before a setting existed lacks it
        # and is redone, since its rule may have differed
        return {**asdict(self.thresholds), "parser": self.parser_name}


# ---------------------------------------------------------------- one shard


def judge(sample: Sample, job: FilterJob) -> str | None:
    """Why the sample is dropped, or None to keep it."""
    caption, image = sample.caption(), sample.image()
    if caption is None or image is None:
        return UNREADABLE
    try:
        return failed_rule(caption, image, job.parse, job.ocr, job.thresholds)
    except UnreadableImage:
        return UNREADABLE


def part_path(out_dir: str, name: str) -> Path:
    return Path(out_dir) / f"{name}{PART_SUFFIX}"


def filter_shard(shard: str, job: FilterJob, on_sample=None) -> dict:
    """Write the kept samples of `shard` to OUT_DIR/<its name>, then its report part; returns the part."""
    name = os.path.basename(shard)
    tmp = Path(job.out_dir) / f".{name}.{os.getpid()}.tmp"
    counts = empty_counts()
    reader = SampleReader(shard)
    try:
        with SampleWriter(str(tmp)) as writer:
            for sample in reader:
                reason = judge(sample, job)
                counts["seen"] += 1
                if reason is None:
                    writer.write(sample)
                    counts["kept"] += 1
                else:
                    counts["dropped"][reason] += 1
                if on_sample is not None:
                    on_sample()
        os.replace(tmp, Path(job.out_dir) / name)
    finally:
        tmp.unlink(missing_ok=True)
    part = {"input": os.path.abspath(shard), **counts, "damaged": reader.damaged, "settings": job.settings}
    write_json(part_path(job.out_dir, name), part)
    return part


def is_finished(job: FilterJob, name: str) -> bool:
    try:
        part = json.loads(part_path(job.out_dir, name).read_text())
    except (OSError, ValueError):
        return False
    return part.get("settings") == job.settings and (Path(job.out_dir) / name).is_file()


def remove_stale_temps(out_dir: str, names: list[str]) -> None:
    """Temporary shards and parts of a run that was killed before renaming them."""
    for name in names:
        for pattern in (f".{name}.*.tmp", f"{name}{PART_SUFFIX}.*.tmp"):
            for path in Path(out_dir).glob(pattern):
                path.unlink(missing_ok=True)


# ---------------------------------------------------------------- all shards


class Progress:
    """Two bars: finished shards and judged pairs."""

    def __init__(self, total_shards: int, done_shards: int, enabled: bool):
        self.shards = tqdm(total=total_shards, initial=done_shards, desc="shards", unit="shard", disable=not enabled)
        self.pairs = tqdm(desc="pairs", unit="pair", disable=not enabled)

    def pair(self) -> None:
        self.pairs.update()

    def pairs_to(self, n: int) -> None:
        self.pairs.update(n - self.pairs.n)

    def shard(self) -> None:
        self.shards.update()

    def close(self) -> None:
        self.pairs.close()
        self.shards.close()


def run_filter(shards: list[str], job: FilterJob, workers: int = 1, progress: bool = True) -> dict:
    """Filter every shard not yet done, then write and return the report over all of `shards`."""
    names = [os.path.basename(shard) for shard in shards]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"input shards share output names {repeated}: filter them into separate --out folders")
    not_local = [shard for shard in shards if not os.path.isfile(shard)]
    if not_local:
        raise FileNotFoundError(f"the CAT filter reads local tar files; not found: {not_local[:3]}")
    if any(Path(shard).resolve().parent == Path(job.out_dir).resolve() for shard in shards):
        raise ValueError(f"--out {job.out_dir} holds input shards, which filtering would overwrite")
    os.makedirs(job.out_dir, exist_ok=True)
    remove_stale_temps(job.out_dir, names)
    pending = [shard for shard, name in zip(shards, names) if not is_finished(job, name)]
    bars = Progress(len(shards), len(shards) - len(pending), progress)
    try:
        if workers > 1 and len(pending) > 1:
            _run_in_pool(pending, job, workers, bars)
        else:
            for shard in pending:
                filter_shard(shard, job, bars.pair)
                bars.shard()
    finally:
        bars.close()
    parts = {name: _read_part(job.out_dir, name) for name in names}
    report = summarize(parts, job.settings)
    write_json(Path(job.out_dir) / REPORT_NAME, report)
    return report


def _read_part(out_dir: str, name: str) -> dict:
    part = json.loads(part_path(out_dir, name).read_text())
    part.pop("settings")  # the same for every part: the report states them once
    return part


# ---------------------------------------------------------------- worker processes

_worker_job: FilterJob | None = None
_worker_pairs = None  # shared counter of judged pairs, read by the parent for its progress bar


def _run_in_pool(pending: list[str], job: FilterJob, workers: int, bars: Progress) -> None:
    # fork hands the loaded parser and the OCR function to the workers as they are: nothing is pickled or reloaded
    if "fork" not in mp.get_all_start_methods():
        raise RuntimeError("--workers > 1 needs the 'fork' start method (Linux, macOS); use --workers 1")
    ctx = mp.get_context("fork")
    pairs = ctx.Value("q", 0)
    # a pool that fails on a worker killed from outside (e.g. out of memory) instead of waiting for it forever
    pool = ProcessPoolExecutor(min(workers, len(pending)), ctx, initializer=_init_worker, initargs=(job, pairs))
    try:
        remaining = {pool.submit(_filter_in_worker, shard) for shard in pending}
        while remaining:
            done, remaining = wait(remaining, timeout=0.2, return_when=FIRST_COMPLETED)
            bars.pairs_to(pairs.value)
            for future in done:
                future.result()  # re-raises a worker's error
                bars.shard()
    finally:
        # on an error, shards not yet started are dropped; those in flight still finish whole or not at all
        pool.shutdown(wait=True, cancel_futures=True)


def _init_worker(job: FilterJob, pairs) -> None:
    global _worker_job, _worker_pairs
    _worker_job, _worker_pairs = job, pairs
    # Tesseract spreads one image over all cores by default; with a process per core that only oversubscribes
    os.environ.setdefault("OMP_THREAD_LIMIT", "1")


def _filter_in_worker(shard: str) -> dict:
    return filter_shard(shard, _worker_job, _count_pair)


def _count_pair() -> None:
    with _worker_pairs.get_lock():
        _worker_pairs.value += 1
