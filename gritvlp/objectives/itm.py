"""Image-text matching over B positives and 2B in-batch negatives (one per image, one per text)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class ITMPairs(NamedTuple):
    images: torch.Tensor  # [3B, P, Wv] image tokens
    texts: torch.Tensor  # [3B, L, H] text-encoder states
    attention_mask: torch.Tensor  # [3B, L]
    labels: torch.Tensor  # [3B] long, 1 = match
    weights: torch.Tensor  # [3B] float, 0 for a pair that stands in for a missing negative


def itm_pairs(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    neg_text_for_image: torch.Tensor,
    neg_image_for_text: torch.Tensor,
    converted: torch.Tensor | None = None,
) -> ITMPairs:
    """Stacks B positives, B (negative image, text) and B (image, negative text) pairs, ALBEF's order.

    A negative index of -1 (no valid negative in the batch) is replaced by 0 and its pair gets weight 0:
    the pair count stays 3B whatever the negatives are, so no boolean mask (a host sync) is needed.
    converted [2, B] (connection mining; row 0 for the images' texts, row 1 for the texts' images): those chosen
    pairs are positives, labelled 1.
    """
    b = image_embeds.shape[0]
    device = image_embeds.device
    rows = torch.arange(b, device=device)
    image_rows = torch.cat([rows, neg_image_for_text.clamp(min=0), rows])
    text_rows = torch.cat([rows, rows, neg_text_for_image.clamp(min=0)])
    negative_labels = torch.zeros(2 * b, dtype=torch.long, device=device)
    if converted is not None:
        negative_labels = torch.cat([converted[1], converted[0]]).long()
    labels = torch.cat([torch.ones(b, dtype=torch.long, device=device), negative_labels])
    has_neg = [(neg_image_for_text >= 0).float(), (neg_text_for_image >= 0).float()]
    weights = torch.cat([torch.ones(b, device=device), *has_neg])
    return ITMPairs(
        images=image_embeds.index_select(0, image_rows),
        texts=text_embeds.index_select(0, text_rows),
        attention_mask=attention_mask.index_select(0, text_rows),
        labels=labels,
        weights=weights,
    )


def itm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the 2-way ITM head and its accuracy, both means over the pairs of weight 1."""
    total = weights.sum().clamp(min=1)
    loss = (F.cross_entropy(logits.float(), labels, reduction="none") * weights).sum() / total
    accuracy = ((logits.argmax(dim=1) == labels).float() * weights).sum() / total
    return loss, accuracy
