"""Hard-negative benchmark on the compositional demo set: does the model prefer an image's caption to the same
caption with one thing changed?

Every test image (its first caption) is paired with one perturbation per kind: a colour, a shape or a size
changed, or a relation turned round ("left of" <-> "right of", "above" <-> "below"). Each perturbation changes one
word, is chosen by a fixed rule (clause by clause, subject before object, the grammar's values in order from the one
after the current value) and is kept only when it is false for the scene under every reading, so it describes a
different scene. Both captions are scored by the ITM head (match probability) and by ITC (cosine similarity); the
accuracy of a kind is the percentage of images whose true caption scores strictly higher (a tie counts as wrong).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from PIL import Image

from gritvlp.data.demo import COLOURS, OPPOSITE, SHAPES, SIZES, caption_holds, join_clauses, parse_caption

from .features import encode_captions, encode_images

KINDS = ("colour", "shape", "size", "relation")
# Word position of each attribute in a description "a <size> <colour> <shape>", and the grammar's values.
ATTRIBUTES = {"size": (1, SIZES), "colour": (2, tuple(COLOURS)), "shape": (3, SHAPES)}
Clause = tuple[str, str | None, str | None]


# ---------------------------------------------------------------- perturbations


def perturb(caption: str, objects: list[dict], kind: str) -> str | None:
    """The caption with one change of `kind` that is false for the scene `objects`, or None when no such change
    exists (a one-object caption has no relation to turn)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    for clauses in candidate_edits(parse_caption(caption), kind):
        if not caption_holds(objects, clauses):
            return join_clauses(clauses)
    return None


def candidate_edits(clauses: list[Clause], kind: str) -> Iterator[list[Clause]]:
    """Every one-word change of `kind`, in the fixed order the benchmark tries them."""
    if kind == "relation":
        for k, (subject, relation, obj) in enumerate(clauses):
            if relation is not None:
                yield _with_clause(clauses, k, (subject, OPPOSITE[relation], obj))
        return
    position, values = ATTRIBUTES[kind]
    for k, clause in enumerate(clauses):
        for side in (0, 2):
            if clause[side] is None:
                continue
            for description in _other_values(clause[side], position, values):
                changed = list(clause)
                changed[side] = description
                yield _with_clause(clauses, k, tuple(changed))


def _other_values(description: str, position: int, values: tuple[str, ...]) -> Iterator[str]:
    words = description.split()
    start = values.index(words[position])
    for step in range(1, len(values)):
        words[position] = values[(start + step) % len(values)]
        yield " ".join(words)


def _with_clause(clauses: list[Clause], k: int, clause: Clause) -> list[Clause]:
    return [clause if m == k else c for m, c in enumerate(clauses)]


# ---------------------------------------------------------------- the test set


@dataclass
class HardNegativeItem:
    image: torch.Tensor  # [3, S, S]
    caption: str
    negatives: dict[str, str]  # kind -> perturbed caption; a kind with no valid change is absent


def demo_scenes(pattern: str) -> Iterator[dict]:
    """Each sample of demo shards in order: image bytes, caption, image_id and the scene's objects (KEY.json)."""
    from gritvlp.data.shards import expand_shards

    for shard in expand_shards(pattern):
        with tarfile.open(shard) as tar:
            members: dict[str, dict[str, bytes]] = {}
            for info in tar:
                if info.isfile():
                    key, _, ext = info.name.partition(".")
                    members.setdefault(key, {})[ext] = tar.extractfile(info).read()
        for parts in members.values():
            if "json" in parts and "jpg" in parts:
                meta = json.loads(parts["json"])
                yield {"jpg": parts["jpg"], "caption": meta["caption"], "image_id": meta["image_id"], "objects": meta["objects"]}  # fmt: skip


def hard_negative_set(pattern: str, image_size: int) -> list[HardNegativeItem]:
    """One item per image of demo shards (its first caption), images resized as for evaluation."""
    from gritvlp.data.transforms import eval_transform

    transform = eval_transform(image_size)
    items, seen = [], set()
    for scene in demo_scenes(pattern):
        if scene["image_id"] in seen:
            continue
        seen.add(scene["image_id"])
        negatives = {kind: perturb(scene["caption"], scene["objects"], kind) for kind in KINDS}
        with Image.open(io.BytesIO(scene["jpg"])) as image:
            pixels = transform(image)
        items.append(HardNegativeItem(pixels, scene["caption"], {k: v for k, v in negatives.items() if v}))
    if not items:
        raise ValueError(f"no demo sample (KEY.jpg + KEY.json with the scene) in {pattern!r}")
    return items


