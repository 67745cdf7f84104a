#!/usr/bin/env python
"""Precompute concept-distillation targets: a frozen timm teacher labels every image of a shard set once, so
training does not run it; attribute labels can be added from the captions or from the teacher's classes.

    python scripts/precompute_concepts.py '/data/cc3m/{00000..00331}.tar' --teacher vit_large_patch16_224 \
        --weights /models/vit_large.safetensors --topk 32 --out /data/cc3m_concepts

Writes a new shard set under --out, one tar per input tar with the same name: every member is copied as it is,
except KEY.json, which gains {"concepts": {"teacher": NAME, "ids": [...], "probs": [...]}} (the teacher's top-k
classes and their softmax probabilities at temperature 1, highest first; without --topk every class). A sample
without KEY.json gets one; an undecodable image gets no concepts (counted). Fields of an existing "concepts" that
this run does not write are kept. Inputs are only read. Each output is written to a hidden temporary file and
renamed into place when complete, so a killed run leaves no half-written shard; a rerun skips the shards already
written. The teacher sees each image through its own evaluation transform (timm's: resize, centre crop, its
normalisation).

Attributes (for model.num_attributes; written as "concepts": {"attributes": [ids]}, sorted, possibly empty: a
sample with the field is labelled, each id present or absent, and the training loss is a binary cross-entropy):

  --attributes-from caption --attribute-vocab FILE
      FILE has one attribute per line (a word or a phrase; its line number, from 0, is its id). An attribute is
      present when it occurs as whole words in the caption, both normalised as training normalises captions
      (gritvlp.data.text: lower case, punctuation stripped). Every sample with a caption gets the field. --teacher
      is then optional: without it only attributes are written (for data whose object targets come from
      elsewhere, e.g. an earlier run of this script, whose "ids" / "probs" are kept) and images are not decoded.
  --attributes-from teacher-tags --teacher-attributes MAP.json
      MAP.json maps teacher class indices to attribute ids, {"417": [3, 12], ...} (classes not named carry no
      attribute): for a tagging teacher, or any teacher whose classes imply attributes. A sample's attributes are
      those of its teacher classes (among the top-k) with probability above --attribute-threshold (default 0.1).
      Needs --teacher; samples whose image does not decode get none.

Objects without a teacher (when no classifier fits the data, e.g. the built-in demo set):

  --object-vocab FILE
      FILE has one object per line (its line number its id), matched in the caption as attributes are. A sample's
      object distribution is uniform over the objects its caption names ("teacher": "caption"; set
      model.num_concepts to the line count); a caption naming none gets no object target. Replaces --teacher.

For soft labels, "concepts" may also carry "attribute_probs": [values in [0, 1]], one per id; this script writes
hard labels only.
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
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from gritvlp.data.shards import expand_shards
from gritvlp.data.text import clean_caption
from gritvlp.model.concepts import build_teacher_model, teacher_transform

log = logging.getLogger("precompute_concepts")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", help="input shards: brace pattern, glob or folder ('::'-separated lists too)")
    parser.add_argument("--teacher", help="timm model name of the teacher (optional with --attributes-from caption)")
    parser.add_argument("--weights", help="local teacher checkpoint (.safetensors, .pth, .bin)")
    parser.add_argument(
        "--teacher-kwargs", type=json.loads, default={}, help="timm kwargs as JSON, e.g. '{\"depth\": 6}'"
    )
    parser.add_argument("--topk", type=int, default=None, help="keep the k most probable classes (default: all)")
    parser.add_argument("--out", required=True, type=Path, help="folder of the new shard set")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attributes-from", choices=("caption", "teacher-tags"), help="write attribute labels too")
    parser.add_argument("--attribute-vocab", type=Path, help="caption: one attribute (word or phrase) per line")
    parser.add_argument("--teacher-attributes", type=Path, help="teacher-tags: JSON {class index: [attribute ids]}")
    parser.add_argument("--object-vocab", type=Path, help="objects named by the caption instead of a teacher's")
    parser.add_argument("--attribute-threshold", type=float, default=0.1,
                        help="teacher-tags: a class gives its attributes above this probability")  # fmt: skip
    args = parser.parse_args(argv)
    source = args.attributes_from
    if args.object_vocab is not None and args.teacher is not None:
        parser.error("--object-vocab replaces --teacher: give one of them")
    if args.teacher is None and args.object_vocab is None and source != "caption":
        parser.error("--teacher or --object-vocab is required (only --attributes-from caption runs without either)")
    if source == "teacher-tags" and args.teacher is None:
        parser.error("--attributes-from teacher-tags needs --teacher (the tags are the teacher's classes)")
    if (args.teacher is None) != (args.weights is None):
        parser.error("--teacher and --weights go together")
    if (source == "caption") != (args.attribute_vocab is not None):
        parser.error("--attribute-vocab goes with --attributes-from caption, and it needs one")
    if (source == "teacher-tags") != (args.teacher_attributes is not None):
        parser.error("--teacher-attributes goes with --attributes-from teacher-tags, and it needs one")
    if not 0 <= args.attribute_threshold < 1:
        parser.error("--attribute-threshold must lie in [0, 1)")
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


def sample_caption(sample) -> str | None:
    """The caption (.txt member) as training reads it, or None when the sample has none."""
    for info, data in sample:
        parsed = member_key_ext(info.name)
        if parsed and parsed[1] == "txt":
            return data.decode("utf-8", "replace")
    return None


def with_concepts(sample, concepts: dict) -> list:
    """The sample's members with KEY.json's "concepts" updated by `concepts` (KEY.json added when missing)."""
    out, has_json = [], False
    for info, data in sample:
        parsed = member_key_ext(info.name)
        if parsed and parsed[1] == "json":
            has_json = True
            meta = json.loads(data)
            meta["concepts"] = merged_concepts(meta.get("concepts"), concepts)
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


def merged_concepts(old, new: dict) -> dict:
    """An existing "concepts" updated with this run's fields; new attribute ids drop stale attribute_probs."""
    old = dict(old) if isinstance(old, dict) else {}
    if "attributes" in new:
        old.pop("attribute_probs", None)
    return {**old, **new}


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


