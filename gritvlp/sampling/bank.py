"""The GRIT feature bank: per rank, the detached features and dataset indices of the samples seen since the last
flush, kept on the features' device until the schedule groups them."""

from __future__ import annotations

import warnings

import torch


class FeatureBank:
    """Per rank: after every optimiser step the trainer calls add(image_feat [b, D], text_feat [b, D], index [b]) with
    detached normalised features and dataset indices (fp16/bf16/fp32, CUDA or CPU). Up to `capacity` samples are kept
    in tensors preallocated on the first add, on the features' device, in `dtype` (fp16 by default).

    Overflow: with overflow="error" (default) adding past `capacity` raises RuntimeError; with overflow="drop" the
    extra samples are not stored (counted in `dropped`, one warning) and the next epoch order places them in random
    batches like any sample missing from the bank. The schedule flushes the bank every capacity / batch_size
    micro-steps, so it never overflows in training.

    The bank never leaves its rank: the schedule groups each rank's bank where it is, and only dataset indices
    travel between ranks. `state_dict()` holds the collected features on CPU so a mid-epoch checkpoint keeps them;
    it is per rank (saved in each rank's own checkpoint file).
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
