"""ALBEF's momentum distillation machinery for retrieval fine-tuning: an EMA copy of the encoders and a queue of
its features with their image ids.

Both live outside the DeepSpeed engine, in fp32: DeepSpeed would cast a submodule of the engine to bf16, where an EMA
step of 0.005 x (online - momentum) rounds away, and would partition it under ZeRO-3. Their state travels in the
checkpoint's client state, so a resumed run continues with the same queue and momentum weights.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

EMPTY_ID = -1  # the id of a queue slot that holds no sample yet (image ids are >= 0)


class MomentumEncoder(nn.Module):
    """An EMA copy of a GritVLP's image and text encoders and projections (ALBEF's visual_encoder_m,
    text_encoder_m, vision_proj_m, text_proj_m): the heads, fusion layers and reconstructor are dropped."""

    def __init__(self, model: nn.Module, momentum: float):
        super().__init__()
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        self.momentum = momentum
        encoder = copy.deepcopy(model).float()
        for name in ("itm_head", "mlm_head", "reconstructor", "concept_head", "attribute_head"):
            if getattr(encoder, name, None) is not None:
                setattr(encoder, name, None)
        del encoder.text.encoder.layer[encoder.text.encoder.num_text_layers :]  # fusion layers: unused by ITC
        encoder.requires_grad_(False)
        self.encoder = encoder

    def pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(momentum parameters, the online parameters of the same names)."""
        online = dict(model.named_parameters())
        names = [name for name, _ in self.encoder.named_parameters()]
        missing = [name for name in names if name not in online]
        if missing:
            raise KeyError(f"the online model lacks {missing[:3]}: not the model this momentum copy was made of")
        return [p for _, p in self.encoder.named_parameters()], [online[name] for name in names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """theta_m <- m theta_m + (1 - m) theta, from the online model's full (working-precision) parameters."""
        mine, online = self.pairs(model)
        torch._foreach_mul_(mine, self.momentum)
        torch._foreach_add_(mine, [p.detach().to(q.dtype) for p, q in zip(online, mine)], alpha=1 - self.momentum)

    @torch.no_grad()
    def features(self, images, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image and text features of the momentum encoders (the model's pooling and projections)."""
        _, image_feat = self.encoder.encode_image(images)
        _, text_feat = self.encoder.encode_text(input_ids, attention_mask)
        return image_feat, text_feat


class FeatureQueue(nn.Module):
    """A ring buffer of momentum image and text features and their image ids. It starts as ALBEF's does: random unit
    features (negatives of every sample) with no id; each enqueue overwrites the oldest rows."""

    def __init__(self, size: int, dim: int, seed: int = 0):
        super().__init__()
        if size <= 0:
            raise ValueError(f"the queue size must be > 0, got {size}")
        generator = torch.Generator().manual_seed(seed)  # the same start on every rank
        self.register_buffer("image_feat", F.normalize(torch.randn(size, dim, generator=generator), dim=-1))
        self.register_buffer("text_feat", F.normalize(torch.randn(size, dim, generator=generator), dim=-1))
        self.register_buffer("ids", torch.full((size,), EMPTY_ID, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.ids.shape[0]

    @torch.no_grad()
    def enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, ids: torch.Tensor) -> None:
        """Writes every rank's rows (a collective under torch.distributed; a rank may bring none) at the pointer,
        wrapping around at the end; of more rows than the queue holds, the last ones stay."""
        image_feat, text_feat, ids = (gather_rows(t) for t in (image_feat, text_feat, ids))
        n = ids.shape[0]
        if n == 0:
            return
        if n > self.size:
            image_feat, text_feat, ids = image_feat[-self.size :], text_feat[-self.size :], ids[-self.size :]
            self.ptr.add_(n - self.size)  # as if the dropped rows had been written first
            n = self.size
        slots = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        self.image_feat[slots] = image_feat.to(self.image_feat.dtype)
        self.text_feat[slots] = text_feat.to(self.text_feat.dtype)
        self.ids[slots] = ids.to(self.ids.dtype)
        self.ptr.copy_((self.ptr + n) % self.size)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows in rank order (local row counts may differ); the tensor itself outside torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = torch.cat([x, x.new_zeros(max(sizes) - x.shape[0], *x.shape[1:])])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])
