"""Plain PyTorch versions of every gritvlp kernel: the CPU path and the test oracle.

Each takes the checked inputs of kernels/spec.py, whose docstring states the math they compute.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .spec import ITCInputs, ITCTerms, LMInputs


def _contrastive(s: torch.Tensor, pos: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    neg = ~pos
    n_pos = pos.sum(1)
    n_neg = neg.sum(1)
    minus_inf = torch.finfo(s.dtype).min
    if beta == 0.0:
        # w_ij = 1: log sum_neg e^{s_ij}
        neg_term = torch.logsumexp(s.masked_fill(pos, minus_inf), dim=1)
    else:
        weighted = ((1 + beta) * s).masked_fill(pos, minus_inf)
        norm = (beta * s).masked_fill(pos, minus_inf)
        neg_term = torch.log(n_neg.to(s.dtype)) + torch.logsumexp(weighted, 1) - torch.logsumexp(norm, 1)
    neg_term = torch.where(n_neg > 0, neg_term, torch.full_like(neg_term, minus_inf))
    # log(alpha e^{s_ip} + e^{neg_term}) for every column (used only at positives)
    log_alpha = math.log(alpha) if alpha > 0 else float("-inf")  # a Python float: no host-to-device copy
    denom = torch.logaddexp(s + log_alpha, neg_term[:, None])
    per_pos = (s - denom).masked_fill(neg, 0.0)
    return -(per_pos.sum(1) / n_pos.clamp(min=1)).mean()


def _select_negatives(s: torch.Tensor, pos: torch.Tensor, offset: int, b: int, mode: str, generator):
    local = s.detach()[:, offset : offset + b].float()
    invalid = pos[:, offset : offset + b]
    if mode == "none":
        return torch.full((s.shape[0],), -1, dtype=torch.long, device=s.device)
    if mode == "sample":
        u = torch.rand(local.shape, generator=generator, device=local.device, dtype=local.dtype)
        local = local - torch.log(-torch.log(u.clamp(min=1e-20)))
    local = local.masked_fill(invalid, float("-inf"))
    idx = local.argmax(dim=1)
    return torch.where(invalid.all(dim=1), torch.full_like(idx, -1), idx)


def positives(inputs: ITCInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The [B, N] positive masks of the two directions (i2t, t2i): group or caption match, or the extra column."""
    x = inputs
    shared = (x.group_ids[:, None] == x.group_ids_all[None, :]) | (x.caption_ids[:, None] == x.caption_ids_all[None, :])
    cols = torch.arange(shared.shape[1], device=shared.device)
    return tuple(shared | (cols[None, :] == x.extra_positives[d][:, None]) for d in range(2))


def _uniform(s: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of softmax(s_i) against the uniform distribution over the N columns, mean over rows."""
    return (torch.logsumexp(s, dim=1) - s.mean(dim=1)).mean()


def itc_terms(inputs: ITCInputs) -> ITCTerms:
    x = inputs
    b = x.image_feat.shape[0]
    keys_t = x.text_all.detach() if x.stop_grad_keys else x.text_all
    keys_i = x.image_all.detach() if x.stop_grad_keys else x.image_all
    temp = x.temp.float().reshape(())
    s_i2t = (x.image_feat.float() @ keys_t.float().T) / temp
    s_t2i = (x.text_feat.float() @ keys_i.float().T) / temp
    pos_i2t, pos_t2i = positives(x)
    logp_i2t = F.log_softmax(s_i2t, dim=1)
    logp_t2i = F.log_softmax(s_t2i, dim=1)
    return ITCTerms(
        loss_i2t=_contrastive(s_i2t, pos_i2t, x.hn_beta, x.hn_alpha),
        loss_t2i=_contrastive(s_t2i, pos_t2i, x.hn_beta, x.hn_alpha),
        consistency_i2t=-(logp_t2i.detach().exp() * logp_i2t).sum(1).mean(),
        consistency_t2i=-(logp_i2t.detach().exp() * logp_t2i).sum(1).mean(),
        neg_text_for_image=_select_negatives(s_i2t, pos_i2t, x.offset, b, x.negatives, x.generator),
        neg_image_for_text=_select_negatives(s_t2i, pos_t2i, x.offset, b, x.negatives, x.generator),
        uniform_i2t=_uniform(s_i2t),
        uniform_t2i=_uniform(s_t2i),
    )


def lm_loss(inputs: LMInputs) -> torch.Tensor:
    x = inputs
    rows = x.hidden.reshape(-1, x.hidden.shape[-1])
    labels = x.labels.reshape(-1)
    if x.ignore_index is not None:  # boolean indexing: a host sync (the fused path has the same cost here)
        keep = labels != x.ignore_index
        rows, labels = rows[keep], labels[keep]
    logits = F.linear(rows, x.weight, x.bias).float()
    if rows.shape[0] == 0:
        return logits.sum() * 0.0 + x.hidden.sum() * 0.0
    return F.cross_entropy(logits, labels, label_smoothing=x.label_smoothing)
