"""A small compositional image-caption set drawn with PIL, for CPU demos and tests.

Each scene holds 1-3 shapes (shape, colour, size) in the cells of a 3x3 grid; captions come from a tiny
grammar: "a small red circle", "a small red circle left of a large blue square",
"a large green triangle above a small yellow star and a small white diamond right of a large green triangle".
Every sample's KEY.json lists hard negatives that are false for its image: one attribute changed, or the two
sides of a relation swapped. Some images get a second caption stating a relation the other way round
("A left of B" / "B right of A"): same image bytes, same image_id. Some (shape, colour) pairs occur only
in the test split, so the test set probes unseen attribute combinations.

Horizontal flips turn "left of" into "right of": train on this set with hflip disabled. Small crop scales
can also cut objects out of view, so a high lower bound for RandomResizedCrop suits it better.
"""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw
from tqdm import tqdm

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 215, 40),
    "purple": (145, 65, 185),
    "orange": (245, 135, 25),
    "white": (240, 240, 240),
}
SIZES = ("small", "large")
# (shape, colour) pairs seen only in the test split: one per colour, 7 of the 35 pairs.
HELD_OUT = frozenset(
    {
        ("circle", "red"),
        ("triangle", "green"),
        ("star", "blue"),
        ("square", "yellow"),
        ("diamond", "purple"),
        ("circle", "orange"),
        ("triangle", "white"),
    }
)
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SECOND_CAPTION_RATE = 0.3  # share of multi-object scenes that get the relation stated the other way round too
MANIFEST_VERSION = 1


def describe(obj: dict) -> str:
    return f"a {obj['size']} {obj['colour']} {obj['shape']}"


def _relation(a: dict, b: dict) -> str | None:
    """How a stands to b when they share a row or a column (captions state only such unambiguous relations)."""
    if a["row"] == b["row"]:
        return "left of" if a["col"] < b["col"] else "right of"
    if a["col"] == b["col"]:
        return "above" if a["row"] < b["row"] else "below"
    return None


def _holds(objects: list[dict], a: str, rel: str | None, b: str | None) -> bool:
    """Is the clause true anywhere in the scene? Relations read loosely (any column/row order), so a
    negative is kept only when it is false under every reading."""
    for x in objects:
        if describe(x) != a:
            continue
        if rel is None:
            return True
        for y in objects:
            if y is not x and describe(y) == b:
                dx, dy = x["col"] - y["col"], x["row"] - y["row"]
                if {"left of": dx < 0, "right of": dx > 0, "above": dy < 0, "below": dy > 0}[rel]:
                    return True
    return False


def _random_object(rng: random.Random, held_out: bool | None) -> dict:
    """held_out: True -> a test-only (shape, colour) pair, False -> a training pair, None -> any pair."""
    while True:
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        if held_out is None or ((shape, colour) in HELD_OUT) == held_out:
            return {"shape": shape, "colour": colour, "size": rng.choice(SIZES)}


def _scene(rng: random.Random, test: bool) -> tuple[list[dict], list[tuple[int, str, int]]]:
    """Objects with grid cells, and the caption's clauses (i, relation, j) over object indices."""
    n = rng.choices((1, 2, 3), weights=(3, 4, 3))[0]
    held_out = [True] + [None] * (n - 1) if test else [False] * n  # a test scene shows at least one unseen pair
    while True:
        objects = [_random_object(rng, h) for h in held_out]
        if len({describe(o) for o in objects}) < n:
            continue  # identical twins would make captions ambiguous
        for obj, cell in zip(objects, rng.sample(range(9), n)):
            obj["row"], obj["col"] = divmod(cell, 3)
        if n == 1:
            return objects, []
        clauses = []
        for i, j in [(0, 1), (2, rng.choice((0, 1)))][: n - 1]:
            if rng.random() < 0.5:
                i, j = j, i
            rel = _relation(objects[i], objects[j])
            if rel is None:
                break
            clauses.append((i, rel, j))
        if len(clauses) == n - 1:
            return objects, clauses


def _caption(objects: list[dict], clauses: list[tuple[int, str, int]]) -> str:
    if not clauses:
        return describe(objects[0])
    return " and ".join(f"{describe(objects[i])} {rel} {describe(objects[j])}" for i, rel, j in clauses)


