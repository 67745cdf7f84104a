"""Map-style random access to img2dataset tar shards through a cached per-tar index.

The GRIT sampler hands each rank arbitrary dataset indices, so samples are read by seek (pread) into
uncompressed tars instead of streaming them. Each tar is scanned once; the member offsets are cached
in `<shard>.idx.json` (or under ~/.cache/gritvlp when the shard's folder is read-only).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image
from tqdm import tqdm

from gritvlp.data.text import clean_caption

log = logging.getLogger("gritvlp.data")

INDEX_VERSION = 1
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_OPEN_FILES = 64  # per process; shards beyond this are closed least-recently-used first
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # "dir/KEY.ext.more" -> key "dir/KEY", ext "ext.more"


def expand_shards(spec: str | list[str]) -> list[str]:
    """'::'-separated entries, each a brace pattern, a glob or a folder (its *.tar). Sorted, de-duplicated."""
    entries = spec.split("::") if isinstance(spec, str) else list(spec)
    found = set()
    for entry in entries:
        matched = []
        for path in braceexpand(os.path.expanduser(entry.strip())):
            if os.path.isdir(path):
                matched += glob.glob(os.path.join(path, "*.tar"))
            elif any(c in path for c in "*?["):
                matched += [p for p in glob.glob(path) if p.endswith(".tar")]  # skip img2dataset's sidecars
            elif os.path.isfile(path):
                matched.append(path)
            else:
                raise FileNotFoundError(f"shard {path!r} of pattern {entry!r} does not exist")
        if not matched:
            raise FileNotFoundError(f"no shard matches {entry!r}")
        for path in matched:
            if path.endswith((".gz", ".bz2", ".xz", ".zst")):
                raise ValueError(f"{path}: compressed tars allow no random access; use plain .tar shards")
        found.update(os.path.abspath(p) for p in matched)
    return sorted(found)


# ---------------------------------------------------------------- index: built once per tar, cached as JSON


def _index_paths(shard: str) -> list[Path]:
    """Beside the tar first, then a per-user cache named after the tar's absolute path."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gritvlp" / "index"
    digest = hashlib.sha1(os.path.abspath(shard).encode()).hexdigest()[:16]
    return [Path(shard + ".idx.json"), cache / f"{digest}-{Path(shard).name}.idx.json"]


def _scan_members(shard: str, size: int) -> tuple[list[tuple[str, int, int]], bool]:
    """(name, data offset, data size) of every complete file member, and whether the tar is damaged."""
    members, damaged = [], False
    try:
        with tarfile.open(shard, "r:") as tar:
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
            with open(shard, "rb") as f:
                f.seek(end)
                damaged = f.read(512) != bytes(512)
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


def build_index(shard: str) -> dict:
    """Scan a tar: samples as [key, {ext: [offset, size]}, group key], plus how many samples its damage cost."""
    stat = os.stat(shard)
    members, damaged = _scan_members(shard, stat.st_size)
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
    fd = os.open(shard, os.O_RDONLY)
    try:
        rows = [[key, m, _group_key(fd, m)] for key, m in samples.items()]
    finally:
        os.close(fd)
    return {**_stamp(stat), "truncated": lost, "samples": rows}


