"""The per-rank batch sampler: this rank's share of an epoch's order, cut into mini-batches, resumable mid-epoch.

Each rank holds only its own batches: a random epoch is computed position by position from a permutation that is
never materialised (gritvlp.sampling.permutation), a GRIT epoch arrives as this rank's batches from the schedule.
"""

from __future__ import annotations

import torch

from gritvlp.sampling.permutation import permute


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, epoch)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63))


def epoch_key(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch)) % (2**63)


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Global steps of an epoch: full steps of world_size x batch_size samples, and a final partial one."""
    return -(-num_samples // (world_size * batch_size))


def split_evenly(samples: torch.Tensor, parts: int, part: int) -> torch.Tensor:
    """Part `part` of `samples` cut into `parts` runs whose sizes differ by at most one (some may be empty)."""
    base, extra = divmod(samples.numel(), parts)
    start = part * base + min(part, extra)
    return samples[start : start + base + (part < extra)]


def random_rank_batches(num_samples: int, batch_size: int, rank: int, world_size: int, key: int) -> list[torch.Tensor]:
    """This rank's batches of a random epoch. The epoch's order is pi(0), pi(1), ... cut into global steps of
    world_size x batch_size; within a step rank r takes the r-th batch_size slice; the final partial step is split
    evenly over the ranks (a rank may get fewer than 2 samples, or none: the trainer then stands a previous batch
    in with a zero loss, so every sample is still seen exactly once)."""
    step = world_size * batch_size
    full = num_samples // step
    starts = torch.arange(full, dtype=torch.long)[:, None] * step + rank * batch_size
    positions = (starts + torch.arange(batch_size)).flatten()
    batches = list(permute(positions, num_samples, key).view(full, batch_size).unbind(0)) if full else []
    if num_samples % step:
        tail = torch.arange(full * step, num_samples, dtype=torch.long)
        batches.append(permute(split_evenly(tail, world_size, rank), num_samples, key))
    return batches


class EpochBatchSampler:
    """A `batch_sampler` for torch DataLoader; one instance per rank, all built with the same arguments but `rank`.

    Every sample appears exactly once per epoch across ranks and every rank yields `len(self)` batches. The
    position is driven by `advance()` (called by the trainer after each consumed batch), not by iteration, because
    DataLoader workers prefetch: `iter()` starts at the position at the time it is called.
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
        self._epoch, self._position = 0, 0
        self._given: list[torch.Tensor] | None = None  # this rank's batches of a GRIT epoch
        self._cache = None  # (epoch, this rank's batches)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        """Batches of the current epoch consumed so far (per rank; equal to global steps)."""
        return self._position

    def set_epoch(self, epoch: int, batches: list[torch.Tensor] | None = None) -> None:
        """Starts `epoch` with this rank's `batches` (from the GRIT schedule), or, when None, this rank's share of a
        random order that is a pure function of (seed, epoch)."""
        if batches is not None and len(batches) != len(self):
            raise ValueError(f"a GRIT epoch must give this rank {len(self)} batches, got {len(batches)}")
        self._given = None if batches is None else [torch.as_tensor(b, dtype=torch.long) for b in batches]
        self._epoch, self._position, self._cache = int(epoch), 0, None

    def rank_batches(self) -> list[torch.Tensor]:
        """This rank's batches of the current epoch (CPU int64)."""
        if self._given is not None:
            return self._given
        if self._cache is None or self._cache[0] != self._epoch:
            key = epoch_key(self.seed, self._epoch)
            self._cache = (self._epoch, random_rank_batches(self.num_samples, self.batch_size, self.rank,
                                                            self.world_size, key))  # fmt: skip
        return self._cache[1]

    def own_samples(self) -> torch.Tensor:
        """Every sample this rank sees in the current epoch."""
        batches = self.rank_batches()
        return torch.cat(batches) if batches else torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        """Batches per rank per epoch (the same on every rank and in every epoch)."""
        return steps_per_epoch(self.num_samples, self.batch_size, self.world_size)

    def __iter__(self):
        """This rank's batches (lists of int dataset indices), from the position at the time of this call on."""
        return (batch.tolist() for batch in self.rank_batches()[self._position :])

    def advance(self, num_batches: int = 1) -> None:
        """Marks `num_batches` more batches of this epoch as consumed (the trainer calls this after each step)."""
        if num_batches < 0 or self._position + num_batches > len(self):
            raise ValueError(f"cannot advance by {num_batches} from batch {self._position} of {len(self)}")
        self._position += int(num_batches)

    def state_dict(self) -> dict:
        """This rank's state: epoch, batches consumed in it, and its batches when they are not the random ones."""
        given = None
        if self._given is not None:
            dtype = torch.int32 if self.num_samples < 2**31 else torch.long
            given = {
                "samples": torch.cat(self._given).to(dtype),
                "sizes": torch.tensor([b.numel() for b in self._given]),
            }
        return {
            "epoch": self._epoch,
            "position": self._position,
            "batches": given,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "rank": self.rank,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a state; iteration then resumes exactly at the next unconsumed batch. Do not call `set_epoch` for
        the resumed epoch afterwards (it would restart it)."""
        same = {k: state[k] == getattr(self, k) for k in ("num_samples", "batch_size", "world_size", "rank", "seed")}
        if not same["num_samples"]:
            raise ValueError(
                f"sampler state is for {state['num_samples']} samples, this dataset has {self.num_samples}"
            )
        given = state.get("batches")
        if (state["position"] or given is not None) and not all(same.values()):
            raise ValueError(
                "cannot resume mid-epoch or a grouped epoch with a different batch_size, world_size, rank or seed: "
                f"saved { ({k: state[k] for k in same}) }, now batch_size={self.batch_size}, "
                f"world_size={self.world_size}, rank={self.rank}, seed={self.seed}"
            )
        batches = None if given is None else list(given["samples"].long().split(given["sizes"].tolist()))
        self.set_epoch(state["epoch"], batches)
        self.advance(state["position"])
