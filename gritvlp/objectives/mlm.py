"""Masked language modeling inputs: BERT's 80/10/10 corruption at a configurable mask rate
(GRIT-VLP: 0.5, ALBEF: 0.15)."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


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
