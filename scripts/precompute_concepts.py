#!/usr/bin/env python
"""Precompute concept-distillation targets: a frozen timm teacher labels every image of a shard set once, so
training does not run it.

    python scripts/precompute_concepts.py '/data/cc3m/{00000..00331}.tar' --teacher vit_large_patch16_224 \
        --weights /models/vit_large.safetensors --topk 32 --out /data/cc3m_concepts

Writes a new shard set under --out, one tar per input tar with the same name: every member is copied as it is,
except KEY.json, which gains {"concepts": {"teacher": NAME, "ids": [...], "probs": [...]}} (the teacher's top-k
classes and their softmax probabilities at temperature 1, highest first; without --topk every class). A sample
without KEY.json gets one; an undecodable image gets no concepts (counted). Inputs are only read. Each output is
written to a hidden temporary file and renamed into place when complete, so a killed run leaves no half-written
shard; a rerun skips the shards already written. The teacher sees each image through its own evaluation transform
(timm's: resize, centre crop, its normalisation).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import os
import sys
import tarfile
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from gritvlp.data.shards import expand_shards
from gritvlp.model.concepts import build_teacher_model, teacher_transform

log = logging.getLogger("precompute_concepts")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", help="input shards: brace pattern, glob or folder ('::'-separated lists too)")
    parser.add_argument("--teacher", required=True, help="timm model name of the teacher")
    parser.add_argument("--weights", required=True, help="local teacher checkpoint (.safetensors, .pth, .bin)")
    parser.add_argument(
        "--teacher-kwargs", type=json.loads, default={}, help="timm kwargs as JSON, e.g. '{\"depth\": 6}'"
    )
    parser.add_argument("--topk", type=int, default=None, help="keep the k most probable classes (default: all)")
    parser.add_argument("--out", required=True, type=Path, help="folder of the new shard set")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.topk is not None and args.topk < 1:
        parser.error("--topk must be >= 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return args


# -- reading and writing samples ------------------------------------------------------------------------------------
def member_key_ext(name: str) -> tuple[str, str] | None:
    """'dir/000001.jpg' -> ('dir/000001', 'jpg'), as webdataset splits names; None for a name without extension."""
    folder, base = os.path.split(name)
    if "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return os.path.join(folder, stem), ext.lower()


def tar_samples(tar: tarfile.TarFile):
    """Consecutive members sharing a key, as lists of (TarInfo, bytes); members that are no file come alone."""
    sample, key = [], None
    for info in tar:
        data = tar.extractfile(info).read() if info.isfile() else None
        parsed = member_key_ext(info.name) if info.isfile() else None
        this_key = parsed[0] if parsed else None
        if sample and (this_key is None or this_key != key):
            yield sample
            sample = []
        sample.append((info, data))
        key = this_key
    if sample:
        yield sample


def sample_image(sample) -> Image.Image | None:
    for info, data in sample:
        parsed = member_key_ext(info.name)
        if parsed and parsed[1] in IMAGE_EXTS:
            try:
                with Image.open(io.BytesIO(data)) as image:
                    return image.convert("RGB")
            except Exception:  # PIL raises many types for bad bytes
                return None
    return None


def with_concepts(sample, concepts: dict) -> list:
    """The sample's members with KEY.json carrying `concepts` (added when the sample has no KEY.json)."""
    out, has_json = [], False
    for info, data in sample:
        parsed = member_key_ext(info.name)
        if parsed and parsed[1] == "json":
            has_json = True
            meta = json.loads(data)
            meta["concepts"] = concepts
            data = json.dumps(meta).encode()
            info = copy.copy(info)
            info.size = len(data)
        out.append((info, data))
    if not has_json:
        first = sample[0][0]
        info = tarfile.TarInfo(f"{member_key_ext(first.name)[0]}.json")
        data = json.dumps({"concepts": concepts}).encode()
        info.size, info.mtime, info.mode = len(data), first.mtime, first.mode
        out.append((info, data))
    return out


