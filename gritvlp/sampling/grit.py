"""GRIT sampling: the feature bank, greedy grouping of search spaces, and the grouped order of the next epoch."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gritvlp.sampling.order import epoch_generator

# Normalised similarities lie in [-1, 1]; same-group candidates get a score below any real one, so they are picked
# only when nothing else is left; visited candidates get -inf and are never picked.
_SAME_GROUP_SCORE = -4.0
# Elements of the [S, M, M] similarity batch materialised at once (2**28: 512 MiB in fp16, 1 GiB in fp32).
MAX_SIM_ELEMENTS = 2**28


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
    batches like any sample missing from the bank. Size the bank for one epoch of this rank: `len(sampler) *
    batch_size` (see `check_grit_sizes`).

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


@torch.no_grad()
def group_search_spaces(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    counts: torch.Tensor | None = None,
    group_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy GRIT grouping of S search spaces at once: image_feat, text_feat [S, M, D]; returns [S, M] visiting orders.

    Each walk starts at a random sample, then alternately goes to the unvisited sample whose text is most similar to
    the current image, and to the unvisited sample whose image is most similar to the current text. `counts` [S]
    (optional) marks spaces holding fewer than M real samples (the first counts[s]); their order lists the real
    samples first, the rest is meaningless. `group_ids` [S, M] (optional): a sample of the current one's group is
    picked only when no other unvisited sample is left. `start` [S] (optional) fixes the first samples instead of
    drawing them from `generator`. One [S, M, M] similarity product, then M - 1 steps of device ops with no host
    synchronisation.
    """
    s, m, _ = image_feat.shape
    device = image_feat.device
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    img = F.normalize(image_feat.float(), dim=-1).to(dtype)
    txt = F.normalize(text_feat.float(), dim=-1).to(dtype)
    sim = torch.bmm(img, txt.transpose(1, 2))  # sim[s, i, j] = image i . text j
    del img, txt
    sim.nan_to_num_(nan=_SAME_GROUP_SCORE)  # a NaN feature must not win an argmax over visited samples
    if group_ids is not None:
        g = group_ids.to(device)
        sim.masked_fill_(g[:, :, None] == g[:, None, :], _SAME_GROUP_SCORE)
    arange_m = torch.arange(m, device=device)
    penalty = torch.zeros(s, m, dtype=dtype, device=device)  # 0 for candidates, -inf once visited
    if counts is None:
        counts = torch.full((s,), m, dtype=torch.long)
    counts = counts.to(device)
    penalty.masked_fill_(arange_m[None, :] >= counts[:, None], float("-inf"))
    if start is None:
        rand = torch.rand(s, generator=generator, device=generator.device if generator is not None else "cpu")
        cur = (rand.to(device) * counts).long().clamp_(max=m - 1)
    else:
        cur = torch.as_tensor(start, dtype=torch.long).to(device)
    rows = torch.arange(s, device=device)
    order = torch.empty(s, m, dtype=torch.long, device=device)
    order[:, 0] = cur
    threads = torch.get_num_threads()
    if device.type == "cpu":  # thousands of tiny steps: OpenMP barriers cost more than they save, badly so under load
        torch.set_num_threads(1)
    try:
        for t in range(1, m):
            penalty[rows, cur] = float("-inf")
            # odd steps: texts similar to the current image (row); even: images similar to the current text (column)
            scores = sim[rows, cur] if t % 2 else sim[rows, :, cur]
            cur = (scores + penalty).argmax(dim=1)
            order[:, t] = cur
    finally:
        torch.set_num_threads(threads)
    return order


def group_search_space(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    generator: torch.Generator | None = None,
    group_ids: torch.Tensor | None = None,
    start: int | None = None,
) -> torch.Tensor:
    """Greedy GRIT grouping of one search space of M samples: start at a random sample; go to the unvisited sample
    whose text is most similar to the current image, then to the unvisited sample whose image is most similar to that
    text; alternate; visited samples removed. Returns the visiting order (a permutation of range(M)) on the features'
    device. `group_ids` [M] (optional): same-group samples are never picked as the most similar next sample while
    another candidate is left; `start` fixes the first sample. See `group_search_spaces` for the batched form."""
    groups = None if group_ids is None else torch.as_tensor(group_ids)[None]
    first = None if start is None else torch.tensor([start])
    return group_search_spaces(image_feat[None], text_feat[None], group_ids=groups, generator=generator, start=first)[0]


