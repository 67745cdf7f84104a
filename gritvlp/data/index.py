"""Binary sample index of a list of tar shards: fixed-width columns, memory-mapped.

Every process of a node maps the same files, so the page cache holds one copy, and opening costs milliseconds
whatever the dataset's size (nothing is parsed or copied per sample). Layout of an index root:

    parts/<digest>-<shard name>.npz   one per shard, stamped with the shard's size and mtime (or version tag)
    <set>.json                        the merged index of one shard list: its shards, stamps, sample counts
    <set>.<token>/<column>.npy        its columns

A sample is a row of 40 bytes: the data offsets (in 512-byte tar blocks) and sizes of its image, caption and
KEY.json members, its group id (samples showing the same image share one) and its caption id (samples whose
normalised captions are identical share one); both ids are dense, numbered in order of first appearance, and cost
nothing to look up at run time. A member the sample lacks has size MISSING, and its block then names another member
of the sample, so that every row can read its key from a tar header. Captions and metadata stay in the tars.

Parts and merged indexes carry INDEX_VERSION: one written in another format is out of date, and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gritvlp.data.remote import is_url, local_path, readable_copy, shard_stamp
from gritvlp.data.text import clean_caption

log = logging.getLogger("gritvlp.data")

INDEX_VERSION = 4  # 3: KEY.json spans (json_block, json_size); 4: caption ids
JSON_INDEX_VERSION = 1  # the per-shard <shard>.idx.json of earlier releases, still read
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
BLOCK = 512  # tar member data always starts on a block boundary
MISSING = 0xFFFFFFFF  # size of a member the sample lacks
COLUMNS = {
    "image_block": np.uint32,
    "image_size": np.uint32,
    "text_block": np.uint32,
    "text_size": np.uint32,
    "json_block": np.uint32,
    "json_size": np.uint32,
}
# per-shard hashes -> the dense id columns of the merged index
HASH_IDS = {"group_hash": "group_id", "caption_hash": "caption_id"}
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # "dir/KEY.ext.more" -> key "dir/KEY", ext "ext.more"


# ---------------------------------------------------------------- scanning one tar


def _scan_members(path: str, size: int) -> tuple[list[tuple[str, int, int]], bool]:
    """(name, data offset, data size) of every complete file member, and whether the tar is damaged."""
    members, damaged = [], False
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                if info.offset_data + info.size > size:  # data cut off by truncation
                    members.append((info.name, -1, -1))
                    damaged = True
                    break
                members.append((info.name, info.offset_data, info.size))
            end = tar.offset
        if not damaged:  # tarfile stops silently on a bad header: a sound tar ends with a zero block here
            with open(path, "rb") as f:
                f.seek(end)
                damaged = f.read(BLOCK) != bytes(BLOCK)
    except (tarfile.TarError, OSError, EOFError):
        damaged = True
    return members, damaged


def _group_key(fd: int, members: dict[str, list[int]]) -> str | None:
    """'id:<image_id>' from KEY.json, else 'sha1:<hash of the image bytes>'; None without an image."""
    if "json" in members:
        try:
            meta = json.loads(os.pread(fd, members["json"][1], members["json"][0]))
            if isinstance(meta, dict) and meta.get("image_id") is not None:
                return "id:" + json.dumps(meta["image_id"], sort_keys=True)
        except ValueError:
            pass  # unreadable metadata: fall back to the content hash
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None:
        return None
    offset, size = members[ext]
    return "sha1:" + hashlib.sha1(os.pread(fd, size, offset)).hexdigest()


def _caption_key(fd: int, members: dict[str, list[int]]) -> str | None:
    """The normalised caption (ALBEF's cleaning, never cut: the identity of two captions does not depend on a
    run's max_words); None without a caption."""
    if "txt" not in members:
        return None
    offset, size = members["txt"]
    return clean_caption(os.pread(fd, size, offset).decode("utf-8", "replace"), max_words=1 << 30) or None


def with_caption_keys(path: str, rows: list) -> list[tuple[str, dict, str | None, str | None]]:
    """Rows (key, members, group key) of a local tar with their caption keys added."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return [(key, m, group, _caption_key(fd, m)) for key, m, group, *_ in rows]
    finally:
        os.close(fd)


def scan_tar(path: str) -> tuple[list[tuple[str, dict, str | None, str | None]], int]:
    """Samples of a local tar as (key, {ext: [offset, size]}, group key, caption key), and how many its damage
    cost."""
    members, damaged = _scan_members(path, os.path.getsize(path))
    samples: dict[str, dict[str, list[int]]] = {}
    for name, offset, size in members:
        match = _MEMBER.match(name)
        if match:
            samples.setdefault(match.group(1), {})[match.group(2).lower()] = [offset, size]
    lost = 0
    if damaged:  # drop the sample being written at the damage (it may be incomplete) and any sample cut off
        cut = {key for key, m in samples.items() if any(offset < 0 for offset, _ in m.values())}
        cut.update(list(samples)[-1:])
        samples = {key: m for key, m in samples.items() if key not in cut}
        lost = max(1, len(cut))  # at least one: a damaged shard never goes unnoticed
    fd = os.open(path, os.O_RDONLY)
    try:
        rows = [(key, m, _group_key(fd, m), _caption_key(fd, m)) for key, m in samples.items()]
    finally:
        os.close(fd)
    return rows, lost


def key_of_member(name: str) -> str:
    match = _MEMBER.match(name)
    return match.group(1) if match else name


# ---------------------------------------------------------------- per-shard JSON indexes of earlier releases


def json_index_paths(shard: str) -> list[Path]:
    """Where earlier releases cached a shard's JSON index: beside the tar, then the per-user cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gritvlp" / "index"
    digest = hashlib.sha1(os.path.abspath(shard).encode()).hexdigest()[:16]
    return [Path(shard + ".idx.json"), cache / f"{digest}-{Path(shard).name}.idx.json"]


def read_json_index(shard: str, stamp: dict) -> dict | None:
    """A cached JSON index of a local shard that still matches its size and mtime, else None."""
    for path in json_index_paths(local_path(shard)):
        try:
            index = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if index.get("version") == JSON_INDEX_VERSION and all(index.get(k) == v for k, v in stamp.items()):
            return index
    return None


# ---------------------------------------------------------------- per-shard parts


def part_file(root: str | Path, shard: str) -> Path:
    digest = hashlib.sha1(shard.encode()).hexdigest()[:16]
    return Path(root) / "parts" / f"{digest}-{Path(shard).name}.npz"


def _group_hash(group: str | None, shard: str, key: str) -> int:
    """64 bits of a group or caption key (two keys colliding would merge two groups: odds about n^2 / 2^65, a few
    thousandths for a whole 400M-sample dataset); a sample without one (no image, no caption) is a group of its
    own."""
    text = group if group is not None else f"none:{shard}:{key}"
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _block_and_size(member: list[int] | None, anchor: list[int]) -> tuple[int, int]:
    offset, size = member if member is not None else (anchor[0], MISSING)
    if offset % BLOCK or not 0 <= size <= MISSING or offset // BLOCK > MISSING:
        raise ValueError(f"member at offset {offset}, size {size} does not fit a tar block index")
    return offset // BLOCK, size


def part_columns(rows, shard: str) -> dict[str, np.ndarray]:
    """The columns of one shard's samples; group_hash and caption_hash are turned into ids when parts are merged."""
    values = []
    for key, members, group, caption in rows:
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        image, text, meta = members.get(ext) if ext else None, members.get("txt"), members.get("json")
        anchor = image or text or next(iter(members.values()))
        spans = [_block_and_size(member, anchor) for member in (image, text, meta)]
        caption_hash = _group_hash(None if caption is None else "caption:" + caption, shard, key)
        values.append((*(value for span in spans for value in span), _group_hash(group, shard, key), caption_hash))
    table = np.array(values, dtype=np.uint64).reshape(-1, len(COLUMNS) + 2)
    columns = {name: table[:, i].astype(dtype) for i, (name, dtype) in enumerate(COLUMNS.items())}
    columns["group_hash"] = table[:, len(COLUMNS)]
    columns["caption_hash"] = table[:, len(COLUMNS) + 1]
    return columns


def _atomic_write(path: Path, write: Callable) -> None:
    """Write to a temporary file, then rename it over the target: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_part(shard: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Index one shard: its cached JSON index of an earlier release when current, else a scan of the tar."""
    stamp = shard_stamp(shard)  # before reading: a shard rewritten meanwhile is caught by the next check
    legacy = None if is_url(shard) else read_json_index(shard, stamp)
    if legacy is not None:  # its caption keys are read from the tar (the older index has none)
        rows, lost = with_caption_keys(local_path(shard), legacy["samples"]), legacy["truncated"]
    else:
        with readable_copy(shard) as path:
            rows, lost = scan_tar(path)
    meta = {"version": INDEX_VERSION, "shard": shard, "stamp": stamp, "samples": len(rows), "truncated": lost}
    return meta, part_columns(rows, shard)


def write_part(shard: str, path: Path) -> dict:
    meta, columns = build_part(shard)
    _atomic_write(path, lambda f: np.savez(f, meta=np.array(json.dumps(meta)), **columns))
    return meta


def read_part_meta(path: Path) -> dict | None:
    try:
        with np.load(path) as part:
            return json.loads(str(part["meta"]))
    except (OSError, ValueError, KeyError):
        return None


def _part_is_current(path: Path, shard: str) -> bool:
    meta = read_part_meta(path)
    return meta is not None and meta.get("version") == INDEX_VERSION and meta["stamp"] == shard_stamp(shard)


def _in_older_format(path: Path) -> bool:
    meta = read_part_meta(path)
    return meta is not None and meta.get("version") != INDEX_VERSION


# ---------------------------------------------------------------- merging parts into one index


def first_appearance_ids(hashes: np.ndarray) -> np.ndarray:
    """Dense ids of equal values, numbered in order of first appearance."""
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def merge_parts(parts, total: int, alloc: Callable) -> dict[str, np.ndarray]:
    """Concatenate parts (an iterable of column dicts holding `total` rows) into arrays made by
    alloc(name, dtype, length), one part in memory at a time."""
    columns = {name: alloc(name, dtype, total) for name, dtype in COLUMNS.items()}
    hashes = {name: np.empty(total, np.uint64) for name in HASH_IDS}
    start = 0
    for part in parts:
        end = start + len(part["group_hash"])
        for name in (*COLUMNS, *HASH_IDS):
            (columns if name in COLUMNS else hashes)[name][start:end] = part[name]
        start = end
    if start != total:
        raise ValueError(f"parts hold {start} samples, expected {total}")
    for hash_name, id_name in HASH_IDS.items():
        columns[id_name] = alloc(id_name, np.int64, total)
        columns[id_name][:] = first_appearance_ids(hashes.pop(hash_name))
    return columns


def set_digest(shards: list[str]) -> str:
    return hashlib.sha1("\n".join(shards).encode()).hexdigest()[:16]


def _load_part_columns(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as part:
        return {name: part[name] for name in (*COLUMNS, *HASH_IDS)}


def write_set(root: Path, shards: list[str], metas: list[dict]) -> Path:
    """Merge the shards' parts into `<set>.<token>/` and publish it by replacing `<set>.json` atomically."""
    set_id = set_digest(shards)
    for stale in root.glob(f"{set_id}.*.tmp"):  # left by a killed merge
        shutil.rmtree(stale, ignore_errors=True)
    folder = root / f"{set_id}.{uuid.uuid4().hex[:8]}"
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True)

    def alloc(name, dtype, length):
        return np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=(length,))

    samples = [m["samples"] for m in metas]
    parts = (_load_part_columns(part_file(root, shard)) for shard in shards)
    columns = merge_parts(parts, sum(samples), alloc)
    for array in columns.values():
        array.flush()
    del columns
    np.save(tmp / "shard_start.npy", np.concatenate([[0], np.cumsum(samples, dtype=np.int64)]))
    os.rename(tmp, folder)
    meta = {
        "version": INDEX_VERSION,
        "columns": folder.name,
        "shards": shards,
        "stamps": [m["stamp"] for m in metas],
        "samples": samples,
        "truncated": [m["truncated"] for m in metas],
    }
    _atomic_write(root / f"{set_id}.json", lambda f: f.write(json.dumps(meta).encode()))
    for old in root.glob(f"{set_id}.*"):
        if old.is_dir() and old.name != folder.name and not old.name.endswith(".tmp"):
            shutil.rmtree(old, ignore_errors=True)  # processes mapping it keep their pages until they close
    return root / f"{set_id}.json"


