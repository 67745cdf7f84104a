"""Image-text contrastive loss (+ GRIT consistency, DiHT HN-NCE) and ITM negative selection.

Thin: gathers features across ranks when asked, then calls the fused kernel (or its reference).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from gritvlp.config import ObjectivesConfig
from gritvlp.kernels import ITCOutput, itc_loss


def _gather_with_grad(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All-gather rows from every rank (local batches may differ by a sample), keeping the gradient."""
    from torch.distributed.nn.functional import all_gather

    pad = max(sizes) - x.shape[0]
    if pad:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    parts = all_gather(x)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def contrastive_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    temp: torch.Tensor,
    group_ids: torch.Tensor,
    cfg: ObjectivesConfig,
    generator: torch.Generator | None = None,
) -> ITCOutput:
    kwargs = dict(
        group_ids=group_ids,
        consistency_weight=cfg.consistency_weight,
        hn_beta=cfg.hn_beta,
        hn_alpha=cfg.hn_alpha,
        negatives=cfg.itm_negatives if cfg.itm_weight > 0 else "none",
        stop_grad_keys=cfg.itc_stop_grad_keys,
        generator=generator,
    )
    if cfg.gather_features and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        size = torch.tensor([image_feat.shape[0]], device=image_feat.device)
        sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, size)
        sizes = [int(s) for s in sizes]
        kwargs.update(
            image_all=_gather_with_grad(image_feat, sizes),
            text_all=_gather_with_grad(text_feat, sizes),
            group_ids_all=_gather_with_grad(group_ids, sizes),
            offset=sum(sizes[: dist.get_rank()]),
        )
    return itc_loss(image_feat, text_feat, temp, **kwargs)
