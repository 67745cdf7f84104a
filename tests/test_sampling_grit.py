import math

import pytest
import torch
import torch.nn.functional as F

from gritvlp.sampling.bank import FeatureBank
from gritvlp.sampling.grouping import check_grit_sizes, group_search_spaces
from gritvlp.sampling.schedule import GritSchedule


def walk(img, txt, start=None, group_ids=None, generator=None):
    """The visiting order of one search space."""
    groups = None if group_ids is None else group_ids[None]
    first = None if start is None else torch.tensor([start])
    return group_search_spaces(img[None], txt[None], group_ids=groups, generator=generator, start=first)[0]


def epoch_order(img, txt, idx, n, b, search_space, shuffle_batches=True, group_ids=None, seed=0, epoch=0,
                caption_ids=None):  # fmt: skip
    """The next epoch's order on one rank, as training builds it: a bank holding `idx`, grouped, then the samples
    it lacks in random batches, dealt out as the epoch's batches (flattened here)."""
    bank = max(search_space, -(-idx.numel() // search_space) * search_space)
    schedule = GritSchedule(n, b, 1, bank, search_space, shuffle_batches, group_ids, seed, caption_ids=caption_ids)
    schedule.bank.add(img, txt, idx)
    return torch.cat(schedule.next_epoch_batches(epoch, torch.arange(n)))


def unit(degrees):
    a = torch.tensor(degrees, dtype=torch.float32) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1)


def clustered(n, dim=32, clusters=8, noise=0.6, seed=0):
    """Unit features around `clusters` centres; `noise` is the norm of the (per-sample) perturbation."""
    g = torch.Generator().manual_seed(seed)
    noise = noise / dim**0.5
    centers = F.normalize(torch.randn(clusters, dim, generator=g), dim=-1)
    label = torch.randint(0, clusters, (n,), generator=g)
    img = F.normalize(centers[label] + noise * torch.randn(n, dim, generator=g), dim=-1)
    txt = F.normalize(centers[label] + noise * torch.randn(n, dim, generator=g), dim=-1)
    return img, txt


def is_perm(order, n):
    return torch.equal(torch.as_tensor(order).cpu().sort().values, torch.arange(n))


def test_walk_alternates_on_hand_example():
    # 2-d unit vectors: similarity = cos(angle difference), so "most similar" = nearest angle.
    img = unit([0, 90, 20, 190])
    txt = unit([100, 10, 200, 45])
    # start 0: image 0deg -> nearest text 10deg (1); text 10deg -> nearest image 20deg (2); image 20deg -> text (3).
    # (always image->text would give 0, 1, then image 90deg -> text 45deg (3), i.e. [0, 1, 3, 2])
    assert walk(img, txt, start=0).tolist() == [0, 1, 2, 3]
    # start 3: image 190deg -> text 200deg (2); text 200deg -> images 0/90deg: 90deg (1); then 0.
    assert walk(img, txt, start=3).tolist() == [3, 2, 1, 0]
    # samples 0 and 1 share an image: from image 0deg, text 10deg (1) is masked, so text 45deg (3), then image 20deg.
    assert walk(img, txt, start=0, group_ids=torch.tensor([5, 5, 6, 7])).tolist() == [0, 3, 2, 1]


def test_group_search_space_is_permutation_and_seeded():
    img, txt = clustered(200)
    a = walk(img, txt, generator=torch.Generator().manual_seed(1))
    b = walk(img, txt, generator=torch.Generator().manual_seed(1))
    assert is_perm(a, 200) and torch.equal(a, b)


def test_same_group_never_picked_as_most_similar():
    img, txt = clustered(120, noise=0.1)
    groups = torch.arange(120) // 3  # triples, like several captions of one image
    for t, order in enumerate(
        group_search_spaces(
            img[None].repeat(4, 1, 1),
            txt[None].repeat(4, 1, 1),
            group_ids=groups[None].repeat(4, 1),
            generator=torch.Generator().manual_seed(0),
        )
    ):
        assert is_perm(order, 120), t
        g = groups[order]
        for step in range(1, 120):
            if g[step] == g[step - 1]:  # allowed only when nothing of another group was left
                assert bool((g[step:] == g[step - 1]).all())


def test_batched_partial_space_lists_real_samples_first():
    img, txt = clustered(3 * 50)
    orders = group_search_spaces(
        img.view(3, 50, -1),
        txt.view(3, 50, -1),
        counts=torch.tensor([50, 50, 17]),
        generator=torch.Generator().manual_seed(0),
    )
    assert is_perm(orders[0], 50) and is_perm(orders[1], 50) and is_perm(orders[2, :17], 17)


def in_batch_similarity(order, img, txt, b):
    batches = order[: order.numel() // b * b].view(-1, b)
    return (img[batches] @ txt[batches].transpose(1, 2)).mean().item()


def test_grouped_batches_are_more_similar_than_random():
    n, b = 960, 16
    img, txt = clustered(n, clusters=6)
    order = epoch_order(img, txt, torch.arange(n), n, b, search_space=320, seed=0, epoch=1)
    assert is_perm(order, n)
    grouped = in_batch_similarity(order, img, txt, b)
    random = in_batch_similarity(torch.randperm(n, generator=torch.Generator().manual_seed(0)), img, txt, b)
    assert grouped > random + 0.3, (grouped, random)


def test_epoch_order_deterministic_and_epoch_dependent():
    img, txt = clustered(300)
    idx = torch.randperm(300, generator=torch.Generator().manual_seed(2))
    args = (img.half(), txt.half(), idx, 300, 10, 60)
    a, b = epoch_order(*args, seed=3, epoch=2), epoch_order(*args, seed=3, epoch=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, epoch_order(*args, seed=3, epoch=3))
    assert is_perm(epoch_order(*args, shuffle_batches=False, seed=3, epoch=2), 300)


def test_epoch_order_covers_samples_missing_from_bank():
    n, b = 500, 8
    img, txt = clustered(n)
    bank = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:347]
    bank = torch.cat([bank, bank[:5]])  # a sample padded twice into the bank appears once in the order
    for shuffle in (True, False):
        order = epoch_order(img[bank], txt[bank], bank, n, b, search_space=64, shuffle_batches=shuffle)
        assert is_perm(order, n)
        # every full batch is either all from the bank (grouped) or all missing: groups stay intact
        in_bank = torch.isin(order, bank)[: n // b * b].view(-1, b)
        assert bool((in_bank.all(1) | (~in_bank).all(1)).all())


def test_group_ids_in_epoch_order():
    n = 240
    img, txt = clustered(n, noise=0.05)
    groups = torch.arange(n) // 5
    order = epoch_order(
        img, txt, torch.arange(n), n, 8, search_space=240, shuffle_batches=False, group_ids=groups, seed=1
    )
    assert is_perm(order, n)
    g = groups[order]
    assert int((g[1:] == g[:-1]).sum()) <= 4  # only forced at the very end of the walk


def test_identical_captions_are_never_consecutive_in_the_walk():
    """Same-caption samples of different images sit close in feature space: without caption ids the walk pairs
    them up; with them it never steps from one to another while anything else is left."""
    n = 240
    captions = torch.arange(n) // 4  # quadruples share a caption; their features are nearer than any other's
    img, _ = clustered(n // 4, noise=0.6)
    txt = img
    g = torch.Generator().manual_seed(3)
    img, txt = (F.normalize(x[captions] + 0.02 * torch.randn(n, x.shape[1], generator=g), dim=-1) for x in (img, txt))
    common = dict(search_space=240, shuffle_batches=False, group_ids=torch.arange(n), seed=1)
    plain = captions[epoch_order(img, txt, torch.arange(n), n, 8, **common)]
    handled = captions[epoch_order(img, txt, torch.arange(n), n, 8, **common, caption_ids=captions)]
    assert int((plain[1:] == plain[:-1]).sum()) > n // 2  # grouping gathers the duplicates
    assert int((handled[1:] == handled[:-1]).sum()) <= 4  # only forced at the very end of the walk


def test_bad_sizes():
    with pytest.raises(ValueError, match="bank size L=1000"):
        check_grit_sizes(1000, 192, 64, 4)
    with pytest.raises(ValueError, match="search space M=100 must be a positive multiple of the batch size B=64"):
        check_grit_sizes(1000, 100, 64, 4)
    with pytest.raises(ValueError, match="B=1"):
        check_grit_sizes(1000, 100, 1)
    check_grit_sizes(48000, 1920, 128, 4)


def test_feature_bank_add_overflow_and_state():
    img, txt = clustered(10)
    bank = FeatureBank(8)
    bank.add(img[:4], txt[:4], torch.arange(4))
    bank.add(img[4:8].bfloat16(), txt[4:8].bfloat16(), torch.arange(4, 8))
    assert len(bank) == 8 and bank.image.dtype == torch.float16
    with pytest.raises(RuntimeError, match="full"):
        bank.add(img[8:], txt[8:], torch.arange(8, 10))
    i, t, x = bank.local()
    assert torch.equal(x, torch.arange(8)) and torch.allclose(i.float(), img[:8], atol=1e-3)
    state = bank.state_dict()
    restored = FeatureBank(8)
    restored.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(restored.local(), bank.local()))
    restored.reset()
    assert len(restored) == 0 and restored.local()[2].numel() == 0

    dropping = FeatureBank(5, overflow="drop")
    with pytest.warns(UserWarning, match="full"):
        dropping.add(img[:7], txt[:7], torch.arange(7))
    assert len(dropping) == 5 and dropping.dropped == 2
