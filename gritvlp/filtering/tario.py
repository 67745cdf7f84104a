"""Sample-wise streaming of img2dataset tar shards: read KEY.* member groups, write kept ones back unchanged."""

from __future__ import annotations

import copy
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # "dir/KEY.ext.more" -> key "dir/KEY", ext "ext.more"


@dataclass
class Sample:
    key: str
    members: list[tuple[tarfile.TarInfo, bytes]] = field(default_factory=list)

    def member(self, *exts: str) -> bytes | None:
        """Data of the first member whose extension (case-folded) is one of exts."""
        for info, data in self.members:
            if _MEMBER.match(info.name).group(2).lower() in exts:
                return data
        return None

    def caption(self) -> str | None:
        text = self.member("txt")
        if text is not None:
            return text.decode("utf-8", errors="replace").strip() or None
        meta = self.member("json")
        try:
            caption = json.loads(meta).get("caption") if meta else None
        except (ValueError, AttributeError):
            return None
        return (caption.strip() or None) if isinstance(caption, str) else None

    def image(self) -> bytes | None:
        return self.member(*IMAGE_EXTS)


class SampleReader:
    """Iterates the samples of a shard in tar order. A truncated or corrupt tar ends the iteration early with
    `damaged` set; the sample being read at the damage is not yielded, as it may be incomplete."""

    def __init__(self, path: str):
        self.path = path
        self.damaged = False

    def __iter__(self):
        pending: Sample | None = None
        try:
            with tarfile.open(self.path, "r:") as tar:
                for info in tar:
                    match = _MEMBER.match(info.name) if info.isfile() else None
                    if match is None:
                        continue  # directories, links, names without an extension: not part of a sample
                    if pending is not None and pending.key != match.group(1):
                        yield pending  # complete: the next sample has begun
                        pending = None
                    data = tar.extractfile(info).read()
                    if len(data) != info.size:
                        raise tarfile.ReadError(f"{info.name}: data cut off")
                    pending = pending or Sample(match.group(1))
                    pending.members.append((info, data))
                end = tar.offset
            # tarfile stops quietly at a cut-off header; a sound tar has a zero block where it stopped
            with open(self.path, "rb") as f:
                f.seek(end)
                self.damaged = f.read(512) != bytes(512)
        except (tarfile.TarError, EOFError):  # not OSError: a missing file or a failing disk must stop the run
            self.damaged = True
        if pending is not None and not self.damaged:
            yield pending


class SampleWriter:
    """Appends samples to a new tar with their members' names, headers and bytes as read."""

    def __init__(self, path: str):
        self._file = open(path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)

    def write(self, sample: Sample) -> None:
        for info, data in sample.members:
            self._tar.addfile(copy.copy(info), io.BytesIO(data))

    def close(self) -> None:
        try:
            self._tar.close()
            # on disk before the caller renames it into place: a crash leaves no name or a whole shard
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
