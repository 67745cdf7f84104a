"""The per-rank batch sampler: a global epoch order cut into mini-batches, resumable mid-epoch."""

from __future__ import annotations

import torch


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, epoch)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63))


def random_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The plain random order of an epoch (used when no GRIT order is given, e.g. epoch 0)."""
    return torch.randperm(num_samples, generator=epoch_generator(seed, epoch))


def check_permutation(order: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Returns `order` as a CPU int64 tensor; raises ValueError unless it is a permutation of range(num_samples)."""
    order = torch.as_tensor(order).detach().to("cpu", torch.long).flatten()
    if order.numel() != num_samples:
        raise ValueError(f"epoch order has {order.numel()} entries, expected num_samples={num_samples}")
    if num_samples and (order.min() < 0 or order.max() >= num_samples):
        raise ValueError(f"epoch order has indices outside [0, {num_samples})")
    if not bool((torch.bincount(order, minlength=num_samples) == 1).all()):
        raise ValueError("epoch order is not a permutation: some indices repeat or are missing")
    return order


class EpochBatchSampler:
    """A `batch_sampler` for torch DataLoader; one instance per rank, all built with the same arguments but `rank`.

    Partition: the epoch's global order is cut into global steps of `world_size * batch_size` indices; within a step,
    rank r takes the r-th `batch_size` slice, so a GRIT order (consecutive runs of `batch_size` are grouped
    mini-batches) gives every rank one grouped mini-batch per step. Every sample appears exactly once per epoch across
    ranks and every rank yields `len(self)` batches. The remainder of the last step is split evenly over the ranks
    (sizes differ by at most one). Padding: each batch must hold at least 2 samples (contrastive losses need a
    negative); when the remainder is smaller than `2 * world_size`, the last step is padded with the fewest samples
    needed, re-used from the start of the epoch order, so those few samples are seen twice in that epoch.

    The position is driven by `advance()` (called by the trainer after each consumed batch), not by iteration,
    because DataLoader workers prefetch: `iter()` starts at the position at the time it is called.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (every batch needs a negative), got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self._epoch, self._position, self._order = 0, 0, None
        self._cache = None  # (epoch, this rank's batches)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        """Batches of the current epoch consumed so far (per rank; equal to global steps)."""
        return self._position

    def set_epoch(self, epoch: int, order: torch.Tensor | None = None) -> None:
        """Sets the GLOBAL sample order of this epoch (a permutation of range(num_samples), e.g. from GRIT grouping,
        already arranged so that consecutive runs of batch_size indices are mini-batches), or, when None, a plain
        random permutation that is a pure function of (seed, epoch). Resets the position to the start of the epoch."""
        self._order = None if order is None else check_permutation(order, self.num_samples)
        self._epoch, self._position, self._cache = int(epoch), 0, None

    def global_order(self) -> torch.Tensor:
        """The global order of the current epoch (CPU int64)."""
        if self._order is not None:
            return self._order
        return random_order(self.num_samples, self.seed, self._epoch)

    def _last_step(self, order: torch.Tensor) -> torch.Tensor:
        """Indices of the final, partial global step, padded to 2 per rank when needed."""
        step = self.world_size * self.batch_size
        tail = order[(self.num_samples // step) * step :]
        pad = 2 * self.world_size - tail.numel()
        if pad > 0:
            tail = torch.cat([tail, order.repeat(pad // self.num_samples + 1)[:pad]])
        return tail

    def _rank_batches(self) -> list[torch.Tensor]:
        if self._cache is not None and self._cache[0] == self._epoch:
            return self._cache[1]
        order, world, bs = self.global_order(), self.world_size, self.batch_size
        full = self.num_samples // (world * bs)
        batches = list(order[: full * world * bs].view(full, world, bs)[:, self.rank].unbind(0))
        if self.num_samples % (world * bs):
            tail = self._last_step(order)
            base, extra = divmod(tail.numel(), world)
            start = self.rank * base + min(self.rank, extra)
            batches.append(tail[start : start + base + (self.rank < extra)])
        self._cache = (self._epoch, batches)
        return batches

    def __len__(self) -> int:
        """Batches per rank per epoch (the same on every rank)."""
        return self.num_samples // (self.world_size * self.batch_size) + bool(
            self.num_samples % (self.world_size * self.batch_size)
        )

    def __iter__(self):
        """This rank's batches (lists of int dataset indices), from the position at the time of this call on."""
        batches = self._rank_batches()[self._position :]
        return (batch.tolist() for batch in batches)

    def advance(self, num_batches: int = 1) -> None:
        """Marks `num_batches` more batches of this epoch as consumed (the trainer calls this after each step)."""
        if num_batches < 0 or self._position + num_batches > len(self):
            raise ValueError(f"cannot advance by {num_batches} from batch {self._position} of {len(self)}")
        self._position += int(num_batches)

    def state_dict(self) -> dict:
        """Epoch, batches consumed in it, and the order when it is not the plain random one (identical on all ranks)."""
        order = self._order
        if order is not None and self.num_samples < 2**31:
            order = order.to(torch.int32)
        return {
            "epoch": self._epoch,
            "position": self._position,
            "order": order,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a state; iteration then resumes exactly at the next unconsumed batch. Do not call `set_epoch` for
        the resumed epoch afterwards (it would restart it)."""
        same = {k: state[k] == getattr(self, k) for k in ("num_samples", "batch_size", "world_size", "seed")}
        if not same["num_samples"]:
            raise ValueError(
                f"sampler state is for {state['num_samples']} samples, this dataset has {self.num_samples}"
            )
        if state["position"] and not all(same.values()):
            raise ValueError(
                "cannot resume mid-epoch with a different batch_size, world_size or seed: "
                f"saved { ({k: state[k] for k in same}) }, now batch_size={self.batch_size}, "
                f"world_size={self.world_size}, seed={self.seed}"
            )
        self.set_epoch(state["epoch"], state["order"])
        self.advance(state["position"])
