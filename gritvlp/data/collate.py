"""Batches ShardDataset samples: drops corrupt (None) samples, stacks images, tokenises captions, and passes
precomputed concept targets (objects and attributes) through."""

from __future__ import annotations

import torch

from gritvlp.data.encoded_images import EncodedBatch, EncodedImage


class Collator:
    """Returns image [b,3,S,S], input_ids / attention_mask [b,L], index / group_id [b] (and caption_id [b] when the
    samples carry one), captions, and num_skipped (how many None samples were dropped). A batch of only None has
    b == 0. Under data.image_decode=device the samples carry EncodedImage and image is an EncodedBatch (their JPEG
    bytes and drawn parameters), which the step turns into the [b,3,S,S] tensor on the device.

    When a sample carries "concepts" ({"ids": [...], "probs": [...]}, the teacher's top classes written into the
    shard's KEY.json by scripts/precompute_concepts.py), the batch gets concept_ids [b, K] long and concept_probs
    [b, K] float, K the most any sample has, zero-padded; a sample without concepts gets a zero row (no target).

    With num_attributes > 0 (model.num_attributes), the concepts' "attributes" (ids, and optionally
    "attribute_probs" for soft labels) become attribute_targets [b, num_attributes] float (multi-hot, or the given
    values) and attribute_mask [b] float: 1 where the sample has attribute labels, 0 for a sample without (its row
    is all 0 and counts for nothing). Both are in every batch, even one where no sample has labels."""

    def __init__(self, tokenizer, max_tokens: int = 25, num_attributes: int = 0):
        self.tokenizer, self.max_tokens, self.num_attributes = tokenizer, max_tokens, num_attributes

    def __call__(self, samples: list[dict | None]) -> dict:
        good = [s for s in samples if s is not None]
        captions = [s["caption"] for s in good]
        if good:
            tokens = self.tokenizer(
                captions, padding="longest", truncation=True, max_length=self.max_tokens, return_tensors="pt"
            )
            image = _images(good)
            input_ids, attention_mask = tokens["input_ids"].long(), tokens["attention_mask"].long()
        else:
            image = torch.zeros(0, 3, 0, 0)
            input_ids, attention_mask = torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.long)
        return {
            "image": image,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "index": torch.tensor([s["index"] for s in good], dtype=torch.long),
            "group_id": torch.tensor([s["group_id"] for s in good], dtype=torch.long),
            **caption_ids(good),
            "num_skipped": len(samples) - len(good),
            "captions": captions,
            **concept_targets(good),
            **(attribute_targets(good, self.num_attributes) if self.num_attributes else {}),
        }


def _images(samples: list[dict]) -> torch.Tensor | EncodedBatch:
    """The stacked images, or, under data.image_decode=device, an EncodedBatch that the step decodes on the device."""
    images = [s["image"] for s in samples]
    if isinstance(images[0], EncodedImage):
        return EncodedBatch.collate(images, [s["index"] for s in samples])
    return torch.stack(images)


def caption_ids(samples: list[dict]) -> dict[str, torch.Tensor]:
    """caption_id [b] when every sample has one (samples of the sample index do), else nothing."""
    if not samples or any("caption_id" not in s for s in samples):
        return {}
    return {"caption_id": torch.tensor([s["caption_id"] for s in samples], dtype=torch.long)}


def concept_targets(samples: list[dict]) -> dict[str, torch.Tensor]:
    """concept_ids / concept_probs of the samples' precomputed object concepts; nothing when none has any."""
    concepts = [c if c and "ids" in c else None for c in (s.get("concepts") for s in samples)]
    if not any(concepts):
        return {}
    width = max(len(c["ids"]) for c in concepts if c)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    probs = torch.zeros(len(samples), width)
    for row, c in enumerate(concepts):
        if c:
            if len(c["ids"]) != len(c["probs"]):
                raise ValueError(f"sample {samples[row].get('index')}: concepts have {len(c['ids'])} ids but "
                                 f"{len(c['probs'])} probabilities")  # fmt: skip
            ids[row, : len(c["ids"])] = torch.tensor(c["ids"], dtype=torch.long)
            probs[row, : len(c["probs"])] = torch.tensor(c["probs"], dtype=torch.float)
    return {"concept_ids": ids, "concept_probs": probs}


def attribute_targets(samples: list[dict], num_attributes: int) -> dict[str, torch.Tensor]:
    """attribute_targets [b, num_attributes] and attribute_mask [b] of the samples' precomputed attributes."""
    targets = torch.zeros(len(samples), num_attributes)
    mask = torch.zeros(len(samples))
    for row, sample in enumerate(samples):
        concepts = sample.get("concepts") or {}
        if "attributes" not in concepts:
            continue
        ids = concepts["attributes"]
        values = concepts.get("attribute_probs", [1.0] * len(ids))
        if len(values) != len(ids):
            raise ValueError(f"sample {sample.get('index')}: {len(ids)} attributes but {len(values)} attribute_probs")
        bad = [i for i in ids if not 0 <= i < num_attributes]
        if bad:
            raise ValueError(f"sample {sample.get('index')}: attribute id {bad[0]} is outside [0, {num_attributes}) "
                             "(model.num_attributes must cover the attribute vocabulary)")  # fmt: skip
        targets[row, torch.tensor(ids, dtype=torch.long)] = torch.tensor(values, dtype=torch.float)
        mask[row] = 1.0
    return {"attribute_targets": targets, "attribute_mask": mask}
