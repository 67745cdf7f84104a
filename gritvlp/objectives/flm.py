"""Free language modeling (FLM, Wang et al., CVPR 2023): every caption token is predicted, each from a context that
hides a corruption span of its own.

The text runs through the text and fusion layers twice with shared weights, as one batch of 2B: a left-to-right
stream (token i sees tokens <= i) and a right-to-left stream (token i sees tokens >= i). Query t of the reconstructor
predicts token t from the forward states left of its span and the backward states right of it: none of those has
seen a token inside the span. Two auxiliary losses predict the next token from the forward stream's last states and
the previous token from the backward stream's. FLM's loss is the mean of the three.

Positions: a caption of length n (padding excluded) has [CLS] at 0 and n - 1 targets, positions 1 .. n - 1 ([SEP]
included). The corruption span of target t, with T = n - 1 targets and rate r: m ~ Binomial(T - 1, p),
p = max(0, (T r - 1) / (T - 1)) (so the span holds max(1, T r) tokens on average), the span [t - b, t - b + m]
with b = floor(m / 2) or, for odd m, floor(m / 2) + 1 with probability 1/2 (centred on t), clipped to the targets
[1, n - 1]. The forward [CLS] state (which has seen no caption token) stays visible to every query, so no query's
attention row is empty. Spans and loss positions are drawn on the host, like the MLM masks, so the device never
counts anything.
"""

from __future__ import annotations

import torch

from .mlm import masked_lm_loss

FLM_KEYS = (
    "flm_span_start", "flm_span_end", "flm_positions", "flm_targets", "flm_next_positions",
    "flm_prev_positions", "flm_prev_targets",
)  # fmt: skip
FLM_TERMS = ("flm", "flm_reconstruction", "flm_next", "flm_previous")


# -- host side: spans and loss positions ------------------------------------------------------------------------------
def extra_span_lengths(num_targets: torch.Tensor, rate: float, shape, generator=None) -> torch.Tensor:
    """m ~ Binomial(T - 1, p), p = max(0, (T r - 1) / (T - 1)), drawn for every entry of `shape`; num_targets (T, at
    least 1) broadcasts to `shape`. The span of a target holds m + 1 tokens before clipping."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"the corruption rate must lie in [0, 1), got {rate}")
    count = (num_targets - 1).clamp(min=0).double().expand(shape)
    prob = ((num_targets * rate - 1) / (num_targets - 1).clamp(min=1)).clamp(min=0).double().expand(shape)
    return torch.binomial(count.contiguous(), prob.contiguous(), generator=generator).long()


def span_bounds(extra: torch.Tensor, lengths: torch.Tensor, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive [start, end] of every position's span ([B, L] each), from the extra lengths m [B, L] and the caption
    lengths n [B] (with [CLS]). A target's span holds it, roughly centred, clipped to the targets [1, n - 1].
    Positions that are no target ([CLS], padding) get [1, L - 1]: they see the forward [CLS] state only."""
    b, length = extra.shape
    position = torch.arange(length).expand(b, length)
    coin = torch.rand(extra.shape, generator=generator) < 0.5
    before = extra // 2 + (extra % 2 == 1).long() * coin.long()
    last = (lengths - 1)[:, None]
    start = (position - before).clamp(min=1)
    end = torch.minimum(position - before + extra, last)
    target = (position >= 1) & (position <= last)
    return torch.where(target, start, 1), torch.where(target, end, length - 1)


