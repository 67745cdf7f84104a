"""Batches ShardDataset samples: drops corrupt (None) samples, stacks images, tokenises captions, and passes
precomputed concept targets through."""

from __future__ import annotations

import torch


class Collator:
    """Returns image [b,3,S,S], input_ids / attention_mask [b,L], index / group_id [b] (and caption_id [b] when the
    samples carry one), captions, and num_skipped (how many None samples were dropped). A batch of only None has
    b == 0.

    When a sample carries "concepts" ({"ids": [...], "probs": [...]}, the teacher's top classes written into the
    shard's KEY.json by scripts/precompute_concepts.py), the batch gets concept_ids [b, K] long and concept_probs
    [b, K] float, K the most any sample has, zero-padded; a sample without concepts gets a zero row (no target)."""

    def __init__(self, tokenizer, max_tokens: int = 25):
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def __call__(self, samples: list[dict | None]) -> dict:
        good = [s for s in samples if s is not None]
        captions = [s["caption"] for s in good]
        if good:
            tokens = self.tokenizer(
                captions, padding="longest", truncation=True, max_length=self.max_tokens, return_tensors="pt"
            )
            image = torch.stack([s["image"] for s in good])
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
        }


def caption_ids(samples: list[dict]) -> dict[str, torch.Tensor]:
    """caption_id [b] when every sample has one (samples of the sample index do), else nothing."""
    if not samples or any("caption_id" not in s for s in samples):
        return {}
    return {"caption_id": torch.tensor([s["caption_id"] for s in samples], dtype=torch.long)}


def concept_targets(samples: list[dict]) -> dict[str, torch.Tensor]:
    """concept_ids / concept_probs of the samples' precomputed concepts; nothing when none has any."""
    concepts = [s.get("concepts") for s in samples]
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
