"""Map-style random access to img2dataset tar shards through a memory-mapped sample index.

The GRIT sampler hands each rank arbitrary dataset indices, so samples are read by offset (pread locally, a ranged
request on object storage) from uncompressed tars instead of streaming them. The index (gritvlp.data.index) is
built once per shard list, by scripts/index_shards.py or by the first process that needs it, and then mapped by
every process: opening it costs milliseconds and no per-sample memory.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import math
import os
import tarfile
from collections.abc import Sequence

import torch
from braceexpand import braceexpand
from PIL import Image

from gritvlp.data.index import BLOCK, SampleIndex, key_of_member, load_index
from gritvlp.data.remote import ShardReader, filesystem, glob_remote, is_url, local_path
from gritvlp.data.text import clean_caption
from gritvlp.data.transforms import UndecodableImage, decode_rgb

log = logging.getLogger("gritvlp.data")

_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


def expand_shards(spec: str | list[str]) -> list[str]:
    """'::'-separated entries, each a brace pattern, a glob or a folder (its *.tar); local paths or URLs
    (s3://, gs://, https://, ...). Sorted, de-duplicated."""
    entries = spec.split("::") if isinstance(spec, str) else list(spec)
    found = set()
    for entry in entries:
        matched = []
        for path in braceexpand(os.path.expanduser(entry.strip())):
            matched += _expand_remote(path) if is_url(path) else _expand_local(local_path(path), entry)
        if not matched:
            raise FileNotFoundError(f"no shard matches {entry!r}")
        for path in matched:
            if path.endswith(_COMPRESSED):
                raise ValueError(f"{path}: compressed tars allow no random access; use plain .tar shards")
        found.update(matched)
    return sorted(found)


def _expand_local(path: str, entry: str) -> list[str]:
    if os.path.isdir(path):
        matched = glob.glob(os.path.join(path, "*.tar"))
    elif any(c in path for c in "*?["):
        matched = [p for p in glob.glob(path) if p.endswith(".tar")]  # skip img2dataset's sidecars
    elif os.path.isfile(path):
        matched = [path]
    else:
        raise FileNotFoundError(f"shard {path!r} of pattern {entry!r} does not exist")
    return [os.path.abspath(p) for p in matched]


def _expand_remote(url: str) -> list[str]:
    """Globs are listed; plain URLs are taken as they are (a request per shard would slow every start-up)."""
    if any(c in url.split("://", 1)[1] for c in "*?["):
        return [u for u in glob_remote(url) if u.endswith(".tar")]
    return [url]


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends only on (seed, epoch, index): resumed runs redraw the same augmentations."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SampleKeys(Sequence):
    """Sample keys, read on demand from the tar header in front of one of the sample's members (only logs need
    them, so the index does not store them)."""

    def __init__(self, index: SampleIndex, reader: ShardReader):
        self._index, self._reader = index, reader

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, row: int) -> str:
        if not 0 <= row < len(self._index):
            raise IndexError(row)
        shard_id, offset = self._index.shard_of(row), self._index.anchor_offset(row)
        header = self._reader.read(shard_id, offset - BLOCK, BLOCK)
        try:
            info = tarfile.TarInfo.frombuf(header, tarfile.ENCODING, "surrogateescape")
        except tarfile.TarError:
            return f"<row {row}>"
        if b"\0" not in header[:100]:  # a full name field: the real name may be longer, in a GNU/pax header
            return self._key_by_scan(shard_id, offset) or key_of_member(info.name)
        return key_of_member(info.name)

    def _key_by_scan(self, shard_id: int, offset: int) -> str | None:
        shard = self._reader.shards[shard_id]
        if is_url(shard):
            fs, path = filesystem(shard)
            opener = fs.open(path, "rb")
        else:
            opener = open(local_path(shard), "rb")
        with opener as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                if info.offset_data == offset:
                    return key_of_member(info.name)
        return None


def well_formed_concepts(concepts) -> bool:
    """What the Collator turns into concept and attribute rows: a dict with objects, attributes or both. Objects:
    "ids": [int >= 0, ...] and "probs": [finite number >= 0, ...], as many of each (at least one). Attributes:
    "attributes": [int >= 0, ...] (may be empty: no attribute applies) and optionally "attribute_probs", as many
    numbers in [0, 1]."""
    if not isinstance(concepts, dict) or not ("ids" in concepts or "attributes" in concepts):
        return False
    objects = "ids" in concepts or "probs" in concepts
    if objects and not _well_formed_objects(concepts.get("ids"), concepts.get("probs")):
        return False
    if "attributes" in concepts or "attribute_probs" in concepts:
        return _well_formed_attributes(concepts.get("attributes"), concepts.get("attribute_probs"))
    return True


def _well_formed_objects(ids, probs) -> bool:
    if not (isinstance(ids, list) and isinstance(probs, list) and 0 < len(ids) == len(probs)):
        return False
    return all(_is_id(i) for i in ids) and all(_is_probability(p) for p in probs)


def _well_formed_attributes(ids, probs) -> bool:
    if not isinstance(ids, list) or not all(_is_id(i) for i in ids):
        return False
    if probs is None:
        return True
    return isinstance(probs, list) and len(probs) == len(ids) and all(_is_probability(p) and p <= 1 for p in probs)


def _is_id(value) -> bool:
    return type(value) is int and value >= 0


