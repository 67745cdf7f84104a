"""Similarity statistics of a batch, logged to show what the sampling does to the negatives."""

from __future__ import annotations

import torch


@torch.no_grad()
def similarity_stats(image_feat: torch.Tensor, text_feat: torch.Tensor, neg_text_for_image: torch.Tensor) -> dict:
    """Mean cosine of positive pairs, of in-batch negatives and of the chosen ITM negatives, in O(B D) and with no
    host sync (grouped batches raise the last two: harder negatives)."""
    b = image_feat.shape[0]
    image_feat, text_feat = image_feat.float(), text_feat.float()
    positive = (image_feat * text_feat).sum(-1)
    total = image_feat.sum(0) @ text_feat.sum(0)
    stats = {"sim_pos": positive.mean()}
    if b > 1:
        stats["sim_neg"] = (total - positive.sum()) / (b * (b - 1))
    valid = (neg_text_for_image >= 0).float()
    chosen = (image_feat * text_feat[neg_text_for_image.clamp(min=0)]).sum(-1)
    stats["sim_itm_neg"] = (chosen * valid).sum() / valid.sum().clamp(min=1)
    return stats