# ---------------------------------------------------------------- the index


@dataclass
class SampleIndex:
    """Rows of every sample of a shard list; arrays are memory-mapped when `location` is set."""

    shards: list[str]
    truncated: list[int]
    shard_start: np.ndarray  # [num_shards + 1]: the rows of shard s are shard_start[s]:shard_start[s + 1]
    image_block: np.ndarray
    image_size: np.ndarray
    text_block: np.ndarray
    text_size: np.ndarray
    json_block: np.ndarray
    json_size: np.ndarray
    group_id: np.ndarray
    caption_id: np.ndarray
    location: str | None = None

    def __len__(self) -> int:
        return int(self.shard_start[-1])

    def shard_of(self, row: int) -> int:
        return int(np.searchsorted(self.shard_start, row, side="right")) - 1

    def sample(self, row: int) -> tuple[int, tuple[int, int], tuple[int, int]]:
        """(shard number, (image offset, size), (caption offset, size)); size -1 for a missing member."""
        image = (int(self.image_block[row]) * BLOCK, int(self.image_size[row]))
        text = (int(self.text_block[row]) * BLOCK, int(self.text_size[row]))
        return self.shard_of(row), _missing_as_negative(image), _missing_as_negative(text)

    def json_member(self, row: int) -> tuple[int, int]:
        """(offset, size) of the sample's KEY.json; size -1 when it has none."""
        return _missing_as_negative((int(self.json_block[row]) * BLOCK, int(self.json_size[row])))

    def anchor_offset(self, row: int) -> int:
        """Data offset of a member of the sample (its image, else another): its tar header holds the key."""
        return int(self.image_block[row]) * BLOCK

    def __getstate__(self):
        if self.location is None:
            return dict(self.__dict__)
        return {"shards": self.shards, "truncated": self.truncated, "location": self.location}

    def __setstate__(self, state):
        if "group_id" not in state:
            state = {**state, **load_columns(Path(state["location"]))}
        self.__dict__.update(state)


