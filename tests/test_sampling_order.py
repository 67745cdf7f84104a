import pytest
import torch
from torch.utils.data import DataLoader

from gritvlp.sampling.order import EpochBatchSampler, random_rank_batches
from gritvlp.sampling.permutation import permute

SIZES = [(64, 8, 1), (64, 8, 4), (70, 8, 4), (37, 5, 3), (10, 4, 2), (17, 3, 4), (3, 2, 2), (1, 2, 1), (101, 16, 2)]


def epoch_batches(n, b, world, seed=0, epoch=0, batches=None):
    samplers = [EpochBatchSampler(n, b, rank=r, world_size=world, seed=seed) for r in range(world)]
    for rank, s in enumerate(samplers):
        s.set_epoch(epoch, None if batches is None else batches[rank])
    return [list(s) for s in samplers], samplers


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 100, 1023, 1024, 1025, 99_991])
def test_permutation_is_a_bijection_and_keyed(n):
    image = permute(torch.arange(n), n, key=11)
    assert torch.equal(image.sort().values, torch.arange(n))
    if n > 50:
        other = permute(torch.arange(n), n, key=12)
        assert (image != other).float().mean() > 0.9  # another key, another order
        assert (image == torch.arange(n)).float().mean() < 0.05  # not close to the identity


def test_permutation_at_chosen_positions_needs_none_of_the_others():
    n = 10**9  # evaluated at 5 positions: nothing of size n is ever made
    positions = torch.tensor([0, 1, 17, 5 * 10**8, n - 1])
    image = permute(positions, n, key=3)
    assert image.unique().numel() == 5 and bool((image >= 0).all() and (image < n).all())
    assert torch.equal(image, permute(positions, n, key=3))


@pytest.mark.parametrize("n,b,world", SIZES)
def test_union_over_ranks_is_exactly_one_epoch(n, b, world):
    per_rank, samplers = epoch_batches(n, b, world, seed=3, epoch=1)
    assert {len(batches) for batches in per_rank} == {len(samplers[0])}  # the same number on every rank
    for batches in per_rank:  # full steps: batch_size each
        assert all(len(batch) == b for batch in batches[:-1])
    last = [len(batches[-1]) for batches in per_rank]
    assert max(last) - min(last) <= 1  # the final step is split evenly (a rank may get 0 or 1 samples)
    seen = torch.tensor([i for batches in per_rank for batch in batches for i in batch], dtype=torch.long)
    assert torch.equal(seen.sort().values, torch.arange(n))  # every sample exactly once, no padding
    for rank, s in enumerate(samplers):
        assert torch.equal(
            s.own_samples(), torch.tensor([i for batch in per_rank[rank] for i in batch], dtype=torch.long)
        )


def test_each_rank_computes_only_its_share():
    """A rank's batches come from its own positions of the permutation: the same as slicing the whole order."""
    n, b, world = 103, 4, 3
    order = permute(torch.arange(n), n, key=9)
    for rank in range(world):
        batches = random_rank_batches(n, b, rank, world, key=9)
        for step, batch in enumerate(batches[:-1]):
            start = step * world * b + rank * b
            assert torch.equal(batch, order[start : start + b])


def test_given_batches_are_respected():
    batches = [[torch.tensor([2 * s, 2 * s + 1]) for s in range(rank * 5, rank * 5 + 5)] for rank in range(2)]
    per_rank, _ = epoch_batches(20, 2, 2, batches=batches)
    assert per_rank == [[b.tolist() for b in batches[r]] for r in range(2)]
    s = EpochBatchSampler(20, 2, world_size=2)
    with pytest.raises(ValueError, match="must give this rank 5 batches"):
        s.set_epoch(1, batches[0][:4])


def test_determinism_seed_and_epoch():
    a, _ = epoch_batches(50, 4, 2, seed=7, epoch=2)
    b, _ = epoch_batches(50, 4, 2, seed=7, epoch=2)
    c, _ = epoch_batches(50, 4, 2, seed=7, epoch=3)
    d, _ = epoch_batches(50, 4, 2, seed=8, epoch=2)
    assert a == b
    assert a != c and a != d


@pytest.mark.parametrize("given", [False, True])
def test_resume_mid_epoch_matches_uninterrupted(given):
    n, b, world = 90, 4, 3
    grouped = None
    if given:  # a GRIT epoch: each rank's own batches, carried in its own state
        order = torch.randperm(n, generator=torch.Generator().manual_seed(5))
        grouped = [random_rank_batches(n, b, r, world, key=0) for r in range(world)]
        grouped = [[order[batch] for batch in rank_batches] for rank_batches in grouped]
    full, _ = epoch_batches(n, b, world, seed=1, epoch=4, batches=grouped)
    for rank in range(world):
        s = EpochBatchSampler(n, b, rank=rank, world_size=world, seed=1)
        s.set_epoch(4, None if grouped is None else grouped[rank])
        consumed = []
        for batch in s:  # the trainer advances after each consumed batch
            consumed.append(batch)
            s.advance()
            if len(consumed) == 3:
                break
        state = s.state_dict()
        assert (state["batches"] is None) == (not given)
        resumed = EpochBatchSampler(n, b, rank=rank, world_size=world, seed=1)
        resumed.load_state_dict(state)
        assert resumed.epoch == 4 and resumed.position == 3
        assert consumed + list(resumed) == full[rank]


def test_iteration_starts_at_position_when_iter_is_called():
    s = EpochBatchSampler(40, 4)
    s.set_epoch(0)
    full = list(s)
    it = iter(s)
    s.advance(2)  # a prefetching loader does not move the position; the trainer does, after iter() was taken
    assert list(it) == full
    assert list(s) == full[2:]
    s.set_epoch(0)
    assert list(s) == full


def test_dataloader_batch_sampler():
    s = EpochBatchSampler(23, 4, seed=2)
    s.set_epoch(1)
    loader = DataLoader(list(range(100, 123)), batch_sampler=s)
    assert len(loader) == len(s) == 6
    assert [b.tolist() for b in loader] == [[100 + i for i in batch] for batch in s]


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        EpochBatchSampler(10, 1)
    with pytest.raises(ValueError, match="rank"):
        EpochBatchSampler(10, 2, rank=2, world_size=2)
    s = EpochBatchSampler(10, 2)
    with pytest.raises(ValueError, match="advance"):
        s.advance(len(s) + 1)
    s.advance(1)
    other = EpochBatchSampler(10, 2, world_size=2)
    with pytest.raises(ValueError, match="mid-epoch"):
        other.load_state_dict(s.state_dict())