def flm_positions(attention_mask: torch.Tensor, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Flat positions (into the [B * L] token grid) and targets of the three losses:
    reconstruction: query t of every target t; next-token: the forward state t - 1 of every target t;
    previous-token: the backward state t + 1 of every target t that has a real token after it."""
    b, length = attention_mask.shape
    lengths = attention_mask.sum(1, keepdim=True)
    position = torch.arange(length).expand(b, length)
    target = (position >= 1) & (position < lengths)
    before_last = target & (position < lengths - 1)
    flat_ids = input_ids.reshape(-1)
    positions = target.reshape(-1).nonzero().squeeze(1)
    prev_targets = before_last.reshape(-1).nonzero().squeeze(1)
    return {
        "flm_positions": positions,
        "flm_targets": flat_ids[positions],
        "flm_next_positions": positions - 1,
        "flm_prev_positions": prev_targets + 1,
        "flm_prev_targets": flat_ids[prev_targets],
    }


def prepare_flm(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    corruption_rate: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The FLM inputs of one host batch, all on the CPU (`generator`: a CPU generator, None the default one):

    flm_span_start, flm_span_end [B, L] long: each query's inclusive corruption span (see span_bounds);
    flm_positions / flm_targets [n]: the reconstruction queries and their tokens (see flm_positions);
    flm_next_positions [n]: forward-stream rows predicting the same targets;
    flm_prev_positions / flm_prev_targets [n']: backward-stream rows and the tokens before them.

    CUDA tensors are copied to the host first, which waits for the device: the slow path."""
    ids, mask = input_ids.cpu(), attention_mask.cpu().long()
    lengths = mask.sum(1)
    if ids.numel() and int(lengths.min()) < 2:
        raise ValueError("every caption needs [CLS] and at least one more token")
    extra = extra_span_lengths((lengths - 1)[:, None], corruption_rate, ids.shape, generator)
    start, end = span_bounds(extra, lengths, generator)
    return {"flm_span_start": start, "flm_span_end": end, **flm_positions(mask, ids)}


# -- device side: masks and losses ------------------------------------------------------------------------------------
def stream_masks(batch_size: int, length: int, device) -> torch.Tensor:
    """[2B, L, L] self-attention masks (query x key) of the stacked streams: B left-to-right (key <= query), then B
    right-to-left (key >= query). Padding is the key-padding mask's business."""
    position = torch.arange(length, device=device)
    forward = position[None, :] <= position[:, None]
    backward = position[None, :] >= position[:, None]
    return torch.cat([forward.expand(batch_size, -1, -1), backward.expand(batch_size, -1, -1)])


def reconstructor_visibility(span_start, span_end, attention_mask) -> torch.Tensor:
    """[B, L, 2L] bool: query t may attend to forward state j (key j) when j < span_start[t] and to backward state
    j (key L + j) when j > span_end[t]; never to padding."""
    length = attention_mask.shape[1]
    key = torch.arange(length, device=attention_mask.device)
    real = attention_mask.bool()[:, None, :]
    forward = (key[None, None, :] < span_start[:, :, None]) & real
    backward = (key[None, None, :] > span_end[:, :, None]) & real
    return torch.cat([forward, backward], dim=2)


def flm_states(model, batch: dict, image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reconstructor's query states and the forward and backward streams' last-layer states, each [B, L, H]."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b, length = ids.shape
    states = model.layer_states(
        torch.cat([ids, ids]), torch.cat([mask, mask]), torch.cat([image_embeds, image_embeds]),
        stream_masks(b, length, ids.device),
    )  # fmt: skip
    layers = model.reconstructor.encoder_layers(len(states))
    contexts = [torch.cat([states[i][:b], states[i][b:]], dim=1) for i in layers]  # [B, 2L, H]: forward, backward
    visible = reconstructor_visibility(batch["flm_span_start"], batch["flm_span_end"], mask)
    return model.reconstruct(contexts, visible), states[-1][:b], states[-1][b:]


def flm_losses(
    model, batch: dict, image_embeds: torch.Tensor, weight_grad_accumulation: str = "fp32"
) -> dict[str, torch.Tensor]:
    """FLM's three losses and their mean ('flm'), through the fused LM loss on the host-chosen rows."""
    queries, forward, backward = flm_states(model, batch, image_embeds)

    def loss(states, positions, targets):
        return masked_lm_loss(model.mlm_head, states, positions, targets, None, weight_grad_accumulation)

    terms = {
        "flm_reconstruction": loss(queries, batch["flm_positions"], batch["flm_targets"]),
        "flm_next": loss(forward, batch["flm_next_positions"], batch["flm_targets"]),
        "flm_previous": loss(backward, batch["flm_prev_positions"], batch["flm_prev_targets"]),
    }
    terms["flm"] = sum(terms.values()) / 3
    return terms