def _missing_as_negative(member: tuple[int, int]) -> tuple[int, int]:
    return (member[0], -1) if member[1] == MISSING else member


def load_columns(folder: Path) -> dict[str, np.ndarray]:
    """Memory-mapped columns. The id columns are mapped copy-on-write: writable arrays (torch wraps them without
    complaint) whose pages stay shared with every other process unless someone writes to them."""
    columns = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in (*COLUMNS, "shard_start")}
    for name in HASH_IDS.values():
        columns[name] = np.load(folder / f"{name}.npy", mmap_mode="c")
    return columns


def _stale_shards(shards: list[str], stamps: list[dict]) -> list[str]:
    """Local shards whose size or mtime no longer match the index (remote ones are trusted: a HEAD request per
    shard per rank would cost more than the index saves; re-run scripts/index_shards.py after changing them)."""
    stale = []
    for shard, stamp in zip(shards, stamps):
        if is_url(shard):
            continue
        try:
            if shard_stamp(shard) != stamp:
                stale.append(shard)
        except OSError:
            stale.append(shard)
    return stale


def open_index(root: str | Path, shards: list[str], verify: bool = True) -> SampleIndex | None:
    """The index of exactly these shards under root, or None when there is none or it is out of date."""
    root = Path(root)
    for _ in range(2):  # a concurrent rebuild may remove the columns between reading the meta and mapping them
        try:
            meta = json.loads((root / f"{set_digest(shards)}.json").read_text())
        except (OSError, ValueError):
            return None
        if meta.get("version") != INDEX_VERSION:
            log.warning("index %s is in format %s, this release reads format %d (caption ids added): building it "
                        "again", root, meta.get("version"), INDEX_VERSION)  # fmt: skip
            return None
        if meta.get("shards") != shards:
            return None
        if verify:
            stale = _stale_shards(shards, meta["stamps"])
            if stale:
                log.info("index %s is out of date for %d shard(s), e.g. %s", root, len(stale), stale[0])
                return None
        try:
            columns = load_columns(root / meta["columns"])
        except FileNotFoundError:
            continue
        return SampleIndex(shards, meta["truncated"], location=str(root / meta["columns"]), **columns)
    return None


