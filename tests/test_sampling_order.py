import pytest
import torch
from torch.utils.data import DataLoader

from gritvlp.sampling.order import EpochBatchSampler

SIZES = [(64, 8, 1), (64, 8, 4), (70, 8, 4), (37, 5, 3), (10, 4, 2), (17, 3, 4), (3, 2, 2), (1, 2, 1), (101, 16, 2)]


def epoch_batches(n, b, world, seed=0, epoch=0, order=None):
    samplers = [EpochBatchSampler(n, b, rank=r, world_size=world, seed=seed) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch, order)
    return [list(s) for s in samplers], samplers


@pytest.mark.parametrize("n,b,world", SIZES)
def test_union_over_ranks_is_one_epoch(n, b, world):
    per_rank, samplers = epoch_batches(n, b, world, seed=3, epoch=1)
    counts = {len(batches) for batches in per_rank}
    assert counts == {len(samplers[0])}  # same number of batches on every rank, equal to len()
    assert all(len(batch) >= 2 for batches in per_rank for batch in batches)
    for batches in per_rank:  # full steps: batch_size each
        assert all(len(batch) == b for batch in batches[:-1])
    last = [len(batches[-1]) for batches in per_rank]
    assert max(last) - min(last) <= 1
    seen = torch.tensor([i for batches in per_rank for batch in batches for i in batch])
    counts = torch.bincount(seen, minlength=n)
    assert bool((counts >= 1).all())  # every sample at least once
    pad = max(0, 2 * world - n % (world * b)) if n % (world * b) else 0
    assert seen.numel() == n + pad  # only the documented padding repeats samples
    if pad == 0:
        assert bool((counts == 1).all())


def test_padding_reuses_the_start_of_the_order():
    order = torch.arange(10).flip(0)
    per_rank, _ = epoch_batches(10, 4, 2, order=order)
    # steps: [9..2] -> rank0 [9,8,7,6], rank1 [5,4,3,2]; remainder [1,0] padded with [9,8]
    assert per_rank == [[[9, 8, 7, 6], [1, 0]], [[5, 4, 3, 2], [9, 8]]]


def test_given_order_is_respected():
    order = torch.randperm(30, generator=torch.Generator().manual_seed(1))
    per_rank, _ = epoch_batches(30, 3, 2, order=order)
    for r in range(2):
        for step, batch in enumerate(per_rank[r]):
            start = step * 6 + r * 3
            assert batch == order[start : start + 3].tolist()


def test_determinism_seed_and_epoch():
    a, _ = epoch_batches(50, 4, 2, seed=7, epoch=2)
    b, _ = epoch_batches(50, 4, 2, seed=7, epoch=2)
    c, _ = epoch_batches(50, 4, 2, seed=7, epoch=3)
    d, _ = epoch_batches(50, 4, 2, seed=8, epoch=2)
    assert a == b
    assert a != c and a != d


def test_resume_mid_epoch_matches_uninterrupted():
    order = torch.randperm(90, generator=torch.Generator().manual_seed(5))
    for given in (None, order):
        full, _ = epoch_batches(90, 4, 3, seed=1, epoch=4, order=given)
        for rank in range(3):
            s = EpochBatchSampler(90, 4, rank=rank, world_size=3, seed=1)
            s.set_epoch(4, given)
            consumed = []
            for batch in s:  # the trainer advances after each consumed batch
                consumed.append(batch)
                s.advance()
                if len(consumed) == 3:
                    break
            state = s.state_dict()
            assert (state["order"] is None) == (given is None)
            resumed = EpochBatchSampler(90, 4, rank=rank, world_size=3, seed=1)
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
    with pytest.raises(ValueError, match="permutation"):
        s.set_epoch(1, torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="entries"):
        s.set_epoch(1, torch.arange(9))
    with pytest.raises(ValueError, match="advance"):
        s.advance(len(s) + 1)
    s.advance(1)
    other = EpochBatchSampler(10, 2, world_size=2)
    with pytest.raises(ValueError, match="mid-epoch"):
        other.load_state_dict(s.state_dict())