# -- attributes -----------------------------------------------------------------------------------------------------
NO_LIMIT = sys.maxsize  # of clean_caption's words: attributes are matched in the whole caption


class CaptionAttributes:
    """Ids of the vocabulary's phrases (attributes, or objects) that occur as whole words in the normalised
    caption."""

    def __init__(self, vocab: Path):
        self.phrases = []
        for number, line in enumerate(vocab.read_text(encoding="utf-8").splitlines()):
            phrase = clean_caption(line, NO_LIMIT)
            if not phrase:
                raise ValueError(f"{vocab}, line {number + 1}: an empty attribute (each line's number is its id)")
            if phrase in self.phrases:
                first = self.phrases.index(phrase) + 1
                raise ValueError(f"{vocab}, line {number + 1}: '{phrase}' repeats line {first}")
            self.phrases.append(phrase)
        log.info("%d phrases from %s", len(self.phrases), vocab)

    def __call__(self, caption: str) -> list[int]:
        padded = f" {clean_caption(caption, NO_LIMIT)} "  # spaces around: only whole words match
        return [i for i, phrase in enumerate(self.phrases) if f" {phrase} " in padded]


class TeacherTagAttributes:
    """The attribute ids of the teacher's classes above a probability threshold, from a {class: [ids]} map."""

    def __init__(self, path: Path, num_classes: int, threshold: float):
        raw, self.threshold = json.loads(path.read_text(encoding="utf-8")), threshold
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a JSON object {{class index: [attribute ids]}}")
        self.by_class: dict[int, list[int]] = defaultdict(list)
        for key, ids in raw.items():
            if not (key.isdigit() and int(key) < num_classes):
                raise ValueError(f"{path}: '{key}' is not a class index of the teacher (0 to {num_classes - 1})")
            if not (isinstance(ids, list) and all(type(i) is int and i >= 0 for i in ids)):
                raise ValueError(f"{path}: class {key} must map to a list of attribute ids (integers >= 0)")
            self.by_class[int(key)] = ids

    def __call__(self, labels: dict) -> list[int]:
        found = set()
        for class_id, prob in zip(labels["ids"], labels["probs"]):
            if prob > self.threshold:
                found.update(self.by_class.get(class_id, ()))
        return sorted(found)