def check_grit_sizes(bank_size: int, search_space: int, batch_size: int, world_size: int = 1) -> None:
    """Validates the GRIT sizes of a configuration; raises ValueError naming the size that breaks the rule.

    L = bank_size (samples kept per rank for one epoch, at least len(sampler) * batch_size), M = search_space,
    B = batch_size (per rank). Rules: B >= 2; M a multiple of B (a search space is cut into whole mini-batches);
    L a multiple of M (each rank's bank is cut into whole search spaces; the gathered bank of L * world_size samples
    then holds L * world_size / M of them). At run time the bank may hold fewer samples than L (skipped samples, the
    last step); `grit_epoch_order` handles that with a smaller last search space.
    """
    L, M, B, W = bank_size, search_space, batch_size, world_size  # noqa: N806
    if W < 1:
        raise ValueError(f"world_size must be >= 1, got {W}")
    if B < 2:
        raise ValueError(f"batch size B={B} must be >= 2")
    if M < B or M % B:
        raise ValueError(f"search space M={M} must be a positive multiple of the batch size B={B}")
    if L < M or L % M:
        raise ValueError(f"bank size L={L} (per rank) must be a positive multiple of the search space M={M}")


def bank_capacity(sampler, search_space: int) -> int:
    """Per-rank bank size L for one epoch of `sampler` (an EpochBatchSampler): len(sampler) * batch_size, rounded up
    to a multiple of the search space M, so that `check_grit_sizes(L, M, B, W)` holds whenever M is valid."""
    need = len(sampler) * sampler.batch_size
    return -(-need // search_space) * search_space


def _group_rows(image_feat, text_feat, rows, groups, counts, starts, max_elements):
    """Groups the search spaces rows [S, M] (bank rows) a chunk of spaces at a time; returns [S, M] on CPU."""
    m, device = rows.shape[1], image_feat.device
    per_chunk = max(1, max_elements // (m * m))
    orders = [torch.empty(0, m, dtype=torch.long)]
    for lo in range(0, rows.shape[0], per_chunk):
        sl = slice(lo, lo + per_chunk)
        r = rows[sl].to(device)
        g = None if groups is None else groups[sl].to(device)
        orders.append(group_search_spaces(image_feat[r], text_feat[r], counts[sl], g, start=starts[sl]).cpu())
    return torch.cat(orders)


def _group_sharded(image_feat, text_feat, rows, groups, counts, starts, max_elements):
    """Each rank groups a contiguous share of the search spaces; the walks are all_gathered to every rank."""
    world, rank = dist.get_world_size(), dist.get_rank()
    s, m = rows.shape
    share = -(-s // world)
    sl = slice(rank * share, (rank + 1) * share)
    g = None if groups is None else groups[sl]
    local = _group_rows(image_feat, text_feat, rows[sl], g, counts[sl], starts[sl], max_elements)
    buf = torch.zeros(share, m, dtype=torch.long)
    buf[: local.shape[0]] = local
    buf = buf.to(_collective_device())
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf)
    return torch.cat(parts).cpu()[:s]


@torch.no_grad()
def grit_epoch_order(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    indices: torch.Tensor,
    num_samples: int,
    batch_size: int,
    search_space: int,
    shuffle_batches: bool = True,
    group_ids: torch.Tensor | None = None,
    seed: int = 0,
    epoch: int = 0,
    max_elements: int = MAX_SIM_ELEMENTS,
    distributed: bool | None = None,
) -> torch.Tensor:
    """Builds the GLOBAL order of epoch `epoch` (a CPU int64 permutation of range(num_samples)) from the gathered bank.

    The bank (all ranks; duplicate indices keep their first entry) is shuffled, cut into search spaces of
    `search_space` samples (the last one smaller when the bank is not a multiple), each grouped by
    `group_search_spaces`; the visiting orders are cut into mini-batches of `batch_size`. Samples missing from the bank
    (never seen, skipped, dropped) are shuffled into batches of their own. The full batches are then shuffled together
    (when `shuffle_batches`; otherwise grouped batches keep their order and the missing ones go to random positions),
    and the few samples of partial batches go last, where the sampler's final, partial step takes them.
    `group_ids` [num_samples] (same-image duplicates): same-group samples are never picked as each other's most
    similar next sample. Deterministic given (seed, epoch); grouping runs on the features' device, in chunks of at most
    `max_elements` similarity entries. With `distributed` (default: when torch.distributed is initialised with more
    than one rank) it is a collective: every rank must call it with the same gathered bank; each groups 1/world of the
    search spaces and the walks are all_gathered, so all ranks return the identical order.
    Raises ValueError when search_space is not a multiple of batch_size or is larger than the bank.
    """
    if batch_size < 1 or search_space < 1 or search_space % batch_size:
        raise ValueError(f"search_space={search_space} must be a positive multiple of batch_size={batch_size}")
    gen = epoch_generator(seed, epoch)
    grouped, seen = group_bank(
        image_feat, text_feat, indices, num_samples, search_space, group_ids, gen, distributed, max_elements
    )
    missing = (~seen).nonzero().flatten()
    missing = missing[torch.randperm(missing.numel(), generator=gen)]
    return _arrange(grouped, missing, batch_size, shuffle_batches, gen)


@torch.no_grad()
def group_bank(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    indices: torch.Tensor,
    num_samples: int,
    search_space: int,
    group_ids: torch.Tensor | None,
    gen: torch.Generator,
    distributed: bool | None = None,
    max_elements: int = MAX_SIM_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups a gathered bank: returns (dataset indices in visiting order, search space after search space, on CPU;
    a bool mask [num_samples] of the samples it held). See grit_epoch_order for the rules."""
    idx = torch.as_tensor(indices).detach().flatten().to("cpu", torch.long)
    if idx.numel() and (idx.min() < 0 or idx.max() >= num_samples):
        raise ValueError(f"bank indices must lie in [0, {num_samples})")
    first = torch.full((num_samples,), idx.numel(), dtype=torch.long)
    first.scatter_reduce_(0, idx, torch.arange(idx.numel()), reduce="amin")  # first bank row of each index
    keep = first[first < idx.numel()]
    if search_space > keep.numel():
        raise ValueError(f"search_space={search_space} is larger than the bank ({keep.numel()} distinct samples)")
    rows = keep[torch.randperm(keep.numel(), generator=gen)]  # example-level shuffle
    n, m = rows.numel(), search_space
    s = -(-n // m)
    pad = s * m - n
    rows_padded = torch.cat([rows, rows[:pad]]).view(s, m)  # padding entries are never visited (counts)
    counts = torch.full((s,), m, dtype=torch.long)
    counts[-1] = m - pad
    starts = (torch.rand(s, generator=gen) * counts).long().clamp_(max=m - 1)
    groups = None
    if group_ids is not None:
        groups = torch.as_tensor(group_ids).to("cpu", torch.long)[idx[rows_padded]]
    group = _group_sharded if (_distributed() if distributed is None else distributed) else _group_rows
    walk = group(image_feat, text_feat, rows_padded, groups, counts, starts, max_elements)
    visited = idx[rows_padded.gather(1, walk)]  # dataset indices in visiting order
    return torch.cat([visited[:-1].flatten(), visited[-1, : counts[-1]]]), first < idx.numel()


def _arrange(grouped, missing, batch_size, shuffle_batches, gen):
    """Full batches of grouped and missing samples in (shuffled) batch order, then all partial leftovers."""
    b = batch_size
    n_g, n_m = grouped.numel() // b * b, missing.numel() // b * b
    # grouped is laid out search space by search space; only the last space can end in a partial batch
    full_g, full_m = grouped[:n_g].view(-1, b), missing[:n_m].view(-1, b)
    if shuffle_batches:
        batches = torch.cat([full_g, full_m])
        batches = batches[torch.randperm(batches.shape[0], generator=gen)]
    else:
        total = full_g.shape[0] + full_m.shape[0]
        is_missing = torch.zeros(total, dtype=torch.bool)
        is_missing[torch.randperm(total, generator=gen)[: full_m.shape[0]]] = True
        batches = torch.empty(total, b, dtype=torch.long)
        batches[~is_missing], batches[is_missing] = full_g, full_m
    return torch.cat([batches.flatten(), grouped[n_g:], missing[n_m:]])
