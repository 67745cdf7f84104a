"""Image-text contrastive objective: GRIT-VLP's ITA = (L_i2t + L_t2i) / 2 + w (C_i2t + C_t2i) / 2.

The kernel returns the terms (DiHT's HN-NCE weighting of the negatives is part of the contrastive terms, the
positives of a row are its image's samples, its caption's and its mined ones) and the ITM negatives; the weighting
of the terms is written here, once. MAFA's smoothed ITC mixes the contrastive term with the cross-entropy against a
uniform target: (1 - e) L + e U, which with one positive per row is the cross-entropy against the target
(1 - e) one-hot + e uniform. Features are gathered across ranks when the config asks for it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from gritvlp.config import ObjectivesConfig
from gritvlp.kernels import ITCTerms, itc_terms


def ita(terms: ITCTerms, consistency_weight: float, smoothing: float = 0.0) -> torch.Tensor:
    """The weighted ITA loss; with a zero weight the consistency (or uniform) terms stay out of the graph (and the
    fused backward skips them)."""
    loss = (terms.loss_i2t + terms.loss_t2i) / 2
    if smoothing:
        loss = (1 - smoothing) * loss + smoothing * (terms.uniform_i2t + terms.uniform_t2i) / 2
    if consistency_weight:
        loss = loss + consistency_weight * consistency(terms)
    return loss


def consistency(terms: ITCTerms) -> torch.Tensor:
    return (terms.consistency_i2t + terms.consistency_t2i) / 2


def contrastive_terms(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    temp: torch.Tensor,
    group_ids: torch.Tensor,
    cfg: ObjectivesConfig,
    generator: torch.Generator | None = None,
    caption_ids: torch.Tensor | None = None,
    extra_positives: torch.Tensor | None = None,
    pick_negatives: bool = True,
) -> ITCTerms:
    """The ITC terms of the local batch against the local (or, with cfg.gather_features, the global) batch.
    caption_ids [B]: identical captions are positives (None: only the image's samples are); extra_positives [2, B]:
    one more positive per row and direction, a local index or -1 (connection mining); pick_negatives=False when the
    ITM negatives are chosen elsewhere (mining picks its own)."""
    kwargs = dict(
        group_ids=group_ids,
        caption_ids=caption_ids,
        hn_beta=cfg.hn_beta,
        hn_alpha=cfg.hn_alpha,
        negatives=cfg.itm_negatives if cfg.itm_weight > 0 and pick_negatives else "none",
        stop_grad_keys=cfg.itc_stop_grad_keys,
        generator=generator,
    )
    offset = 0
    if cfg.gather_features and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        kwargs.update(_gathered(image_feat, text_feat, group_ids, caption_ids))
        offset = kwargs["offset"]
    if extra_positives is not None:  # local indices -> columns of the (gathered) batch
        kwargs["extra_positives"] = torch.where(extra_positives >= 0, extra_positives + offset, extra_positives)
    return itc_terms(image_feat, text_feat, temp, **kwargs)


def _gathered(image_feat, text_feat, group_ids, caption_ids) -> dict:
    """Every rank's features (with gradient), group and caption ids, and where the local batch sits among them."""
    size = torch.tensor([image_feat.shape[0]], device=image_feat.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    gathered = dict(
        image_all=_gather_with_grad(image_feat, sizes),
        text_all=_gather_with_grad(text_feat, sizes),
        group_ids_all=_gather_with_grad(group_ids, sizes),
        offset=sum(sizes[: dist.get_rank()]),
    )
    if caption_ids is not None:
        gathered["caption_ids_all"] = _gather_with_grad(caption_ids, sizes)
    return gathered


def _gather_with_grad(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All-gather rows from every rank (local batches may differ by a sample), keeping the gradient."""
    from torch.distributed.nn.functional import all_gather

    pad = max(sizes) - x.shape[0]
    if pad:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    parts = all_gather(x)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])