def _negatives(rng: random.Random, objects: list[dict], clauses, test: bool) -> list[str]:
    """Captions one edit away from the true one, each checked to be false for the scene."""
    spoken = [(describe(objects[i]), rel, describe(objects[j])) for i, rel, j in clauses]
    spoken = spoken or [(describe(objects[0]), None, None)]
    edits = []
    for k, (a, rel, b) in enumerate(spoken):
        if rel is not None:
            edits.append((k, (b, rel, a)))  # sides swapped: the same words, the other meaning
        for side in (0, 2) if rel is not None else (0,):
            size, colour, shape = spoken[k][side].split()[1:]
            for attr, values in (("size", SIZES), ("colour", list(COLOURS)), ("shape", SHAPES)):
                new = {"size": size, "colour": colour, "shape": shape}
                new[attr] = rng.choice([v for v in values if v != new[attr]])
                if not test and (new["shape"], new["colour"]) in HELD_OUT:
                    continue  # keep test-only pairs out of the training split's text as well
                clause = list(spoken[k])
                clause[side] = describe(new)
                edits.append((k, tuple(clause)))
    negatives = []
    for k, clause in edits:
        if not _holds(objects, *clause):
            text = [clause if m == k else c for m, c in enumerate(spoken)]
            caption = " and ".join(" ".join(w for w in c if w) for c in text)
            if caption not in negatives:
                negatives.append(caption)
    return negatives


def parse_caption(caption: str) -> list[tuple[str, str | None, str | None]]:
    """The clauses of a caption of this grammar, as (subject, relation, object) descriptions; a one-object caption
    is the single clause (description, None, None). A caption outside the grammar is a ValueError."""
    clauses = []
    for text in caption.split(" and "):
        words = text.split()
        subject, rest = _description(words[:4], caption), words[4:]
        if not rest:
            clauses.append((subject, None, None))
            continue
        width = 2 if rest[0] in ("left", "right") else 1  # "left of" / "right of" against "above" / "below"
        relation = " ".join(rest[:width])
        if relation not in OPPOSITE:
            raise ValueError(f"{caption!r} is not a caption of the demo grammar (relation {relation!r})")
        clauses.append((subject, relation, _description(rest[width:], caption)))
    return clauses


def _description(words: list[str], caption: str) -> str:
    valid = len(words) == 4 and words[0] == "a" and words[1] in SIZES and words[2] in COLOURS and words[3] in SHAPES
    if not valid:
        raise ValueError(f"{caption!r} is not a caption of the demo grammar ({' '.join(words)!r})")
    return " ".join(words)


def join_clauses(clauses: list[tuple[str, str | None, str | None]]) -> str:
    """The caption of parsed clauses: the inverse of parse_caption."""
    return " and ".join(" ".join(word for word in clause if word) for clause in clauses)


def caption_holds(objects: list[dict], clauses: list[tuple[str, str | None, str | None]]) -> bool:
    """Whether every clause is true of the scene under some reading (the test the stored negatives pass)."""
    return all(_holds(objects, *clause) for clause in clauses)


def _draw(rng: random.Random, objects: list[dict], size: int) -> Image.Image:
    grey = rng.randint(20, 90)
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for obj in objects:
        r = cell * (0.40 if obj["size"] == "large" else 0.22)
        slack = max(0.0, cell / 2 - r - 1)
        x = (obj["col"] + 0.5) * cell + rng.uniform(-slack, slack)
        y = (obj["row"] + 0.5) * cell + rng.uniform(-slack, slack)
        obj["x"], obj["y"] = round(x, 1), round(y, 1)
        fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[obj["colour"]])
        if obj["shape"] == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle([x - 0.85 * r, y - 0.85 * r, x + 0.85 * r, y + 0.85 * r], fill=fill)
        elif obj["shape"] == "triangle":
            draw.polygon([(x, y - r), (x - 0.95 * r, y + 0.8 * r), (x + 0.95 * r, y + 0.8 * r)], fill=fill)
        elif obj["shape"] == "diamond":
            draw.polygon([(x, y - r), (x + 0.7 * r, y), (x, y + r), (x - 0.7 * r, y)], fill=fill)
        else:  # five-pointed star
            points = [(k * math.pi / 5 - math.pi / 2, r if k % 2 == 0 else 0.45 * r) for k in range(10)]
            draw.polygon([(x + d * math.cos(t), y + d * math.sin(t)) for t, d in points], fill=fill)
    return image


