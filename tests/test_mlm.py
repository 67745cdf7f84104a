"""MLM inputs prepared on the host: the masking rules, and positions/targets the model can gather by."""

import pytest
import torch

from gritvlp.objectives.mlm import IGNORE_INDEX, mask_tokens, prepare_mlm

VOCAB, PAD, CLS, SEP, MASK = 30522, 0, 101, 102, 103
SPECIAL = dict(vocab_size=VOCAB, mask_token_id=MASK, pad_token_id=PAD, cls_token_id=CLS)


def captions(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """[CLS] words [SEP] [PAD]...: lengths vary so that padding is common."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, VOCAB, (batch, length), generator=g)
    lengths = torch.randint(3, length + 1, (batch,), generator=g)
    ids[:, 0] = CLS
    ids[torch.arange(batch), lengths - 1] = SEP
    ids[torch.arange(length)[None] >= lengths[:, None]] = PAD
    return ids


def prepare(ids, mask_prob=0.5, seed=0):
    return prepare_mlm(ids, **SPECIAL, mask_prob=mask_prob, generator=torch.Generator().manual_seed(seed))


def labelled(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    chosen = torch.zeros(ids.numel(), dtype=torch.bool)
    chosen[positions] = True
    return chosen.view(ids.shape)


def test_never_masks_pad_or_cls():
    ids = captions(64, 25)
    out = prepare(ids, mask_prob=1.0)
    chosen = labelled(ids, out["mlm_positions"])
    assert not chosen[(ids == PAD) | (ids == CLS)].any()
    assert chosen[(ids != PAD) & (ids != CLS)].all()  # at rate 1 every other token is labelled, SEP included
    assert (out["mlm_input_ids"][~chosen] == ids[~chosen]).all()


def test_rate_and_80_10_10_split_on_a_large_batch():
    ids = captions(800, 50)
    out = prepare(ids, mask_prob=0.5)
    chosen = labelled(ids, out["mlm_positions"])
    eligible = (ids != PAD) & (ids != CLS)
    assert chosen[eligible].float().mean().item() == pytest.approx(0.5, abs=0.01)
    corrupted = out["mlm_input_ids"][chosen]
    as_mask = (corrupted == MASK).float().mean().item()
    unchanged = (corrupted == ids[chosen]).float().mean().item()
    assert as_mask == pytest.approx(0.8, abs=0.01)
    assert unchanged == pytest.approx(0.1 + 0.1 / VOCAB, abs=0.01)  # 10% kept + random draws of the same id
    assert 1 - as_mask - unchanged == pytest.approx(0.1, abs=0.01)
    assert prepare(ids, mask_prob=0.15)["mlm_positions"].numel() / eligible.sum().item() == pytest.approx(0.15, abs=0.01)


def test_positions_and_targets_match_the_labels():
    ids = captions(32, 20)
    g = torch.Generator().manual_seed(5)
    corrupted, labels = mask_tokens(ids, **SPECIAL, mask_prob=0.5, generator=g)
    out = prepare(ids, seed=5)  # the same draws as mask_tokens with the same seed
    flat = labels.reshape(-1)
    assert torch.equal(out["mlm_input_ids"], corrupted)
    assert torch.equal(out["mlm_positions"], (flat != IGNORE_INDEX).nonzero().squeeze(1))
    assert torch.equal(out["mlm_targets"], ids.reshape(-1)[out["mlm_positions"]])
    assert out["mlm_positions"].dtype == out["mlm_targets"].dtype == torch.int64
    assert all(v.device.type == "cpu" for v in out.values())


def test_deterministic_given_the_generator_seed():
    ids = captions(16, 25)
    first, again, other = prepare(ids, seed=3), prepare(ids, seed=3), prepare(ids, seed=4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["mlm_positions"], other["mlm_positions"])


def test_no_labelled_token():
    out = prepare(captions(4, 10), mask_prob=0.0)
    assert out["mlm_positions"].shape == out["mlm_targets"].shape == (0,)


def test_rejects_ids_outside_the_vocabulary():
    ids = captions(2, 8)
    ids[1, 1] = VOCAB
    with pytest.raises(ValueError, match="token ids must lie in"):
        prepare(ids)
