"""The GRIT schedule: during epoch e, features go into a bank of L samples per rank; every L / B micro-steps
(the banks are then full, on every rank at once) they are gathered from all ranks and grouped, and the grouped
mini-batches become epoch e+1's order.

Every rank holds the same grouped order (grouping is a collective), so the next epoch is re-partitioned
across ranks; samples never seen (skipped, or the padding of a last step) fill random batches, so every
sample is seen exactly once per epoch.
"""

from __future__ import annotations

import time

import torch

from gritvlp.sampling.bank import FeatureBank
from gritvlp.sampling.grouping import arrange, check_grit_sizes, group_bank
from gritvlp.sampling.order import epoch_generator


class GritSchedule:
    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        world_size: int,
        bank_size: int,
        search_space: int,
        shuffle_batches: bool = True,
        group_ids: torch.Tensor | None = None,
        seed: int = 0,
    ):
        check_grit_sizes(bank_size, search_space, batch_size, world_size)
        self.num_samples, self.batch_size = num_samples, batch_size
        self.search_space, self.shuffle_batches = search_space, shuffle_batches
        self.group_ids, self.seed = group_ids, seed
        self.flush_every = bank_size // batch_size  # micro-steps; identical on every rank, so flushes line up
        self.bank = FeatureBank(bank_size)
        self.grouping_seconds = self.last_seconds = 0.0
        self._reset_epoch()

    def _reset_epoch(self) -> None:
        self.grouped: list[torch.Tensor] = []  # full grouped mini-batches, flattened, in visiting order
        self.leftover: list[torch.Tensor] = []  # grouped samples that did not fill a last mini-batch
        self.seen = torch.zeros(self.num_samples, dtype=torch.bool)
        self.micro_steps = 0

    def add(self, image_feat: torch.Tensor, text_feat: torch.Tensor, index: torch.Tensor) -> None:
        """Stores one batch's detached normalised features (no extra forward pass)."""
        self.bank.add(image_feat.detach(), text_feat.detach(), index)

    def tick(self, epoch: int) -> float:
        """Called on every rank after every micro-step; groups the banks when they are full.
        Returns the seconds spent grouping (0 on most steps)."""
        self.micro_steps += 1
        return self._flush(epoch) if self.micro_steps % self.flush_every == 0 else 0.0

    def _flush(self, epoch: int) -> float:
        start = time.perf_counter()
        image, text, index = self.bank.gather()
        self.bank.reset()
        fresh = ~self.seen[index.cpu()]  # a sample re-used to pad a last step is grouped once only
        image, text, index = image[fresh.to(image.device)], text[fresh.to(text.device)], index[fresh.to(index.device)]
        distinct = int(torch.unique(index).numel())
        if distinct >= 2:
            gen = epoch_generator(self.seed, epoch * 1_000_003 + len(self.grouped))
            space = min(self.search_space, distinct)
            order, held = group_bank(image, text, index, self.num_samples, space, self.group_ids, gen)
            full = order.numel() // self.batch_size * self.batch_size  # only the last search space can be short
            self.grouped.append(order[:full])
            self.leftover.append(order[full:])
            self.seen |= held
        if image.is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        self.grouping_seconds += seconds
        self.last_seconds = seconds
        return seconds

    def next_epoch_order(self, epoch: int) -> torch.Tensor:
        """Groups what is left in the banks and returns the global order of `epoch` (the next one)."""
        self._flush(epoch - 1)
        gen = epoch_generator(self.seed, epoch)
        grouped = torch.cat([torch.empty(0, dtype=torch.long), *self.grouped])
        rest = torch.cat([*self.leftover, (~self.seen).nonzero().flatten()])
        rest = rest[torch.randperm(rest.numel(), generator=gen)]
        order = arrange(grouped, rest, self.batch_size, self.shuffle_batches, gen)
        self._reset_epoch()
        return order

    # -- checkpoints: the grouped part is the same on every rank; the bank is each rank's own ---------------
    def state_dict(self) -> dict:
        return {
            "grouped": self.grouped,
            "leftover": self.leftover,
            "micro_steps": self.micro_steps,
            "grouping_seconds": self.grouping_seconds,
        }

    def load_state_dict(self, state: dict) -> None:
        self._reset_epoch()
        self.grouped, self.leftover = list(state["grouped"]), list(state["leftover"])
        self.micro_steps, self.grouping_seconds = state["micro_steps"], state["grouping_seconds"]
        for part in self.grouped + self.leftover:
            self.seen[part] = True