# -- the teacher ----------------------------------------------------------------------------------------------------
class Labeller:
    def __init__(self, name: str, weights: str, kwargs: dict, topk: int | None, device: str):
        self.name, self.device = name, torch.device(device)
        self.model = build_teacher_model(name, weights, kwargs).to(self.device)
        self.transform = teacher_transform(self.model)
        self.topk = min(topk or self.model.num_classes, self.model.num_classes)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> list[dict]:
        batch = torch.stack([self.transform(image) for image in images]).to(self.device)
        probs = torch.softmax(self.model(batch).float(), dim=1)
        top = probs.topk(self.topk, dim=1)
        return [
            {"teacher": self.name, "ids": ids, "probs": [round(p, 6) for p in values]}
            for ids, values in zip(top.indices.tolist(), top.values.tolist())
        ]


def labelled(samples, labeller: Labeller, batch_size: int, stats: dict):
    """The samples, in order, each with its members (KEY.json carrying concepts where the image decodes)."""
    pending = []

    def flush():
        images = [sample_image(sample) for sample in pending]
        ok = [i for i, image in enumerate(images) if image is not None]
        concepts = dict(zip(ok, labeller([images[i] for i in ok]))) if ok else {}
        stats["labelled"] += len(ok)
        stats["undecodable"] += len(pending) - len(ok)
        for i, sample in enumerate(pending):
            yield with_concepts(sample, concepts[i]) if i in concepts else sample

    for sample in samples:
        is_sample = sample[0][1] is not None and member_key_ext(sample[0][0].name)
        if not is_sample:
            yield from flush()
            pending = []
            yield sample
            continue
        pending.append(sample)
        if len(pending) == batch_size:
            yield from flush()
            pending = []
    yield from flush()


# -- shards ---------------------------------------------------------------------------------------------------------
def write_shard(source: str, target: Path, labeller: Labeller, batch_size: int, bar, stats: dict) -> None:
    """source -> target through a hidden temporary file, renamed into place once complete and on disk."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed run
        stale.unlink()
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with tarfile.open(source) as tar_in, open(temporary, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w") as tar_out:
                for sample in labelled(tar_samples(tar_in), labeller, batch_size, stats):
                    for info, data in sample:
                        tar_out.addfile(info, io.BytesIO(data) if data is not None else None)
                    bar.update(1)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def plan(shards: list[str], out: Path) -> list[tuple[str, Path]]:
    targets = [(shard, out / Path(shard).name) for shard in shards]
    names = [target.name for _, target in targets]
    if len(set(names)) != len(names):
        raise ValueError("input shards from different folders share a file name; process them into separate --out")
    for shard, target in targets:
        if target.resolve() == Path(shard).resolve():
            raise ValueError(f"--out would overwrite the input {shard}: choose another folder")
    return targets


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shards = expand_shards(args.shards)
    if any("://" in shard for shard in shards):
        sys.exit("error: only local shards are supported")
    args.out.mkdir(parents=True, exist_ok=True)
    targets = plan(shards, args.out)
    todo = [(shard, target) for shard, target in targets if not target.exists()]
    log.info("%d shards, %d already written in %s", len(targets), len(targets) - len(todo), args.out)
    labeller = Labeller(args.teacher, args.weights, args.teacher_kwargs, args.topk, args.device)
    stats = {"shards": 0, "labelled": 0, "undecodable": 0}
    with tqdm(unit="sample", desc="concepts", dynamic_ncols=True) as bar:
        for shard, target in todo:
            bar.set_postfix(shard=Path(shard).name)
            write_shard(shard, target, labeller, args.batch_size, bar, stats)
            stats["shards"] += 1
    log.info("%d shards written: %d samples labelled, %d undecodable images left without concepts",
             stats["shards"], stats["labelled"], stats["undecodable"])  # fmt: skip
    return stats


if __name__ == "__main__":
    main()
