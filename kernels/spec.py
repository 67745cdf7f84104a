"""The loss kernels' one signature: inputs checked and normalised once, for the fused and the reference versions.

ITC (image-text contrastive terms, both directions d = i2t, t2i):
  image_feat, text_feat   [B, D] local, L2-normalised features.
  image_all, text_all     [N, D] features of the whole (gathered) batch, or None for the local batch;
                          the local batch sits at rows [offset, offset + B) of them.
  S_i2t = image_feat @ text_all.T / temp      [B, N]   (keys detached when stop_grad_keys)
  S_t2i = text_feat @ image_all.T / temp      [B, N]
  Positives, per direction d (0 = i2t, 1 = t2i):
    P^d_i = { j : group_ids[i] == group_ids_all[j]  or  caption_ids[i] == caption_ids_all[j]
                  or  j == extra_positives[d, i] }
  group_ids [B] / group_ids_all [N] (default: j == offset + i): samples that share an image are positives of
  each other and never negatives. caption_ids [B] / caption_ids_all [N] (int64, default: the group ids, so the
  relation adds nothing): samples with identical normalised captions are positives of each other too. As for
  the group ids, the *_all ids may be omitted when N == B. extra_positives [2, B] (int64, default all -1):
  row 0 names for local image i one more column of the N gathered texts that is a positive of i in the i2t
  direction, row 1 for local text i one more column of the N gathered images (t2i); -1 for none. Its shape is
  checked on the host; its range [-1, N) on the host for a CPU tensor (ValueError; then copied to the features'
  device) and on the device otherwise (torch._assert_async: no host synchronisation; a bad index fails the step
  with a device-side assert).
  Everything below that names P_i uses the positive set of its own direction, P^d_i.
  Contrastive term per row (DiHT HN-NCE; beta = 0, alpha = 1 is InfoNCE):
    l_i = -1/|P_i| sum_{p in P_i} log( e^{s_ip} / (alpha e^{s_ip} + sum_{j not in P_i} w_ij e^{s_ij}) )
    w_ij = (N - |P_i|) e^{beta s_ij} / sum_{k not in P_i} e^{beta s_ik}
  loss_d = mean_i l_i of direction d.
  Consistency (GRIT-VLP): c_i2t = -mean_i sum_j sg(p_t2i[i, j]) log p_i2t[i, j], and symmetric,
  with p = softmax over all N columns (positives play no part).
  Uniform-target terms (label-smoothed ITC, e.g. MAFA's: ITC = (1 - eps) contrastive + eps uniform):
    u_d = mean_i ( logsumexp_j s^d_ij - (1/N) sum_j s^d_ij )   over all N columns,
  the cross-entropy of softmax(s^d_i) against the uniform distribution; d u_d / d s_ij = (p_ij - 1/N) / B.
  ITM negatives: for each local image a local text (and for each local text a local image) that is not
  a positive of that direction (not in P^i2t_i, resp. P^t2i_i): the hardest (argmax of the similarity) or a
  sample from softmax(S) by the Gumbel-max trick. -1 marks a row with no valid negative.
  The kernels return the six terms; how they are weighted is the objective's business
  (gritvlp.objectives.itc). A term whose output gets no gradient costs nothing in the backward.

LM (masked-token cross-entropy of hidden @ weight.T + bias against labels, mean over labelled rows):
  hidden [..., H], weight [V, H], bias [V] or None, labels [...]. ignore_index=None: every row is labelled
  (compacted by the caller) and nothing waits for the device; otherwise the rows labelled ignore_index are
  dropped first, which synchronises with the host. With no labelled row the loss is 0, still connected to
  the graph, so every rank runs the same backward.
  weight_grad_accumulation ("fp32" | "bf16"): where an implementation sums d weight over chunks of rows, the
  dtype of that sum. "bf16" applies to bf16 weights only (half the memory of the fp32 sum, one bf16 rounding per
  chunk); fp16 weights always sum in fp32 (fp16's range), fp32 weights in fp32. The reference computes d weight in
  one product and ignores it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEGATIVE_MODES = ("hardest", "sample", "none")
WEIGHT_GRAD_ACCUMULATIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class ITCInputs:
    image_feat: torch.Tensor
    text_feat: torch.Tensor
    temp: torch.Tensor  # a scalar tensor (0-dim or [1])
    image_all: torch.Tensor
    text_all: torch.Tensor
    offset: int
    group_ids: torch.Tensor
    group_ids_all: torch.Tensor
    caption_ids: torch.Tensor  # [B] (the group ids when not given)
    caption_ids_all: torch.Tensor  # [N]
    extra_positives: torch.Tensor  # [2, B] long: (i2t, t2i) column of one more positive, or -1
    hn_beta: float
    hn_alpha: float
    negatives: str
    stop_grad_keys: bool
    generator: torch.Generator | None


@dataclass
class ITCTerms:
    loss_i2t: torch.Tensor  # contrastive term, image -> text
    loss_t2i: torch.Tensor
    consistency_i2t: torch.Tensor  # GRIT consistency term, before any weight
    consistency_t2i: torch.Tensor
    neg_text_for_image: torch.Tensor  # [B] long, local text index or -1
    neg_image_for_text: torch.Tensor  # [B] long, local image index or -1
    uniform_i2t: torch.Tensor  # cross-entropy of softmax(S_i2t) against the uniform distribution, mean over rows
    uniform_t2i: torch.Tensor


@dataclass(frozen=True)
class LMInputs:
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    labels: torch.Tensor
    ignore_index: int | None
    label_smoothing: float
    weight_grad_accumulation: str = "fp32"


def itc_inputs(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    temp: torch.Tensor | float,
    *,
    image_all: torch.Tensor | None = None,
    text_all: torch.Tensor | None = None,
    offset: int = 0,
    group_ids: torch.Tensor | None = None,
    group_ids_all: torch.Tensor | None = None,
    caption_ids: torch.Tensor | None = None,
    caption_ids_all: torch.Tensor | None = None,
    extra_positives: torch.Tensor | None = None,
    hn_beta: float = 0.0,
    hn_alpha: float = 1.0,
    negatives: str = "hardest",
    stop_grad_keys: bool = True,
    generator: torch.Generator | None = None,
) -> ITCInputs:
    """Checks the ITC arguments and fills the defaults (local batch = gathered batch, one positive per row, no
    caption relation, no extra positive)."""
    if image_feat.dim() != 2 or text_feat.shape != image_feat.shape:
        raise ValueError(
            f"image_feat and text_feat must both be [B, D], got {tuple(image_feat.shape)} and {tuple(text_feat.shape)}"
        )
    if negatives not in NEGATIVE_MODES:
        raise ValueError(f"negatives must be one of {NEGATIVE_MODES}, got {negatives!r}")
    if hn_alpha < 0:
        raise ValueError(f"hn_alpha must be >= 0, got {hn_alpha}")
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
    if caption_ids is None:  # the group relation again: adds no positive
        caption_ids, caption_ids_all = group_ids, group_ids_all
    elif caption_ids_all is None:
        if n != b:
            raise ValueError("caption_ids_all is required when features are gathered")
        caption_ids_all = caption_ids
    if caption_ids.shape != (b,) or caption_ids_all.shape != (n,):
        raise ValueError("caption_ids must be [B] and caption_ids_all [N]")
    extra_positives = _extra_positives(extra_positives, b, n, image_feat.device)
    if not torch.is_tensor(temp):
        temp = torch.tensor(float(temp), device=image_feat.device)
    return ITCInputs(
        image_feat, text_feat, temp, image_all, text_all, offset, group_ids, group_ids_all, caption_ids,
        caption_ids_all, extra_positives, float(hn_beta), float(hn_alpha), negatives, stop_grad_keys, generator,
    )  # fmt: skip


def _extra_positives(extra: torch.Tensor | None, b: int, n: int, device: torch.device) -> torch.Tensor:
    """[2, B] long, -1 where a row has no extra positive. Shape checked on the host; the range [-1, N) on the host
    for a CPU tensor (ValueError), on the device otherwise (torch._assert_async: the host never waits)."""
    if extra is None:
        return torch.full((2, b), -1, dtype=torch.long, device=device)
    if extra.shape != (2, b):
        raise ValueError(f"extra_positives must be [2, B] = [2, {b}], got {tuple(extra.shape)}")
    if extra.is_floating_point() or extra.is_complex() or extra.dtype == torch.bool:
        raise ValueError(f"extra_positives must hold integer column indices, got {extra.dtype}")
    extra = extra.long()
    in_range = ((extra >= -1) & (extra < n)).all()
    if extra.device.type == "cpu":
        if not in_range:
            raise ValueError(f"extra_positives must lie in [-1, {n}) (a column of the gathered batch, or -1)")
    else:
        torch._assert_async(in_range, f"extra_positives must lie in [-1, {n})")
    return extra.to(device)


def lm_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    weight_grad_accumulation: str = "fp32",
) -> LMInputs:
    """Shapes and smoothing checked on the host; the label range on the device (torch._assert_async), so the
    host never waits: on CPU a bad label raises RuntimeError here, on CUDA a device-side assert fails the step."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not match")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, {hidden.shape[-1]}], got {tuple(weight.shape)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    if weight_grad_accumulation not in WEIGHT_GRAD_ACCUMULATIONS:
        raise ValueError(f"weight_grad_accumulation must be one of {WEIGHT_GRAD_ACCUMULATIONS}, "
                         f"got {weight_grad_accumulation!r}")  # fmt: skip
    vocab = weight.shape[0]
    valid = (labels >= 0) & (labels < vocab)
    if ignore_index is not None:
        valid |= labels == ignore_index
    ignored = "" if ignore_index is None else f" or equal ignore_index={ignore_index}"
    torch._assert_async(valid.all(), f"labels must lie in [0, {vocab}){ignored}")
    return LMInputs(hidden, weight, bias, labels, ignore_index, float(label_smoothing), weight_grad_accumulation)