# ---------------------------------------------------------------- building


def _index_parts(todo: list[str], root: Path, workers: int, progress: bool) -> None:
    """Write the parts of `todo`, in parallel when workers > 1; each part is published as soon as it is done,
    so a killed run resumes where it stopped."""
    bar = tqdm(total=len(todo), desc="indexing shards", unit="shard", disable=not progress)
    try:
        if workers <= 1:
            for shard in todo:
                write_part(shard, part_file(root, shard))
                bar.update()
            return
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(write_part, shard, part_file(root, shard)) for shard in todo]
            for future in as_completed(futures):
                future.result()
                bar.update()
    finally:
        bar.close()


def build_index(shards: list[str], root: str | Path, workers: int = 1, progress: bool = True) -> SampleIndex:
    """Index the shards whose part is missing or out of date, then merge all parts into the set's index."""
    root = Path(root)
    (root / "parts").mkdir(parents=True, exist_ok=True)
    for stale in (root / "parts").glob("*.tmp"):  # left by a killed run (one builder per index folder at a time)
        stale.unlink(missing_ok=True)
    todo = [s for s in shards if not _part_is_current(part_file(root, s), s)]
    if len(todo) < len(shards):
        log.info("%d of %d shards already indexed under %s", len(shards) - len(todo), len(shards), root)
    older = sum(_in_older_format(part_file(root, s)) for s in todo)
    if older:
        log.warning("%d shard(s) under %s were indexed in an older format (this release writes format %d): "
                    "indexing them again", older, root, INDEX_VERSION)  # fmt: skip
    _index_parts(todo, root, workers, progress)
    metas = [read_part_meta(part_file(root, s)) for s in shards]
    write_set(root, shards, metas)
    return open_index(root, shards, verify=False)