def _write_split(out_dir: str, split: str, num: int, seed: int, image_size: int, per_shard: int, progress: bool) -> int:
    """Writes split-%06d.tar files in img2dataset's layout; returns how many shards were written."""
    rng = random.Random(f"gritvlp-demo:{seed}:{split}")
    test = split == "test"
    # fixed mtime and encoder off: the same arguments give byte-identical tars
    with wds.ShardWriter(
        os.path.join(out_dir, f"{split}-%06d.tar"), maxcount=per_shard, verbose=0, mtime=0, encoder=False
    ) as sink:
        bar = tqdm(total=num, desc=f"demo {split}", disable=not progress)
        n = image_id = 0
        while n < num:
            objects, clauses = _scene(rng, test)
            buf = io.BytesIO()
            _draw(rng, objects, image_size).save(buf, "JPEG", quality=90)
            phrasings = [clauses]
            if clauses and rng.random() < SECOND_CAPTION_RATE:
                i, rel, j = clauses[0]
                phrasings.append([(j, OPPOSITE[rel], i), *clauses[1:]])
            for phrasing in phrasings[: num - n]:
                key, caption = f"{n:09d}", _caption(objects, phrasing)
                negatives = _negatives(rng, objects, phrasing, test)
                meta = {
                    "key": key,
                    "caption": caption,
                    "image_id": f"{split}-{image_id:06d}",  # unique across splits: they may be mixed
                    "status": "success",
                    "width": image_size,
                    "height": image_size,
                    "objects": objects,
                    "negatives": negatives,
                }
                sink.write(
                    {"__key__": key, "jpg": buf.getvalue(), "txt": caption.encode(), "json": json.dumps(meta).encode()}
                )
                n += 1
                bar.update()
            image_id += 1
        bar.close()
        return sink.shard


def _pattern(out_dir: str, split: str, num_shards: int) -> str:
    return os.path.join(out_dir, f"{split}-{{000000..{num_shards - 1:06d}}}.tar")


def make_demo_shards(
    out_dir: str,
    num_train: int = 4096,
    num_test: int = 512,
    seed: int = 0,
    image_size: int = 96,
    samples_per_shard: int = 1024,
    progress: bool = True,
) -> tuple[str, str]:
    """Writes out_dir/train-*.tar, out_dir/test-*.tar and manifest.json; returns the (train, test) brace patterns."""
    if num_train < 1 or num_test < 1:
        raise ValueError("the demo set needs at least one training and one test sample")
    os.makedirs(out_dir, exist_ok=True)
    args = dict(
        num_train=num_train, num_test=num_test, seed=seed, image_size=image_size, samples_per_shard=samples_per_shard
    )
    shards = {
        split: _write_split(out_dir, split, num, seed, image_size, samples_per_shard, progress)
        for split, num in (("train", num_train), ("test", num_test))
    }
    manifest = {"version": MANIFEST_VERSION, **args, "shards": shards}
    Path(out_dir, "manifest.json").write_text(json.dumps(manifest, indent=1))
    return _pattern(out_dir, "train", shards["train"]), _pattern(out_dir, "test", shards["test"])


def is_demo_split(pattern: str) -> bool:
    """Whether shards were written by this generator (their folder holds its manifest.json): the demo-only
    evaluations (hard negatives, attribute classification) read the scenes in their KEY.json."""
    from gritvlp.data.shards import expand_shards

    try:
        folders = {Path(shard).parent for shard in expand_shards(pattern)}
    except (FileNotFoundError, ValueError):
        return False
    for folder in folders:
        try:
            if json.loads((folder / "manifest.json").read_text()).get("version") != MANIFEST_VERSION:
                return False
        except (OSError, ValueError, AttributeError):
            return False
    return bool(folders)


def _matching_patterns(out_dir: str, args: dict) -> tuple[str, str] | None:
    try:
        manifest = json.loads(Path(out_dir, "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("version") != MANIFEST_VERSION or any(manifest.get(k) != v for k, v in args.items()):
        return None
    shards = manifest["shards"]
    return _pattern(out_dir, "train", shards["train"]), _pattern(out_dir, "test", shards["test"])


def ensure_demo_shards(
    out_dir: str,
    num_train: int,
    num_test: int,
    seed: int = 0,
    image_size: int = 96,
    samples_per_shard: int = 1024,
    progress: bool = True,
) -> tuple[str, str]:
    """The demo set in out_dir, made first when missing or made with other arguments.

    It is written to a temporary sibling folder and renamed into place, so a crash never leaves half a set;
    a file lock lets every rank of a job call this at once (one writes, the others wait and reuse).
    """
    args = dict(
        num_train=num_train, num_test=num_test, seed=seed, image_size=image_size, samples_per_shard=samples_per_shard
    )
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        patterns = _matching_patterns(out_dir, args)
        if patterns:
            return patterns
        if out.exists() and any(out.iterdir()) and not (out / "manifest.json").exists():
            raise FileExistsError(f"{out_dir} holds files that are not a demo set; choose an empty or new folder")
        for stale in out.parent.glob(f".{out.name}.tmp*"):  # left by a crash
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
        try:
            make_demo_shards(str(tmp), **args, progress=progress)
            if out.exists():
                shutil.rmtree(out)
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return _matching_patterns(out_dir, args)
