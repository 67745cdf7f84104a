"""GRIT grouping: greedy walks over search spaces of similar samples, and the grouped order they make."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Normalised similarities lie in [-1, 1]; same-group candidates get a score below any real one, so they are picked
# only when nothing else is left; visited candidates get -inf and are never picked.
_SAME_GROUP_SCORE = -4.0
# Elements of the [S, M, M] similarity batch materialised at once (2**28: 512 MiB in fp16, 1 GiB in fp32).
MAX_SIM_ELEMENTS = 2**28


@torch.no_grad()
def group_search_spaces(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    counts: torch.Tensor | None = None,
    group_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
    caption_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy GRIT grouping of S search spaces at once: image_feat, text_feat [S, M, D]; returns [S, M] visiting orders.

    Each walk starts at a random sample, then alternately goes to the unvisited sample whose text is most similar to
    the current image, and to the unvisited sample whose image is most similar to the current text. `counts` [S]
    (optional) marks spaces holding fewer than M real samples (the first counts[s]); their order lists the real
    samples first, the rest is meaningless. `group_ids` [S, M] (optional): a sample of the current one's group is
    picked only when no other unvisited sample is left; `caption_ids` [S, M] (optional) likewise for a sample with
    the current one's caption (the two are positives of each other, never a hard negative pair). `start` [S]
    (optional) fixes the first samples instead of drawing them from `generator`. One [S, M, M] similarity product,
    then M - 1 steps of device ops with no host synchronisation.
    """
    s, m, _ = image_feat.shape
    device = image_feat.device
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    img = F.normalize(image_feat.float(), dim=-1).to(dtype)
    txt = F.normalize(text_feat.float(), dim=-1).to(dtype)
    sim = torch.bmm(img, txt.transpose(1, 2))  # sim[s, i, j] = image i . text j
    del img, txt
    sim.nan_to_num_(nan=_SAME_GROUP_SCORE)  # a NaN feature must not win an argmax over visited samples
    for ids in (group_ids, caption_ids):
        if ids is not None:
            g = ids.to(device)
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


@torch.no_grad()
def negative_similarity(image_feat: torch.Tensor, text_feat: torch.Tensor, rows: torch.Tensor, batch_size: int):
    """(sum, count) over the full batches of `rows` (bank rows in order, cut into batches of batch_size; the rest is
    left out) of each batch's mean image-text cosine over its in-batch negative pairs: how hard the negatives of
    these batches are, in the features they were grouped by."""
    k = rows.numel() // batch_size if batch_size > 1 else 0
    if k == 0:
        return 0.0, 0
    r = rows[: k * batch_size].to(image_feat.device).view(k, batch_size)
    sim = torch.bmm(F.normalize(image_feat[r].float(), dim=-1), F.normalize(text_feat[r].float(), dim=-1).transpose(1, 2))
    negatives = sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(1)
    return float((negatives / (batch_size * (batch_size - 1))).sum()), k


def check_grit_sizes(bank_size: int, search_space: int, batch_size: int, world_size: int = 1) -> None:
    """Validates the GRIT sizes of a configuration; raises ValueError naming the size that breaks the rule.

    L = bank_size (samples kept per rank for one epoch, at least len(sampler) * batch_size), M = search_space,
    B = batch_size (per rank). Rules: B >= 2; M a multiple of B (a search space is cut into whole mini-batches);
    L a multiple of M (each rank's bank is cut into whole search spaces; the gathered bank of L * world_size samples
    then holds L * world_size / M of them). At run time the bank may hold fewer samples than L (skipped samples, the
    last step); group_bank handles that with a smaller last search space.
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


def _group_rows(image_feat, text_feat, rows, id_columns, counts, starts, max_elements):
    """Groups the search spaces rows [S, M] (bank rows) a chunk of spaces at a time; returns [S, M] on CPU.
    id_columns: (group ids, caption ids), each [S, M] or None."""
    m, device = rows.shape[1], image_feat.device
    per_chunk = max(1, max_elements // (m * m))
    orders = [torch.empty(0, m, dtype=torch.long)]
    for lo in range(0, rows.shape[0], per_chunk):
        sl = slice(lo, lo + per_chunk)
        r = rows[sl].to(device)
        groups, captions = (None if ids is None else ids[sl].to(device) for ids in id_columns)
        order = group_search_spaces(image_feat[r], text_feat[r], counts[sl], groups, start=starts[sl],
                                    caption_ids=captions)  # fmt: skip
        orders.append(order.cpu())
    return torch.cat(orders)


def _ids_of(ids, dataset_indices: torch.Tensor) -> torch.Tensor | None:
    """ids (a tensor or an array indexable by dataset index) of the given dataset indices, as a long tensor."""
    if ids is None:
        return None
    if torch.is_tensor(ids):
        return ids[dataset_indices].long()
    return torch.as_tensor(ids[dataset_indices.numpy()]).long()


@torch.no_grad()
def group_bank(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    indices: torch.Tensor,
    search_space: int,
    group_ids: torch.Tensor | None,
    gen: torch.Generator,
    max_elements: int = MAX_SIM_ELEMENTS,
    caption_ids=None,
) -> torch.Tensor:
    """Groups one rank's bank: the dataset indices it holds, in visiting order, search space after search space
    (CPU int64).

    The bank (duplicate indices keep their first entry) is shuffled and cut into search spaces of `search_space`
    samples (the last one smaller when the bank is not a multiple), each grouped by group_search_spaces on the
    features' device, in chunks of at most `max_elements` similarity entries. `group_ids` (indexable by dataset
    index; same-image duplicates) and `caption_ids` (identical captions): samples sharing either are never picked
    as each other's most similar next sample.
    Deterministic given `gen`.
    """
    idx = torch.as_tensor(indices).detach().flatten().to("cpu", torch.long)
    if idx.numel() == 0:
        return idx
    order = torch.argsort(idx, stable=True)
    first = torch.ones(idx.numel(), dtype=torch.bool)
    first[order[1:]] = idx[order[1:]] != idx[order[:-1]]  # the first bank row of each index
    keep = first.nonzero().flatten()
    rows = keep[torch.randperm(keep.numel(), generator=gen)]  # example-level shuffle
    n, m = rows.numel(), min(search_space, keep.numel())
    s = -(-n // m)
    pad = s * m - n
    rows_padded = torch.cat([rows, rows[:pad]]).view(s, m)  # padding entries are never visited (counts)
    counts = torch.full((s,), m, dtype=torch.long)
    counts[-1] = m - pad
    starts = (torch.rand(s, generator=gen) * counts).long().clamp_(max=m - 1)
    id_columns = tuple(_ids_of(ids, idx[rows_padded]) for ids in (group_ids, caption_ids))
    walk = _group_rows(image_feat, text_feat, rows_padded, id_columns, counts, starts, max_elements)
    visited = idx[rows_padded.gather(1, walk)]  # dataset indices in visiting order
    return torch.cat([visited[:-1].flatten(), visited[-1, : counts[-1]]])
