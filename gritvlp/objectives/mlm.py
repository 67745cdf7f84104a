"""Masked language modeling: BERT's 80/10/10 corruption at a configurable mask rate (GRIT-VLP: 0.5, ALBEF: 0.15),
drawn on the host so the device never has to count masked tokens, and the loss on the labelled tokens."""

from __future__ import annotations

import torch

from gritvlp.kernels import lm_loss

IGNORE_INDEX = -100
MLM_KEYS = ("mlm_input_ids", "mlm_positions", "mlm_targets")


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    vocab_size: int,
    mask_token_id: int,
    pad_token_id: int,
    cls_token_id: int,
    mask_prob: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chooses tokens with probability mask_prob (never PAD or CLS); of the chosen, 80% become [MASK],
    10% a random token and 10% stay. Returns (corrupted ids, labels with IGNORE_INDEX elsewhere)."""
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")

    def draw(p: float) -> torch.Tensor:
        return torch.rand(input_ids.shape, generator=generator, device=input_ids.device) < p

    chosen = draw(mask_prob) & (input_ids != pad_token_id) & (input_ids != cls_token_id)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    to_mask = chosen & draw(0.8)
    to_random = chosen & ~to_mask & draw(0.5)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=input_ids.device)
    corrupted = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    corrupted = torch.where(to_random, random_ids, corrupted)
    return corrupted, labels


def prepare_mlm(
    input_ids: torch.Tensor,
    *,
    vocab_size: int,
    mask_token_id: int,
    pad_token_id: int,
    cls_token_id: int,
    mask_prob: float = 0.5,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The MLM inputs of one host batch, all on the CPU:

    mlm_input_ids [B, L]: the corrupted ids (see mask_tokens);
    mlm_positions [n] int64: flat indices into the [B * L] token grid of the n labelled tokens, ascending;
    mlm_targets [n] int64: the original ids there.

    Computed on the host, n is known before anything reaches the device, so the model gathers the labelled
    rows with a fixed-size index_select instead of a boolean mask. `generator` is a CPU generator (None: the
    default one). CUDA ids are copied to the host first, which waits for the device: the slow path.
    """
    ids = input_ids.cpu()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size})")
    corrupted, labels = mask_tokens(
        ids, vocab_size=vocab_size, mask_token_id=mask_token_id, pad_token_id=pad_token_id,
        cls_token_id=cls_token_id, mask_prob=mask_prob, generator=generator,
    )  # fmt: skip
    flat_labels = labels.reshape(-1)
    positions = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
    return {"mlm_input_ids": corrupted, "mlm_positions": positions, "mlm_targets": flat_labels[positions]}


def masked_lm_loss(
    mlm_head,
    fused: torch.Tensor,
    positions: torch.Tensor,
    targets: torch.Tensor,
    extra: tuple[torch.Tensor, torch.Tensor] | None = None,
    weight_grad_accumulation: str = "fp32",
) -> torch.Tensor:
    """Cross-entropy of the labelled tokens: fusion states [B, L, H] gathered at the host-computed flat positions
    [n] (a fixed-size index_select: nothing waits for the device to count them), the head's transform, then the
    fused vocabulary projection + cross-entropy, told every row is labelled (ignore_index=None). extra: more
    labelled (states [m, H], targets [m]) in the same mean (the mined pairs' tokens, see pair_tokens).
    weight_grad_accumulation: objectives.lm_weight_grad_accumulation (kernels/spec.py)."""
    rows = fused.reshape(-1, fused.shape[-1]).index_select(0, positions)
    if extra is not None:
        rows, targets = torch.cat([rows, extra[0]]), torch.cat([targets, extra[1]])
    return lm_loss(mlm_head(rows), mlm_head.decoder_weight, mlm_head.bias, targets, ignore_index=None,
                   weight_grad_accumulation=weight_grad_accumulation)  # fmt: skip


def pair_tokens(
    pair_fused: torch.Tensor, text_rows: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor, num_texts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The labelled tokens of extra pairs: fusion states [K, L, H] of the masked texts text_rows [K] with other
    images, at those texts' own masked positions. Counting them waits for the device (mining's host sync)."""
    length = pair_fused.shape[1]
    labels = torch.full((num_texts * length,), IGNORE_INDEX, dtype=targets.dtype, device=targets.device)
    labels[positions] = targets
    pair_labels = labels.view(num_texts, length)[text_rows].flatten()
    keep = (pair_labels != IGNORE_INDEX).nonzero().squeeze(1)
    return pair_fused.reshape(-1, pair_fused.shape[-1])[keep], pair_labels[keep]
