"""Byte ranges of shards, local or on object storage (s3://, gs://, https://, any fsspec protocol).

Local files are read with os.pread (no Python-level buffering, no shared file position); URLs are read with one
ranged request per call through fsspec, whose credentials come from the usual environment (AWS_* / ~/.aws for
s3fs, Application Default Credentials for gcsfs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator

log = logging.getLogger("gritvlp.data")

MAX_OPEN_FILES = 64  # per process; shards beyond this are closed least-recently-used first
COALESCE_GAP = 64 * 1024  # ranges of one remote shard closer than this are fetched in one request
FETCH_ATTEMPTS = 3
_VERSION_FIELDS = ("ETag", "etag", "mtime", "LastModified", "last_modified", "updated", "generation")


def is_url(path: str) -> bool:
    """A remote shard: any 'protocol://' except file://."""
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL."""
    import fsspec  # imported on first remote use: local-only runs never load it

    return fsspec.core.url_to_fs(url)


def shard_stamp(shard: str) -> dict:
    """What ties an index to one version of a shard: its size, and its mtime (local) or version tag (remote)."""
    if not is_url(shard):
        stat = os.stat(local_path(shard))
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    fs, path = filesystem(shard)
    info = fs.info(path)
    version = next((str(info[k]) for k in _VERSION_FIELDS if info.get(k) is not None), None)
    return {"size": info.get("size"), "version": version}


def glob_remote(pattern: str) -> list[str]:
    """The URLs matching a remote glob pattern."""
    fs, path = filesystem(pattern)
    protocol = pattern.split("://", 1)[0]
    return [p if "://" in p else f"{protocol}://{p}" for p in fs.glob(path)]


@contextlib.contextmanager
def readable_copy(shard: str) -> Iterator[str]:
    """A local path holding the shard: itself, or a temporary download of a remote shard (one sequential read,
    far cheaper than a ranged request per member while indexing)."""
    if not is_url(shard):
        yield local_path(shard)
        return
    fs, path = filesystem(shard)
    with tempfile.TemporaryDirectory(prefix="gritvlp-shard-") as tmp:
        target = os.path.join(tmp, "shard.tar")
        fs.get_file(path, target)
        yield target


class ShardReader:
    """Reads byte ranges of shards by shard number; safe to pickle and to use in forked DataLoader workers."""

    def __init__(self, shards: list[str]):
        self.shards = shards
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._remote: dict[str, tuple] = {}
        self._pid = os.getpid()

    def read(self, shard_id: int, offset: int, size: int) -> bytes:
        return self.read_ranges(shard_id, [(offset, size)])[0]

    def read_ranges(self, shard_id: int, ranges: list[tuple[int, int]]) -> list[bytes]:
        """The bytes of each (offset, size); b"" for a range the shard no longer holds (it shrank)."""
        self._after_fork()
        shard = self.shards[shard_id]
        if is_url(shard):
            return self._read_remote(shard, ranges)
        fd = self._fd(shard_id)
        out = []
        for offset, size in ranges:
            data = os.pread(fd, size, offset)
            out.append(data if len(data) == size else b"")
        return out

    def _after_fork(self) -> None:
        if self._pid != os.getpid():  # forked worker: descriptors and HTTP sessions are the parent's
            for inherited in self._fds.values():
                os.close(inherited)
            self._fds, self._remote, self._pid = OrderedDict(), {}, os.getpid()

    def _fd(self, shard_id: int) -> int:
        fd = self._fds.get(shard_id)
        if fd is None:
            if len(self._fds) >= MAX_OPEN_FILES:
                os.close(self._fds.popitem(last=False)[1])
            fd = self._fds[shard_id] = os.open(local_path(self.shards[shard_id]), os.O_RDONLY)
        self._fds.move_to_end(shard_id)
        return fd

    def _read_remote(self, url: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        protocol = url.split("://", 1)[0]
        if protocol not in self._remote:
            self._remote[protocol] = filesystem(url)[0]
        fs = self._remote[protocol]
        path = fs._strip_protocol(url)
        out: list[bytes] = [b""] * len(ranges)
        for group in _coalesce(ranges):
            start = min(ranges[i][0] for i in group)
            end = max(ranges[i][0] + ranges[i][1] for i in group)
            data = _fetch(fs, path, start, end)
            if len(data) > end - start:  # a server that ignored the Range header sent the whole object
                data = data[start:end]
            for i in group:
                offset, size = ranges[i]
                piece = data[offset - start : offset - start + size]
                out[i] = piece if len(piece) == size else b""
        return out

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds.clear()
        self._remote.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self):
        return {"shards": self.shards, "_fds": OrderedDict(), "_remote": {}, "_pid": None}


def _fetch(fs, path: str, start: int, end: int) -> bytes:
    """One ranged read, retried on transient errors; b"" (the sample reads as damaged, logged) when it keeps
    failing, so that a network blip costs samples rather than the run."""
    for attempt in range(FETCH_ATTEMPTS):
        try:
            return fs.cat_file(path, start=start, end=end)
        except FileNotFoundError as err:
            log.warning("cannot read %s: %s", path, err)
            return b""
        except Exception as err:  # fsspec back-ends raise their own types for network errors
            if attempt + 1 == FETCH_ATTEMPTS:
                log.warning("giving up on bytes %d-%d of %s: %s", start, end, path, err)
                return b""
            time.sleep(0.5 * 2**attempt)
    return b""


def _coalesce(ranges: list[tuple[int, int]]) -> list[list[int]]:
    """Indices of ranges grouped so that each group is one request: sorted, gaps under COALESCE_GAP merged."""
    groups: list[list[int]] = []
    end = None
    for i in sorted(range(len(ranges)), key=lambda i: ranges[i][0]):
        offset, size = ranges[i]
        if groups and offset - end <= COALESCE_GAP:
            groups[-1].append(i)
            end = max(end, offset + size)
        else:
            groups.append([i])
            end = offset + size
    return groups
