"""ALBEF/COCO-style annotation JSON + image folder -> tar shards in img2dataset's layout."""

from __future__ import annotations

import io
import json
import logging
import os

import webdataset as wds
from PIL import Image
from tqdm import tqdm

log = logging.getLogger("gritvlp.data")
_EXTS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def _probe(path: str) -> tuple[bytes, str, int, int]:
    """The file's bytes, a member extension matching its real format, and its size (header read only)."""
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as img:
        ext = _EXTS.get(img.format) or os.path.splitext(path)[1].lstrip(".").lower() or "jpg"
        return data, ext, img.width, img.height


def write_shards_from_json(
    annotation_json: str, image_root: str, out_pattern: str, samples_per_shard: int = 10000, progress: bool = True
) -> dict:
    """[{"image": relative/path.jpg, "caption": str or [str, ...], optional "image_id"}] -> shards.

    One sample per caption; captions of one image share its image_id (default: the image path), which the
    dataset uses to group them. Image bytes are copied, not re-encoded. Returns {"samples", "shards", "skipped"},
    where skipped counts the samples (captions) lost to a missing or unreadable image.
    """
    with open(annotation_json) as f:
        entries = json.load(f)
    os.makedirs(os.path.dirname(out_pattern) or ".", exist_ok=True)
    samples = skipped = 0
    # fixed mtime: rewriting the same data gives the same bytes
    with wds.ShardWriter(out_pattern, maxcount=samples_per_shard, verbose=0, mtime=0, encoder=False) as sink:
        for entry in tqdm(entries, desc="writing shards", disable=not progress):
            captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
            try:
                data, ext, width, height = _probe(os.path.join(image_root, entry["image"]))
            except Exception as err:  # missing file, or bytes PIL cannot identify
                log.warning("skipping %s (%d caption(s)): %s", entry["image"], len(captions), err)
                skipped += len(captions)
                continue
            image_id = entry.get("image_id", entry["image"])
            for caption in captions:
                key = f"{samples:09d}"
                meta = {
                    "key": key,
                    "caption": caption,
                    "image_id": image_id,
                    "image": entry["image"],
                    "status": "success",
                    "width": width,
                    "height": height,
                }
                sink.write({"__key__": key, ext: data, "txt": caption.encode(), "json": json.dumps(meta).encode()})
                samples += 1
        shards = sink.shard
    return {"samples": samples, "shards": shards, "skipped": skipped}