def _stamp(stat: os.stat_result) -> dict:
    """What ties an index to one version of its tar: rewriting the tar changes its size or mtime."""
    return {"version": INDEX_VERSION, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def load_index(shard: str) -> dict:
    """The cached index when it matches the tar's size and mtime, else a fresh one (then cached)."""
    stamp = _stamp(os.stat(shard))
    paths = _index_paths(shard)
    for path in paths:
        try:
            index = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if all(index.get(k) == v for k, v in stamp.items()):
            return index
    index = build_index(shard)
    for path in paths:
        try:
            _write_json(path, index)
            break
        except OSError:
            continue
    else:
        log.warning("could not cache the index of %s anywhere; it will be rebuilt next time", shard)
    return index


def _write_json(path: Path, obj) -> None:
    """Atomic write, so that ranks indexing the same shard at once never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, separators=(",", ":")))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- the dataset


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends only on (seed, epoch, index): resumed runs redraw the same augmentations."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ShardDataset(torch.utils.data.Dataset):
    """Samples of img2dataset tars by global index (shards concatenated in sorted order).

    Returns {"image", "caption", "index", "group_id"}, or None for a corrupt sample (logged, never raised).
    group_ids: samples showing the same image (same image_id in KEY.json, else same image bytes) share an id.
    """

    def __init__(self, shards: str | list[str], transform, max_words: int = 30, seed: int = 0):
        self.shards = expand_shards(shards)
        self.transform, self.max_words, self.seed, self.epoch = transform, max_words, seed, 0
        self.keys: list[str] = []
        self.num_truncated = 0
        shard_of, spans, groups = [], [], []
        show = len(self.shards) > 4
        for shard_id, shard in enumerate(tqdm(self.shards, desc="indexing shards", disable=not show)):
            index = load_index(shard)
            if index["truncated"]:
                log.warning("%s is truncated or corrupt: %d incomplete sample(s) dropped", shard, index["truncated"])
            self.num_truncated += index["truncated"]
            for key, members, group in index["samples"]:
                ext = next((e for e in IMAGE_EXTS if e in members), None)
                self.keys.append(key)
                shard_of.append(shard_id)
                spans.append((*members.get(ext, (0, -1)), *members.get("txt", (0, -1))))
                groups.append(group)
        self._shard_of = np.asarray(shard_of, dtype=np.int32)
        self._spans = np.asarray(spans, dtype=np.int64).reshape(-1, 4)  # image offset, size, caption offset, size
        dense: dict[str, int] = {}
        ids = [dense.setdefault(g if g is not None else f"none:{i}", len(dense)) for i, g in enumerate(groups)]
        self.group_ids = torch.tensor(ids, dtype=torch.long)
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.keys)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict | None:
        index = int(index)
        if not 0 <= index < len(self.keys):
            raise IndexError(f"index {index} out of range for {len(self.keys)} samples")
        shard_id = int(self._shard_of[index])
        img_off, img_len, txt_off, txt_len = (int(v) for v in self._spans[index])
        if txt_len < 0:
            return self._bad(index, "no caption (.txt)")
        if img_len < 0:
            return self._bad(index, "no image member")
        caption = clean_caption(self._read(shard_id, txt_off, txt_len).decode("utf-8", "replace"), self.max_words)
        if not caption:
            return self._bad(index, "empty caption")
        try:
            with Image.open(io.BytesIO(self._read(shard_id, img_off, img_len))) as img:
                image = img.convert("RGB")
        except Exception as err:  # PIL raises many types for bad bytes
            return self._bad(index, f"undecodable image ({err})")
        with torch.random.fork_rng(devices=[]):
            # default_generator only: torch.manual_seed would also reseed the trainer's CUDA generators
            torch.default_generator.manual_seed(augmentation_seed(self.seed, self.epoch, index))
            image = self.transform(image)
        return {"image": image, "caption": caption, "index": index, "group_id": int(self.group_ids[index])}

    def _bad(self, index: int, reason: str) -> None:
        log.warning("skipping sample %s of %s: %s", self.keys[index], self.shards[self._shard_of[index]], reason)
        return None

    def _read(self, shard_id: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # forked DataLoader worker: open its own descriptors
            for inherited in self._fds.values():
                os.close(inherited)
            self._fds, self._pid = OrderedDict(), os.getpid()
        fd = self._fds.get(shard_id)
        if fd is None:
            if len(self._fds) >= MAX_OPEN_FILES:
                os.close(self._fds.popitem(last=False)[1])
            fd = self._fds[shard_id] = os.open(self.shards[shard_id], os.O_RDONLY)
        self._fds.move_to_end(shard_id)
        data = os.pread(fd, size, offset)  # pread: no shared file position, safe across threads
        return data if len(data) == size else b""  # a shard shrunk since indexing: reads as undecodable

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"], state["_pid"] = OrderedDict(), None
        return state