# -- labelling ------------------------------------------------------------------------------------------------------
class Annotator:
    """The new "concepts" fields of a batch of samples: the teacher's classes, attributes, or both."""

    def __init__(self, labeller: Labeller | None, captions: CaptionAttributes | None = None,
                 tags: TeacherTagAttributes | None = None, objects: CaptionAttributes | None = None):  # fmt: skip
        self.labeller, self.captions, self.tags, self.objects = labeller, captions, tags, objects

    def __call__(self, samples: list, stats: dict) -> list[dict]:
        found = [{} for _ in samples]
        if self.labeller is not None:
            images = [sample_image(sample) for sample in samples]
            ok = [i for i, image in enumerate(images) if image is not None]
            stats["undecodable"] += len(samples) - len(ok)
            for i, labels in zip(ok, self.labeller([images[i] for i in ok]) if ok else []):
                found[i].update(labels)
                if self.tags is not None:
                    found[i]["attributes"] = self.tags(labels)
        for i, sample in enumerate(samples):
            caption = sample_caption(sample) if self.captions is not None or self.objects is not None else None
            if caption is None:
                continue
            if self.captions is not None:
                found[i]["attributes"] = self.captions(caption)
            named = self.objects(caption) if self.objects is not None else []
            if named:  # uniform over the objects the caption names
                found[i].update({"teacher": "caption", "ids": named, "probs": [1.0 / len(named)] * len(named)})
        stats["labelled"] += sum(1 for concepts in found if concepts)
        if self.captions is not None or self.tags is not None:
            stats["with_attributes"] += sum(1 for concepts in found if concepts.get("attributes"))
        return found


def labelled(samples, annotate: Annotator, batch_size: int, stats: dict):
    """The samples, in order, each with its members (KEY.json carrying the concepts found for it)."""
    pending = []

    def flush():
        for sample, concepts in zip(pending, annotate(pending, stats) if pending else []):
            yield with_concepts(sample, concepts) if concepts else sample

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
def write_shard(source: str, target: Path, annotate: Annotator, batch_size: int, bar, stats: dict) -> None:
    """source -> target through a hidden temporary file, renamed into place once complete and on disk."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed run
        stale.unlink()
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with tarfile.open(source) as tar_in, open(temporary, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w") as tar_out:
                for sample in labelled(tar_samples(tar_in), annotate, batch_size, stats):
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


def annotator(args) -> Annotator:
    labeller = None
    if args.teacher is not None:
        labeller = Labeller(args.teacher, args.weights, args.teacher_kwargs, args.topk, args.device)
    captions = CaptionAttributes(args.attribute_vocab) if args.attributes_from == "caption" else None
    tags = None
    if args.attributes_from == "teacher-tags":
        tags = TeacherTagAttributes(args.teacher_attributes, labeller.model.num_classes, args.attribute_threshold)
    objects = CaptionAttributes(args.object_vocab) if args.object_vocab is not None else None
    return Annotator(labeller, captions, tags, objects)


def main(argv=None) -> dict:
    """Returns the counts: shards written, samples labelled (KEY.json given concepts), undecodable images (only
    decoded with a teacher) and, with --attributes-from, samples given at least one attribute."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shards = expand_shards(args.shards)
    if any("://" in shard for shard in shards):
        sys.exit("error: only local shards are supported")
    args.out.mkdir(parents=True, exist_ok=True)
    targets = plan(shards, args.out)
    todo = [(shard, target) for shard, target in targets if not target.exists()]
    log.info("%d shards, %d already written in %s", len(targets), len(targets) - len(todo), args.out)
    annotate = annotator(args)
    stats = {"shards": 0, "labelled": 0, "undecodable": 0}
    if args.attributes_from:
        stats["with_attributes"] = 0
    with tqdm(unit="sample", desc="concepts", dynamic_ncols=True) as bar:
        for shard, target in todo:
            bar.set_postfix(shard=Path(shard).name)
            write_shard(shard, target, annotate, args.batch_size, bar, stats)
            stats["shards"] += 1
    log.info("%d shards written: %d samples labelled, %d undecodable images left without teacher concepts%s",
             stats["shards"], stats["labelled"], stats["undecodable"],
             f", {stats['with_attributes']} samples with attributes" if args.attributes_from else "")  # fmt: skip
    return stats


if __name__ == "__main__":
    main()
