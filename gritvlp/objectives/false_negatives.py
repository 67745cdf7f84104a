"""False negatives of a batch: pairs of samples that share an image or an identical normalised caption.

GRIT's grouping gathers similar samples into one batch, and so also samples that are really positives of each other
(web data is many-to-many: a caption often fits several images). These statistics show how many of a batch's
would-be negatives are such pairs, and how many of the chosen ITM negatives still are, after the objective's
handling (identical-caption positives, connection mining). Logged under grit/* with no host synchronisation.
"""

from __future__ import annotations

import torch


def duplicate_pairs(group_ids: torch.Tensor, caption_ids: torch.Tensor | None) -> torch.Tensor:
    """[B, B] bool: True for i != j that share the image (group id) or, when given, the caption id."""
    same = group_ids[:, None] == group_ids[None, :]
    if caption_ids is not None:
        same |= caption_ids[:, None] == caption_ids[None, :]
    return same.fill_diagonal_(False)


@torch.no_grad()
def false_negative_stats(
    duplicates: torch.Tensor,
    neg_text_for_image: torch.Tensor,
    neg_image_for_text: torch.Tensor,
    converted: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """false_negative_share: share of the B (B - 1) in-batch pairs that are duplicates (ITC's would-be negatives
    that are false); itm_false_negative_share: share of the chosen ITM negatives (-1: none; `converted` [2, B]: the
    pairs mining turned into positives, which are no negatives) that are duplicates of their anchor."""
    b = duplicates.shape[0]
    rows = torch.arange(b, device=duplicates.device)
    stats = {"false_negative_share": duplicates.float().sum() / max(b * (b - 1), 1)}
    chosen = torch.stack([neg_text_for_image, neg_image_for_text])  # [2, B]: image i's text, text i's image
    valid = chosen >= 0
    if converted is not None:
        valid &= ~converted
    hit = duplicates[rows[None, :].expand(2, b), chosen.clamp(min=0)] & valid  # duplicates are symmetric
    stats["itm_false_negative_share"] = hit.float().sum() / valid.float().sum().clamp(min=1)
    return stats
