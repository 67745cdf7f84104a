"""The GRIT schedule: during epoch e each rank keeps the features of its samples in a bank of L; every L / B
micro-steps it groups its own bank into mini-batches of similar samples, and at the end of the epoch the grouped
mini-batches of all ranks are shuffled together and dealt out again as the ranks' batches of epoch e + 1.

Features never leave their rank; only dataset indices travel, once per epoch: each rank sends each of its batches
to the rank that will train on it (8 bytes per sample), and keeps only its own share of the next epoch.
Samples a rank should have seen but did not bank (unreadable, or in a batch too small to train on) are put into
random batches of their own, so every sample is seen exactly once per epoch.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from gritvlp.sampling.bank import FeatureBank
from gritvlp.sampling.grouping import check_grit_sizes, group_bank, negative_similarity
from gritvlp.sampling.order import epoch_generator, split_evenly, steps_per_epoch


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    """CUDA for NCCL, CPU otherwise (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


class GritSchedule:
    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        world_size: int,
        bank_size: int,
        search_space: int,
        shuffle_batches: bool = True,
        group_ids=None,
        seed: int = 0,
        rank: int = 0,
        caption_ids=None,
    ):
        check_grit_sizes(bank_size, search_space, batch_size, world_size)
        self.num_samples, self.batch_size, self.world_size, self.rank = num_samples, batch_size, world_size, rank
        self.search_space, self.shuffle_batches = search_space, shuffle_batches
        self.group_ids, self.caption_ids, self.seed = group_ids, caption_ids, seed
        self.flush_every = bank_size // batch_size  # micro-steps
        self.bank = FeatureBank(bank_size)
        self.grouping_seconds = self.last_seconds = 0.0
        self.last_similarity = {"grouped": float("nan"), "random": float("nan")}
        self._reset_epoch()

    def _reset_epoch(self) -> None:
        self.grouped: list[torch.Tensor] = []  # this rank's grouped samples, flush by flush, in visiting order
        self.micro_steps = 0
        # (sum, count) of in-batch negative cosines of the grouped batches and of random batches of the same samples
        self.similarity = {"grouped": [0.0, 0], "random": [0.0, 0]}

    def add(self, image_feat: torch.Tensor, text_feat: torch.Tensor, index: torch.Tensor) -> None:
        """Stores one batch's detached normalised features (no extra forward pass)."""
        self.bank.add(image_feat.detach(), text_feat.detach(), index)

    def tick(self, epoch: int) -> float:
        """Called after every micro-step; groups this rank's bank when it is full (no collective).
        Returns the seconds spent grouping (0 on most steps)."""
        self.micro_steps += 1
        return self._flush(epoch) if self.micro_steps % self.flush_every == 0 else 0.0

    def _flush(self, epoch: int) -> float:
        start = time.perf_counter()
        image, text, index = self.bank.local()
        if index.numel():
            gen = epoch_generator(self.seed, (epoch * 1_000_003 + len(self.grouped)) * 4099 + self.rank)
            order = group_bank(image, text, index, self.search_space, self.group_ids, gen, caption_ids=self.caption_ids)
            self.grouped.append(order)
            self._measure(image, text, index, order, epoch)
            if image.is_cuda:
                torch.cuda.synchronize()
        self.bank.reset()
        self.last_seconds = time.perf_counter() - start
        self.grouping_seconds += self.last_seconds
        return self.last_seconds

    def _measure(self, image, text, index, order, epoch: int) -> None:
        """Adds the flush's batches to the epoch's similarity: the grouped ones (the visiting order cut into batches,
        as the next epoch gets them) and random batches of the same samples, from its own generator."""
        sorted_index, rows_by_index = index.cpu().sort()
        rows = rows_by_index[torch.searchsorted(sorted_index, order)]
        gen = epoch_generator(self.seed, (epoch * 1_000_003 + len(self.grouped)) * 4099 + self.rank + 7919)
        for name, batch_rows in (("grouped", rows), ("random", rows[torch.randperm(rows.numel(), generator=gen)])):
            total, count = negative_similarity(image, text, batch_rows, self.batch_size)
            self.similarity[name][0] += total
            self.similarity[name][1] += count

    def epoch_similarity(self) -> dict[str, float]:
        """This rank's mean in-batch negative cosine of the epoch's grouped batches and of random ones (nan before
        any flush). Read it before next_epoch_batches, which starts the next epoch's count."""
        return {name: total / count if count else float("nan") for name, (total, count) in self.similarity.items()}

    def next_epoch_batches(self, epoch: int, own_samples: torch.Tensor) -> list[torch.Tensor]:
        """Groups what is left in the bank and returns this rank's batches of `epoch` (the next one). A collective:
        every rank calls it at the end of the epoch. `own_samples`: every sample this rank was given this epoch."""
        self._flush(epoch - 1)
        self.last_similarity = self.epoch_similarity()
        local_gen = epoch_generator(self.seed, epoch * 4099 + 4098 - self.rank)  # this rank's own draws
        full, rest = self._local_batches(own_samples, local_gen)
        batches, tail = self._exchange(full, rest, epoch_generator(self.seed, epoch))  # the same on every rank
        self._reset_epoch()
        return batches + tail

    def _local_batches(self, own_samples: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's full batches [k, B] (grouped ones, then random batches of the samples it never banked) and
        the samples that fill no batch. Within a flush the visiting order is cut into batches; only a flush's last
        batch can be partial."""
        b = self.batch_size
        grouped = torch.cat([torch.empty(0, dtype=torch.long), *self.grouped])
        missing = own_samples[~torch.isin(own_samples, grouped)]
        missing = missing[torch.randperm(missing.numel(), generator=gen)]
        runs = [*self.grouped, missing]
        full = torch.cat([torch.empty(0, dtype=torch.long)] + [r[: r.numel() // b * b] for r in runs]).view(-1, b)
        rest = torch.cat([torch.empty(0, dtype=torch.long)] + [r[r.numel() // b * b :] for r in runs])
        return full, rest

    def _exchange(self, full: torch.Tensor, rest: torch.Tensor, gen: torch.Generator):
        """Deals every rank's full batches out again: global batch g goes to position pi(g) of a random permutation
        (the identity when not shuffling); position p belongs to rank p % W as its batch p // W. The positions past
        the last whole step, and every rank's leftover samples, form the epoch's tail, split like a random epoch's."""
        k_per_rank = _all_gather_counts([full.shape[0]])[:, 0]
        total, w, b = int(k_per_rank.sum()), self.world_size, self.batch_size
        steps = total // w
        position = torch.randperm(total, generator=gen) if self.shuffle_batches else torch.arange(total)
        first = int(k_per_rank[: self.rank].sum())
        mine = position[first : first + full.shape[0]]
        dealt = mine < steps * w
        received_batches, received_slots = _send_batches(full[dealt], mine[dealt], w, b)
        batches = torch.empty(steps, b, dtype=torch.long)
        batches[received_slots] = received_batches
        tail_samples = torch.cat([full[~dealt].flatten(), rest])
        tail = _all_gather_samples(tail_samples)
        tail = tail[torch.randperm(tail.numel(), generator=gen)]
        return list(batches.unbind(0)), _tail_batches(
            tail, w, b, self.rank, steps_per_epoch(self.num_samples, b, w) - steps
        )

    # -- checkpoints: everything here is this rank's own ---------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "grouped": self.grouped,
            "micro_steps": self.micro_steps,
            "grouping_seconds": self.grouping_seconds,
            "similarity": self.similarity,
            "bank": self.bank.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self._reset_epoch()
        self.grouped = list(state["grouped"])
        self.micro_steps, self.grouping_seconds = state["micro_steps"], state["grouping_seconds"]
        if "similarity" in state:  # absent from checkpoints of earlier releases
            self.similarity = {name: list(value) for name, value in state["similarity"].items()}
        self.bank.load_state_dict(state["bank"])


def _tail_batches(tail: torch.Tensor, world: int, batch: int, rank: int, num_steps: int) -> list[torch.Tensor]:
    """This rank's batches of the epoch's last `num_steps` steps, made of `tail` (the same on every rank): whole
    steps of world x batch samples, then the rest split evenly (as a random epoch's final step)."""
    step = world * batch
    out = []
    for s in range(num_steps):
        chunk = tail[s * step : (s + 1) * step]
        out.append(
            chunk[rank * batch : (rank + 1) * batch] if chunk.numel() == step else split_evenly(chunk, world, rank)
        )
    return out


def _all_gather_counts(values: list[int]) -> torch.Tensor:
    """[world, len(values)] of every rank's values (rank order)."""
    local = torch.tensor(values, dtype=torch.long)
    if not _distributed():
        return local[None]
    device = _collective_device()
    parts = [torch.empty_like(local, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.to(device))
    return torch.stack(parts).cpu()


def _all_gather_samples(samples: torch.Tensor) -> torch.Tensor:
    """Every rank's `samples` concatenated in rank order (sizes may differ)."""
    if not _distributed():
        return samples
    sizes = _all_gather_counts([samples.numel()])[:, 0].tolist()
    device = _collective_device()
    padded = torch.zeros(max(sizes), dtype=torch.long, device=device)
    padded[: samples.numel()] = samples.to(device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).cpu()


def _send_batches(batches: torch.Tensor, positions: torch.Tensor, world: int, batch: int):
    """Sends each batch to rank position % world with its slot position // world; returns what this rank received
    (batches [r, B], slots [r]). One all_to_all of indices: every sample crosses the network at most once."""
    dest = positions % world
    order = torch.argsort(dest, stable=True)
    send = torch.cat([positions[order, None], batches[order]], dim=1)  # [slot-position, B samples] per row
    split = torch.bincount(dest, minlength=world)
    if not _distributed():
        received = send
    else:
        device = _collective_device()
        received_split = torch.empty(world, dtype=torch.long, device=device)
        dist.all_to_all_single(received_split, split.to(device))
        received_rows = received_split.cpu()
        received = torch.empty(int(received_rows.sum()), batch + 1, dtype=torch.long, device=device)
        dist.all_to_all_single(
            received, send.to(device), output_split_sizes=received_rows.tolist(), input_split_sizes=split.tolist()
        )
        received = received.cpu()
    return received[:, 1:], received[:, 0] // world