def _is_probability(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value >= 0


class ShardDataset(torch.utils.data.Dataset):
    """Samples of img2dataset tars by global index (shards concatenated in sorted order).

    Returns {"image", "caption", "index", "group_id", "caption_id"}, or None for a corrupt sample (logged, never
    raised). group_ids: samples showing the same image (same image_id in KEY.json, else same image bytes) share an
    id; caption_ids: samples whose normalised captions are identical share an id.
    index_dir: where the sample index lives (default: `.gritvlp-index` in the shards' common folder, else the user
    cache); it is built there (the folder created) when missing or out of date.
    read_concepts: also read KEY.json and return its "concepts" field (scripts/precompute_concepts.py's teacher
    targets and attribute labels) under "concepts"; off, no KEY.json byte is read. A sample whose KEY.json is missing, lacks the field or
    is broken comes without "concepts" (a broken one is logged once per process), never as None.
    """

    def __init__(
        self,
        shards: str | list[str],
        transform,
        max_words: int = 30,
        seed: int = 0,
        index_dir=None,
        read_concepts: bool = False,
    ):
        self.shards = expand_shards(shards)
        self.transform, self.max_words, self.seed, self.epoch = transform, max_words, seed, 0
        self.read_concepts, self._logged_broken_concepts = read_concepts, False
        self.index = load_index(self.shards, index_dir, progress=len(self.shards) > 4)
        for shard, lost in zip(self.shards, self.index.truncated):
            if lost:
                log.warning("%s is truncated or corrupt: %d incomplete sample(s) dropped", shard, lost)
        self.num_truncated = sum(self.index.truncated)
        self._reader = ShardReader(self.shards)
        self._attach_views()

    def _attach_views(self) -> None:
        self.group_ids = torch.from_numpy(self.index.group_id)  # shares the mapped pages: no copy per rank
        self.caption_ids = torch.from_numpy(self.index.caption_id)
        self.keys = SampleKeys(self.index, self._reader)

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict | None:
        index = int(index)
        if not 0 <= index < len(self.index):
            raise IndexError(f"index {index} out of range for {len(self.index)} samples")
        shard_id, image_span, text_span = self.index.sample(index)
        if text_span[1] < 0:
            return self._bad(index, "no caption (.txt)")
        if image_span[1] < 0:
            return self._bad(index, "no image member")
        json_span = self.index.json_member(index) if self.read_concepts else (0, -1)
        spans = [image_span, text_span] + ([json_span] if json_span[1] >= 0 else [])
        image_bytes, text_bytes, *json_bytes = self._reader.read_ranges(shard_id, spans)
        caption = clean_caption(text_bytes.decode("utf-8", "replace"), self.max_words)
        if not caption:
            return self._bad(index, "empty caption")
        with torch.random.fork_rng(devices=[]):
            # default_generator only: torch.manual_seed would also reseed the trainer's CUDA generators
            torch.default_generator.manual_seed(augmentation_seed(self.seed, self.epoch, index))
            try:
                image = self._open_image(image_bytes)
                # data.image_decode=device: the transform passes the bytes on (gritvlp.data.encoded_images)
                takes_bytes = getattr(self.transform, "takes_bytes", False)
                image = self.transform(image, image_bytes) if takes_bytes else self.transform(image)
            except UndecodableImage as err:
                return self._bad(index, f"undecodable image ({err})")
        sample = {"image": image, "caption": caption, "index": index, "group_id": int(self.group_ids[index]),
                  "caption_id": int(self.caption_ids[index])}  # fmt: skip
        concepts = self._concepts(index, json_bytes[0]) if json_bytes else None
        return {**sample, "concepts": concepts} if concepts is not None else sample

    def _concepts(self, index: int, data: bytes) -> dict | None:
        """The "concepts" field of KEY.json; None when there is none, or when it is broken (logged once)."""
        try:
            meta = json.loads(data)
        except (ValueError, RecursionError) as err:  # ValueError covers bad UTF-8 and a shard that shrank (b"")
            return self._broken_concepts(index, f"unreadable KEY.json ({type(err).__name__})")
        concepts = meta.get("concepts") if isinstance(meta, dict) else None
        if concepts is None or well_formed_concepts(concepts):
            return concepts
        return self._broken_concepts(index, "malformed 'concepts' in KEY.json")

    def _broken_concepts(self, index: int, reason: str) -> None:
        if not self._logged_broken_concepts:  # a whole shard set may share the flaw: one line, not one per sample
            self._logged_broken_concepts = True
            log.warning("sample %s of %s: %s; left without concept targets (further such samples in this "
                        "process are not logged)", self.keys[index], self.shards[self.index.shard_of(index)],
                        reason)  # fmt: skip
        return None

    def _open_image(self, data: bytes) -> Image.Image:
        """The opened image: left undecoded for a transform that decodes it itself (at the size it needs)."""
        try:
            image = Image.open(io.BytesIO(data))
        except Exception as err:  # PIL raises many types for bad bytes
            raise UndecodableImage(str(err) or type(err).__name__) from err
        return image if getattr(self.transform, "decodes_lazily", False) else decode_rgb(image)

    def _bad(self, index: int, reason: str) -> None:
        log.warning("skipping sample %s of %s: %s", self.keys[index], self.shards[self.index.shard_of(index)], reason)
        return None

    def close(self) -> None:
        self._reader.close()

    def __getstate__(self):
        state = dict(self.__dict__)
        for view in ("group_ids", "caption_ids", "keys"):  # rebuilt over the unpickled index, which maps the files
            state.pop(view)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._attach_views()
