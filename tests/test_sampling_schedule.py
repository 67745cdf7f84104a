"""The GRIT schedule over an epoch: banks flushed every L samples, the next epoch's order, resume."""

import copy

import pytest
import torch
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


def run_epoch(schedule, sampler, image, text, stop_after=None):
    for step, batch in enumerate(sampler):
        sampler.advance()
        idx = torch.tensor(batch)
        schedule.add(image[idx], text[idx], idx)
        schedule.tick(sampler.epoch)
        if stop_after is not None and step + 1 == stop_after:
            return False
    return True


def make(bank=20, space=20, seed=0):
    return GritSchedule(N, B, 1, bank_size=bank, search_space=space, seed=seed), EpochBatchSampler(N, B, seed=seed)


def test_next_order_is_a_permutation_and_groups_similar_samples():
    image, text, cluster = clustered_features()
    schedule, sampler = make()
    sampler.set_epoch(0)
    run_epoch(schedule, sampler, image, text)
    order = schedule.next_epoch_order(1)
    assert sorted(order.tolist()) == list(range(N))
    batches = order.view(-1, B)
    purity = lambda bs: (cluster[bs] == cluster[bs][:, :1]).float().mean().item()  # noqa: E731
    random_batches = torch.randperm(N, generator=torch.Generator().manual_seed(1)).view(-1, B)
    assert purity(batches) > purity(random_batches) + 0.3


def test_padding_samples_are_grouped_once():
    image, text, _ = clustered_features(n=N)
    schedule = GritSchedule(N, B, 3, bank_size=8, search_space=8)
    # 3 ranks: the last step of 100 samples is padded with re-used samples; feed every rank's batches here.
    samplers = [EpochBatchSampler(N, B, rank=r, world_size=3) for r in range(3)]
    for s in samplers:
        s.set_epoch(0)
    for batches in zip(*samplers):
        for batch in batches:
            idx = torch.tensor(batch)
            schedule.bank.capacity = 10**6  # one process stands in for three ranks' banks
            schedule.add(image[idx], text[idx], idx)
        schedule.tick(0)
    order = schedule.next_epoch_order(1)
    assert sorted(order.tolist()) == list(range(N))


def test_resume_mid_epoch_builds_the_same_order():
    image, text, _ = clustered_features()
    schedule, sampler = make()
    sampler.set_epoch(0)
    run_epoch(schedule, sampler, image, text)
    expected = schedule.next_epoch_order(1)

    schedule, sampler = make()
    sampler.set_epoch(0)
    run_epoch(schedule, sampler, image, text, stop_after=12)  # 48 samples: two flushes of 20, 8 in the bank
    saved = copy.deepcopy((schedule.state_dict(), schedule.bank.state_dict(), sampler.state_dict()))
    schedule, sampler = make()
    schedule.load_state_dict(saved[0])
    schedule.bank.load_state_dict(saved[1])
    sampler.load_state_dict(saved[2])
    run_epoch(schedule, sampler, image, text)
    assert torch.equal(schedule.next_epoch_order(1), expected)


def test_sizes_are_checked():
    with pytest.raises(ValueError, match="search space M=10 must be a positive multiple of the batch size B=4"):
        GritSchedule(N, B, 1, bank_size=20, search_space=10)
    with pytest.raises(ValueError, match="bank size L=30"):
        GritSchedule(N, B, 1, bank_size=30, search_space=20)