# ---------------------------------------------------------------- scoring


@torch.no_grad()
def pair_scores(model, items, captions, pairs, tokenizer, device, batch_size: int, max_tokens: int):
    """ITM match probabilities and ITC similarities [P] of the (item, caption index) pairs."""
    image_tokens, image_feat = encode_images(model, [item.image for item in items], device, batch_size, progress=False)
    text_hidden, text_feat, mask = encode_captions(model, tokenizer, captions, device, max_tokens, batch_size, progress=False)  # fmt: skip
    image_idx = torch.tensor([i for i, _ in pairs], device=image_feat.device)
    text_idx = torch.tensor([c for _, c in pairs], device=image_feat.device)
    itc = (image_feat[image_idx].float() * text_feat[text_idx].float()).sum(-1)
    itm = []
    for start in range(0, len(pairs), batch_size):
        rows_i, rows_t = image_idx[start : start + batch_size], text_idx[start : start + batch_size]
        logits = model.itm_logits(image_tokens[rows_i], text_hidden[rows_t], mask[rows_t])
        itm.append(logits.float().softmax(dim=-1)[:, 1])
    return torch.cat(itm).cpu(), itc.cpu()


def comparisons(items: list[HardNegativeItem]) -> tuple[list[str], list[tuple[int, int]], list[tuple[str, int, int]]]:
    """The distinct captions, the (item, caption) pairs to score, and per (kind, item) the pair indices of the true
    and the perturbed caption."""
    caption_ids: dict[str, int] = {}
    pairs, compared = [], []
    for i, item in enumerate(items):
        true_pair = len(pairs)
        pairs.append((i, caption_ids.setdefault(item.caption, len(caption_ids))))
        for kind, negative in item.negatives.items():
            compared.append((kind, true_pair, len(pairs)))
            pairs.append((i, caption_ids.setdefault(negative, len(caption_ids))))
    return list(caption_ids), pairs, compared


def accuracies(scores: torch.Tensor, compared: list[tuple[str, int, int]]) -> dict[str, float]:
    """Percentage of comparisons the true caption wins, per kind and over all of them ('all')."""
    wins: dict[str, list[bool]] = {kind: [] for kind in (*KINDS, "all")}
    for kind, true_pair, negative_pair in compared:
        won = bool(scores[true_pair] > scores[negative_pair])
        wins[kind].append(won)
        wins["all"].append(won)
    return {kind: 100.0 * sum(w) / len(w) for kind, w in wins.items() if w}


@torch.no_grad()
def evaluate_hard_negatives(
    model, data, device, tokenizer=None, *, image_size: int | None = None, batch_size: int = 64, max_tokens: int = 30
) -> dict:
    """{"itm": {kind: %}, "itc": {kind: %}, "count": {kind: comparisons}, "num_images": N}; kinds as KINDS plus
    'all' (every comparison); a kind without comparisons has count 0 and no accuracy. data: a demo shard pattern
    (read at image_size, default the model's) or a hard_negative_set list. Every rank of a process group must call
    this (it runs the model's forward)."""
    if tokenizer is None:
        from gritvlp.data.text import load_tokenizer

        tokenizer = load_tokenizer(model.config.tokenizer, model.config.text_format)
    items = hard_negative_set(data, image_size or model.config.image_size) if isinstance(data, str) else data
    captions, pairs, compared = comparisons(items)
    was_training = model.training
    model.eval()
    try:
        itm, itc = pair_scores(model, items, captions, pairs, tokenizer, device, batch_size, max_tokens)
    finally:
        model.train(was_training)
    count = {kind: sum(k == kind for k, _, _ in compared) for kind in KINDS}
    count["all"] = len(compared)
    return {
        "itm": accuracies(itm, compared),
        "itc": accuracies(itc, compared),
        "count": count,
        "num_images": len(items),
    }
