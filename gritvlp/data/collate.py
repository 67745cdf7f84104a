"""Batches ShardDataset samples: drops corrupt (None) samples, stacks images, tokenises captions."""

from __future__ import annotations

import torch


class Collator:
    """Returns image [b,3,S,S], input_ids / attention_mask [b,L], index / group_id [b], captions, and
    num_skipped (how many None samples were dropped). A batch of only None has b == 0."""

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
            "num_skipped": len(samples) - len(good),
            "captions": captions,
        }
