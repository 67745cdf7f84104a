"""The GRIT feature bank: per rank, the detached features and dataset indices of the samples seen since the last
flush, kept on the features' device until the schedule groups them."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    """CUDA for NCCL, CPU otherwise (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


class FeatureBank:
    """Per rank: after every optimiser step the trainer calls add(image_feat [b, D], text_feat [b, D], index [b]) with
    detached normalised features and dataset indices (fp16/bf16/fp32, CUDA or CPU). Up to `capacity` samples are kept
    in tensors preallocated on the first add, on the features' device, in `dtype` (fp16 by default).

    Overflow: with overflow="error" (default) adding past `capacity` raises RuntimeError; with overflow="drop" the
    extra samples are not stored (counted in `dropped`, one warning) and the next epoch order places them in random
    batches like any sample missing from the bank. The schedule flushes the bank every capacity / batch_size
    micro-steps, so it never overflows in training.

    `gather()` returns all ranks' banks concatenated in rank order (all_gather when torch.distributed is initialised,
    varying sizes handled), else the local bank. `state_dict()` holds the collected features on CPU so a mid-epoch
    checkpoint keeps them; it is per rank (save one per rank).
    """

    def __init__(self, capacity: int, dtype: torch.dtype = torch.float16, overflow: str = "error"):
        if capacity < 1:
            raise ValueError(f"FeatureBank capacity must be >= 1, got {capacity}")
        if overflow not in ("error", "drop"):
            raise ValueError(f"overflow must be 'error' or 'drop', got {overflow!r}")
        self.capacity, self.dtype, self.overflow = int(capacity), dtype, overflow
        self.image = self.text = self.index = None
        self.size = self.dropped = 0

    def __len__(self) -> int:
        return self.size

    def _allocate(self, dim: int, device: torch.device) -> None:
        self.image = torch.empty(self.capacity, dim, dtype=self.dtype, device=device)
        self.text = torch.empty(self.capacity, dim, dtype=self.dtype, device=device)
        self.index = torch.empty(self.capacity, dtype=torch.long, device=device)

    @torch.no_grad()
    def add(self, image_feat: torch.Tensor, text_feat: torch.Tensor, index: torch.Tensor) -> None:
        index = torch.as_tensor(index).flatten()
        b = image_feat.shape[0]
        if text_feat.shape != image_feat.shape or index.numel() != b:
            raise ValueError(
                f"add() needs image/text [b, D] and index [b]; got {image_feat.shape}, "
                f"{text_feat.shape}, {tuple(index.shape)}"
            )
        if self.image is None:
            self._allocate(image_feat.shape[1], image_feat.device)
        elif self.image.device != image_feat.device:  # e.g. restored on CPU, now fed from CUDA
            self.image, self.text, self.index = (t.to(image_feat.device) for t in (self.image, self.text, self.index))
        room = self.capacity - self.size
        if b > room:
            if self.overflow == "error":
                raise RuntimeError(
                    f"FeatureBank is full: {self.size}/{self.capacity} stored, {b} more added; "
                    "size the bank for one epoch of this rank (len(sampler) * batch_size)"
                )
            if not self.dropped:
                warnings.warn(f"FeatureBank full at {self.capacity}; extra samples get random batches", stacklevel=2)
            self.dropped += b - room
            b = room
        end = self.size + b
        self.image[self.size : end] = image_feat[:b].detach()
        self.text[self.size : end] = text_feat[:b].detach()
        self.index[self.size : end] = index[:b].to(self.index.device)
        self.size = end

    def local(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.image is None:
            empty = torch.empty(0, 0, dtype=self.dtype)
            return empty, empty.clone(), torch.empty(0, dtype=torch.long)
        return self.image[: self.size], self.text[: self.size], self.index[: self.size]

    @torch.no_grad()
    def gather(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image [n, D], text [n, D], index [n]) of all ranks, rank 0 first; the local bank when not distributed."""
        img, txt, idx = self.local()
        if not _distributed():
            return img, txt, idx
        device = _collective_device()
        img, txt, idx = img.to(device), txt.to(device), idx.to(device)
        meta = torch.tensor([img.shape[0], img.shape[1]], dtype=torch.long, device=device)
        metas = [torch.empty_like(meta) for _ in range(dist.get_world_size())]
        dist.all_gather(metas, meta)
        sizes, dim = [int(m[0]) for m in metas], max(int(m[1]) for m in metas)
        feats = torch.zeros(max(sizes), 2, dim, dtype=self.dtype, device=device)
        index = torch.zeros(max(sizes), dtype=torch.long, device=device)
        if img.shape[0]:
            feats[: img.shape[0], 0], feats[: img.shape[0], 1], index[: img.shape[0]] = img, txt, idx
        feats_all = [torch.empty_like(feats) for _ in sizes]
        index_all = [torch.empty_like(index) for _ in sizes]
        dist.all_gather(feats_all, feats)
        dist.all_gather(index_all, index)
        feats = torch.cat([f[:n] for f, n in zip(feats_all, sizes)])
        return feats[:, 0], feats[:, 1], torch.cat([i[:n] for i, n in zip(index_all, sizes)])

    def reset(self) -> None:
        """Empties the bank (keeps the allocation); call after the next epoch's order is built."""
        self.size = self.dropped = 0

    def state_dict(self) -> dict:
        img, txt, idx = self.local()
        return {
            "capacity": self.capacity,
            "dropped": self.dropped,
            "image": img.cpu().clone(),
            "text": txt.cpu().clone(),
            "index": idx.cpu().clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        n = state["index"].numel()
        if n > self.capacity:
            raise ValueError(f"bank state holds {n} samples, more than capacity {self.capacity}")
        device = self.image.device if self.image is not None else torch.device("cpu")
        self.size, self.dropped = 0, int(state.get("dropped", 0))
        if n:
            self._allocate(state["image"].shape[1], device)
            self.add(state["image"].to(device), state["text"].to(device), state["index"].to(device))