def build_in_memory(shards: list[str], progress: bool = True) -> SampleIndex:
    """The index held in this process only: for when no index folder is writable."""
    built = [build_part(s) for s in tqdm(shards, desc="indexing shards", unit="shard", disable=not progress)]
    samples = [meta["samples"] for meta, _ in built]
    columns = merge_parts((c for _, c in built), sum(samples), lambda name, dtype, n: np.empty(n, dtype))
    start = np.concatenate([[0], np.cumsum(samples, dtype=np.int64)])
    return SampleIndex(shards, [meta["truncated"] for meta, _ in built], start, **columns)


def default_roots(shards: list[str]) -> list[Path]:
    """Index folders to look in and write to, in order: beside local shards, then the user cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gritvlp" / "index"
    if any(is_url(s) for s in shards):
        common = os.path.commonprefix(shards).rsplit("/", 1)[0]
    else:
        common = os.path.commonpath([os.path.dirname(local_path(s)) for s in shards])
    user = cache / f"{hashlib.sha1(common.encode()).hexdigest()[:16]}-{Path(common).name or 'root'}"
    return [user] if any(is_url(s) for s in shards) else [Path(common) / ".gritvlp-index", user]


def _writable(root: Path) -> bool:
    try:
        (root / "parts").mkdir(parents=True, exist_ok=True)
        probe = root / f".probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def load_index(shards: list[str], index_dir: str | Path | None = None, progress: bool = True) -> SampleIndex:
    """The shards' index from index_dir (default: beside the shards, else the user cache), built there first (the
    folder created as needed) when missing or out of date (a shard changed, or an older index format); held in
    memory when no folder is writable."""
    roots = [Path(index_dir).expanduser()] if index_dir else default_roots(shards)
    for root in roots:
        index = open_index(root, shards)
        if index is not None:
            return index
    for root in roots:
        if _writable(root):
            return build_index(shards, root, progress=progress)
    log.warning("no writable index folder among %s; the index is held in memory and rebuilt next time", roots)
    return build_in_memory(shards, progress)
