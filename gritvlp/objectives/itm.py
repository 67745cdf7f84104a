"""Image-text matching over B positives and 2B in-batch negatives (one per image, one per text)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def itm_pairs(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    neg_text_for_image: torch.Tensor,
    neg_image_for_text: torch.Tensor,
):
    """Stacks positives, (negative image, text) and (image, negative text) pairs, ALBEF's order.

    A negative index of -1 (no valid negative in the batch) drops that pair.
    Returns image tokens, text tokens, text mask and labels (1 = match).
    """
    b = image_embeds.shape[0]
    rows = torch.arange(b, device=image_embeds.device)
    has_neg_image = neg_image_for_text >= 0
    has_neg_text = neg_text_for_image >= 0
    text_rows = torch.cat([rows, rows[has_neg_image], neg_text_for_image[has_neg_text]])
    image_rows = torch.cat([rows, neg_image_for_text[has_neg_image], rows[has_neg_text]])
    labels = torch.zeros(text_rows.shape[0], dtype=torch.long, device=image_embeds.device)
    labels[:b] = 1
    return image_embeds[image_rows], text_embeds[text_rows], attention_mask[text_rows], labels


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the 2-way ITM head, and its accuracy."""
    loss = F.cross_entropy(logits.float(), labels)
    accuracy = (logits.argmax(dim=1) == labels).float().mean()
    return loss, accuracy
