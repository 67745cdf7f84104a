"""Image-text contrastive objective: GRIT-VLP's ITA = (L_i2t + L_t2i) / 2 + w (C_i2t + C_t2i) / 2.

The kernel returns the four terms (DiHT's HN-NCE weighting of the negatives is part of the contrastive terms)
and the ITM negatives; the weighting of the terms is written here, once. Features are gathered across ranks
when the config asks for it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from gritvlp.config import ObjectivesConfig
from gritvlp.kernels import ITCTerms, itc_terms


def ita(terms: ITCTerms, consistency_weight: float) -> torch.Tensor:
    """The weighted ITA loss; with a zero weight the consistency terms stay out of the graph (and the fused
    backward skips them)."""
    loss = (terms.loss_i2t + terms.loss_t2i) / 2
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
) -> ITCTerms:
    """The ITC terms of the local batch against the local (or, with cfg.gather_features, the global) batch."""
    kwargs = dict(
        group_ids=group_ids,
        hn_beta=cfg.hn_beta,
        hn_alpha=cfg.hn_alpha,
        negatives=cfg.itm_negatives if cfg.itm_weight > 0 else "none",
        stop_grad_keys=cfg.itc_stop_grad_keys,
        generator=generator,
    )
    if cfg.gather_features and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        kwargs.update(_gathered(image_feat, text_feat, group_ids))
    return itc_terms(image_feat, text_feat, temp, **kwargs)


def _gathered(image_feat: torch.Tensor, text_feat: torch.Tensor, group_ids: torch.Tensor) -> dict:
    """Every rank's features (with gradient) and group ids, and where the local batch sits among them."""
    size = torch.tensor([image_feat.shape[0]], device=image_feat.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    return dict(
        image_all=_gather_with_grad(image_feat, sizes),
        text_all=_gather_with_grad(text_feat, sizes),
        group_ids_all=_gather_with_grad(group_ids, sizes),
        offset=sum(sizes[: dist.get_rank()]),
    )


def _gather_with_grad(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All-gather rows from every rank (local batches may differ by a sample), keeping the gradient."""
    from torch.distributed.nn.functional import all_gather

    pad = max(sizes) - x.shape[0]
    if pad:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    parts = all_gather(x)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])
