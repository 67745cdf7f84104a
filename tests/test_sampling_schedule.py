"""The GRIT schedule over an epoch: each rank groups its own bank, batches are dealt out again, resume."""

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from gritvlp.sampling.order import EpochBatchSampler
from gritvlp.sampling.schedule import GritSchedule

N, B = 100, 4


def clustered_features(n=N, clusters=5, dim=16, seed=0):
    """Image and text features of sample i sit near centre i % clusters."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(clusters, dim, generator=g), dim=-1)
    cluster = torch.arange(n) % clusters
    noise = lambda: 0.1 * torch.randn(n, dim, generator=g)  # noqa: E731
    return F.normalize(centres[cluster] + noise(), dim=-1), F.normalize(centres[cluster] + noise(), dim=-1), cluster


def run_epoch(schedule, sampler, image, text, stop_after=None, lost=()):
    """Feeds the epoch's batches to the schedule as training does; samples in `lost` never reach the bank."""
    for step, batch in enumerate(sampler):
        sampler.advance()
        idx = torch.tensor([i for i in batch if i not in lost], dtype=torch.long)
        schedule.add(image[idx], text[idx], idx)
        schedule.tick(sampler.epoch)
        if stop_after is not None and step + 1 == stop_after:
            return


def purity(batches, cluster):
    stacked = torch.stack([b for b in batches if b.numel() == B])
    return (cluster[stacked] == cluster[stacked][:, :1]).float().mean().item()


def make(bank=20, space=20, seed=0):
    return GritSchedule(N, B, 1, bank_size=bank, search_space=space, seed=seed), EpochBatchSampler(N, B, seed=seed)


def test_next_epoch_is_every_sample_once_in_grouped_batches():
    image, text, cluster = clustered_features()
    schedule, sampler = make()
    sampler.set_epoch(0)
    run_epoch(schedule, sampler, image, text)
    batches = schedule.next_epoch_batches(1, sampler.own_samples())
    assert len(batches) == len(sampler)
    assert sorted(torch.cat(batches).tolist()) == list(range(N))
    random_batches = list(torch.randperm(N, generator=torch.Generator().manual_seed(1)).view(-1, B))
    assert purity(batches, cluster) > purity(random_batches, cluster) + 0.3


def test_epoch_similarity_measures_the_grouped_batches_against_random_ones():
    image, text, cluster = clustered_features()
    schedule, sampler = make()
    assert all(v != v for v in schedule.last_similarity.values())  # nan before any epoch
    sampler.set_epoch(0)
    run_epoch(schedule, sampler, image, text)
    batches = schedule.next_epoch_batches(1, sampler.own_samples())
    similarity = schedule.last_similarity

    def negative_cosine(bs):
        values = [((image[b] @ text[b].T).sum() - (image[b] * text[b]).sum()) / (B * (B - 1)) for b in bs]
        return torch.stack(values).mean().item()

    # every flush holds 20 samples = 5 whole batches, so the measured batches are exactly the next epoch's
    assert similarity["grouped"] == pytest.approx(negative_cosine(batches), abs=1e-3)  # the bank stores fp16
    assert similarity["grouped"] > similarity["random"] + 0.3
    # random batches of 5 equal clusters: a pair shares its cluster (cosine ~1) about a fifth of the time
    assert 0.05 < similarity["random"] < 0.45
    assert all(math.isnan(v) for v in schedule.epoch_similarity().values())  # the next epoch has not flushed yet


def test_samples_never_banked_fill_random_batches():
    image, text, _ = clustered_features()
    schedule, sampler = make()
    sampler.set_epoch(0)
    lost = set(range(0, N, 7))  # e.g. unreadable: the collator dropped them
    run_epoch(schedule, sampler, image, text, lost=lost)
    batches = schedule.next_epoch_batches(1, sampler.own_samples())
    assert sorted(torch.cat(batches).tolist()) == list(range(N))
    # a dealt batch is all grouped or all lost: groups are not diluted. Only the epoch's tail (each flush's last,
    # partial batch and the lost samples' remainder: under B each, 6 runs here) mixes them.
    for batch in batches[:-6]:
        in_lost = [int(i) in lost for i in batch]
        assert all(in_lost) or not any(in_lost)
    assert sum(all(int(i) in lost for i in batch) for batch in batches) >= len(lost) // B - 1


