"""Plain PyTorch versions of every gritvlp kernel: the CPU path and the test oracle.

ITC contract (shared by the fused Triton kernel):
  image_feat, text_feat   [B, D] local, L2-normalised features.
  image_all, text_all     [N, D] features of the whole (gathered) batch, or None for the local batch;
                          the local batch sits at rows [offset, offset + B) of them.
  S_i2t = image_feat @ text_all.T / temp      [B, N]   (keys detached when stop_grad_keys)
  S_t2i = text_feat @ image_all.T / temp      [B, N]
  Positives: (i, j) with group_ids[i] == group_ids_all[j] (default: j == offset + i), so samples that
  share an image are positives of each other and never negatives.
  Contrastive loss per row (DiHT HN-NCE; beta = 0, alpha = 1 is InfoNCE):
    l_i = -1/|P_i| sum_{p in P_i} log( e^{s_ip} / (alpha e^{s_ip} + sum_{j not in P_i} w_ij e^{s_ij}) )
    w_ij = (N - |P_i|) e^{beta s_ij} / sum_{k not in P_i} e^{beta s_ik}
  Consistency (GRIT-VLP): c_i2t = -mean_i sum_j sg(p_t2i[i, j]) log p_i2t[i, j], and symmetric,
  with p = softmax over all N columns.
  ITA = (l_i2t + l_t2i) / 2 + consistency_weight * (c_i2t + c_t2i) / 2.
  ITM negatives: for each local image a local text (and for each local text a local image) that is not
  a positive: the hardest (argmax of the similarity) or a sample from softmax(S) by the Gumbel-max trick.
  -1 marks a row with no valid negative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEGATIVE_MODES = ("hardest", "sample", "none")


@dataclass
class ITCOutput:
    loss: torch.Tensor  # ITA: contrastive + weighted consistency
    loss_i2t: torch.Tensor
    loss_t2i: torch.Tensor
    loss_consistency: torch.Tensor  # (c_i2t + c_t2i) / 2, before the weight
    neg_text_for_image: torch.Tensor  # [B] long, local text index or -1
    neg_image_for_text: torch.Tensor  # [B] long, local image index or -1


def check_itc_inputs(image_feat, text_feat, image_all, text_all, offset, group_ids, group_ids_all, negatives):
    if image_feat.dim() != 2 or text_feat.shape != image_feat.shape:
        raise ValueError(
            f"image_feat and text_feat must both be [B, D], got {tuple(image_feat.shape)} and {tuple(text_feat.shape)}"
        )
    if negatives not in NEGATIVE_MODES:
        raise ValueError(f"negatives must be one of {NEGATIVE_MODES}, got {negatives!r}")
    image_all = image_feat if image_all is None else image_all
    text_all = text_feat if text_all is None else text_all
    b, n = image_feat.shape[0], text_all.shape[0]
    if image_all.shape != text_all.shape or image_all.shape[1] != image_feat.shape[1]:
        raise ValueError("image_all and text_all must both be [N, D] with the local feature width")
    if n < 2:
        raise ValueError("ITC needs at least 2 samples in the (gathered) batch: with 1 there is no negative")
    if not 0 <= offset <= n - b:
        raise ValueError(f"offset {offset} does not place a local batch of {b} inside a gathered batch of {n}")
    if group_ids is None:
        group_ids = torch.arange(offset, offset + b, device=image_feat.device)
        group_ids_all = torch.arange(n, device=image_feat.device)
    elif group_ids_all is None:
        if n != b:
            raise ValueError("group_ids_all is required when features are gathered")
        group_ids_all = group_ids
    if group_ids.shape != (b,) or group_ids_all.shape != (n,):
        raise ValueError("group_ids must be [B] and group_ids_all [N]")
    return image_all, text_all, group_ids, group_ids_all


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


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    temp: torch.Tensor,
    *,
    image_all: torch.Tensor | None = None,
    text_all: torch.Tensor | None = None,
    offset: int = 0,
    group_ids: torch.Tensor | None = None,
    group_ids_all: torch.Tensor | None = None,
    consistency_weight: float = 0.2,
    hn_beta: float = 0.0,
    hn_alpha: float = 1.0,
    negatives: str = "hardest",
    stop_grad_keys: bool = True,
    generator: torch.Generator | None = None,
) -> ITCOutput:
    image_all, text_all, group_ids, group_ids_all = check_itc_inputs(
        image_feat, text_feat, image_all, text_all, offset, group_ids, group_ids_all, negatives
    )
    b = image_feat.shape[0]
    keys_t = text_all.detach() if stop_grad_keys else text_all
    keys_i = image_all.detach() if stop_grad_keys else image_all
    s_i2t = (image_feat.float() @ keys_t.float().T) / temp.float()
    s_t2i = (text_feat.float() @ keys_i.float().T) / temp.float()
    pos = group_ids[:, None] == group_ids_all[None, :]

    loss_i2t = _contrastive(s_i2t, pos, hn_beta, hn_alpha)
    loss_t2i = _contrastive(s_t2i, pos, hn_beta, hn_alpha)
    logp_i2t = F.log_softmax(s_i2t, dim=1)
    logp_t2i = F.log_softmax(s_t2i, dim=1)
    cons_i2t = -(logp_t2i.detach().exp() * logp_i2t).sum(1).mean()
    cons_t2i = -(logp_i2t.detach().exp() * logp_t2i).sum(1).mean()
    loss_cons = (cons_i2t + cons_t2i) / 2
    loss = (loss_i2t + loss_t2i) / 2 + consistency_weight * loss_cons

    return ITCOutput(
        loss=loss,
        loss_i2t=loss_i2t,
        loss_t2i=loss_t2i,
        loss_consistency=loss_cons,
        neg_text_for_image=_select_negatives(s_i2t, pos, offset, b, negatives, generator),
        neg_image_for_text=_select_negatives(s_t2i, pos, offset, b, negatives, generator),
    )


def check_lm_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int | None, label_smoothing: float
) -> None:
    """Shapes and smoothing on the host; the label range on the device (torch._assert_async), so the host never
    waits: on CPU a bad label raises RuntimeError here, on CUDA it is a device-side assert that fails the step."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not match")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    vocab = weight.shape[0]
    valid = (labels >= 0) & (labels < vocab)
    if ignore_index is not None:
        valid |= labels == ignore_index
    ignored = "" if ignore_index is None else f" or equal ignore_index={ignore_index}"
    torch._assert_async(valid.all(), f"labels must lie in [0, {vocab}){ignored}")


def lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of (hidden @ weight.T + bias) against labels, mean over labelled rows.

    hidden [..., H], weight [V, H], bias [V] or None, labels [...]. ignore_index=None: every row is labelled
    (compacted by the caller) and nothing waits for the device; otherwise the rows labelled ignore_index are
    dropped by boolean indexing, which synchronises with the host. With no labelled row the loss is 0 (still
    connected to the graph, so every rank runs the same backward).
    """
    check_lm_inputs(hidden, weight, labels, ignore_index, label_smoothing)
    rows = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if ignore_index is not None:
        keep = labels != ignore_index
        rows, labels = rows[keep], labels[keep]
    logits = F.linear(rows, weight, bias).float()
    if rows.shape[0] == 0:
        return logits.sum() * 0.0 + hidden.sum() * 0.0
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