def test_resume_mid_epoch_builds_the_same_batches():
    image, text, _ = clustered_features()
    schedule, sampler = make()
    sampler.set_epoch(0)
    run_epoch(schedule, sampler, image, text)
    expected = schedule.next_epoch_batches(1, sampler.own_samples())

    schedule, sampler = make()
    sampler.set_epoch(0)
    run_epoch(schedule, sampler, image, text, stop_after=12)  # 48 samples: two flushes of 20, 8 in the bank
    saved = copy.deepcopy((schedule.state_dict(), sampler.state_dict()))
    schedule, sampler = make()
    schedule.load_state_dict(saved[0])
    sampler.load_state_dict(saved[1])
    run_epoch(schedule, sampler, image, text)
    resumed = schedule.next_epoch_batches(1, sampler.own_samples())
    assert all(torch.equal(a, b) for a, b in zip(resumed, expected)) and len(resumed) == len(expected)


def test_sizes_are_checked():
    with pytest.raises(ValueError, match="search space M=10 must be a positive multiple of the batch size B=4"):
        GritSchedule(N, B, 1, bank_size=20, search_space=10)
    with pytest.raises(ValueError, match="bank size L=30"):
        GritSchedule(N, B, 1, bank_size=30, search_space=20)


class Traffic:
    """Records every collective's tensors: what crosses between ranks."""

    def __init__(self):
        self.tensors = []

    def wrap(self, fn):
        def recorded(*args, **kwargs):
            self.tensors += [t for t in args if torch.is_tensor(t)] + [t for a in args if isinstance(a, list) for t in a]
            return fn(*args, **kwargs)

        return recorded


def _three_ranks(rank, world, path, out, n):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    traffic = Traffic()
    for name in ("all_gather", "all_to_all_single"):
        setattr(dist, name, traffic.wrap(getattr(dist, name)))
    image, text, cluster = clustered_features(n)
    sampler = EpochBatchSampler(n, B, rank=rank, world_size=world, seed=4)
    schedule = GritSchedule(n, B, world, bank_size=24, search_space=24, seed=4, rank=rank)
    sampler.set_epoch(0)
    run_epoch(schedule, sampler, image, text)
    batches = schedule.next_epoch_batches(1, sampler.own_samples())
    sampler.set_epoch(1, batches)  # the same number of batches on every rank, or this raises
    features_sent = sum(t.numel() for t in traffic.tensors if t.is_floating_point())
    indices_sent = sum(t.numel() for t in traffic.tensors if not t.is_floating_point())
    torch.save({"batches": batches, "floats": features_sent, "ints": indices_sent}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_three_ranks_group_their_own_banks_and_exchange_only_indices(tmp_path):
    n, world = 203, 3
    mp.spawn(_three_ranks, args=(world, str(tmp_path / "init"), tmp_path, n), nprocs=world)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    every = torch.cat([torch.cat(r["batches"]) for r in results])
    assert sorted(every.tolist()) == list(range(n))  # the next epoch is one permutation across the ranks
    assert len({len(r["batches"]) for r in results}) == 1
    _, _, cluster = clustered_features(n)
    random = list(torch.randperm(n, generator=torch.Generator().manual_seed(0))[: n // B * B].view(-1, B))
    grouped = [b for r in results for b in r["batches"]]
    assert purity(grouped, cluster) > purity(random, cluster) + 0.3
    for r in results:
        assert r["floats"] == 0  # no feature crossed between ranks ...
        assert r["ints"] < 3 * n  # ... only indices (and their slots and counts): a few per sample
