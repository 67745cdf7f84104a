"""The trainer's micro-step pieces, without DeepSpeed: non-finite losses, bank features, per-step MLM inputs."""

import logging

import pytest
import torch

from gritvlp.config import load_config
from gritvlp.model.gritvlp import GritVLP
from gritvlp.objectives.pretraining import PretrainingObjective
from gritvlp.train.step import (
    MAX_CONSECUTIVE_BAD_STEPS,
    NonFiniteGuard,
    bank_features,
    forward_backward,
    step_seed,
    to_device,
)


def with_mlm_inputs(batch, objective, seed):
    return objective.prepare_batch(batch, torch.Generator().manual_seed(seed))

CPU = torch.device("cpu")


class ScalarEngine:
    """An engine whose loss is 2 * weight + value: the weight's gradient is twice what backward was given.
    (A non-finite value upstream of a parameter would still make its gradient 0 * inf = NaN.)"""

    def __init__(self, value: float):
        self.weight = torch.ones((), requires_grad=True)
        self.value = value
        self.backward_loss = None

    def __call__(self, batch):
        feat = torch.full((2, 3), self.value)
        return {"loss": 2 * self.weight + self.value, "image_feat": feat, "text_feat": feat.clone()}

    def backward(self, loss):
        self.backward_loss = loss.detach()
        loss.backward()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss_backpropagates_zero(value):
    engine, guard = ScalarEngine(value), NonFiniteGuard(CPU)
    out, finite = forward_backward(engine, {}, True, guard)
    assert not finite and engine.backward_loss.item() == 0.0
    assert engine.weight.grad.item() == 0.0
    assert guard.consecutive.item() == 1


def test_finite_loss_backpropagates_unless_the_batch_stands_in():
    engine = ScalarEngine(2.0)
    forward_backward(engine, {}, True, NonFiniteGuard(CPU))
    assert engine.backward_loss.item() == 4.0 and engine.weight.grad.item() == 2.0
    engine = ScalarEngine(2.0)
    forward_backward(engine, {}, False, NonFiniteGuard(CPU))
    assert engine.backward_loss.item() == 0.0


def test_bank_features_of_a_non_finite_step_are_zeroed():
    feat = torch.tensor([[0.6, 0.8], [float("nan"), 1.0]])
    out = {"image_feat": feat, "text_feat": feat.flip(0)}
    image, text = bank_features(out, torch.tensor(True))
    assert torch.equal(image, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    assert torch.equal(text, torch.tensor([[0.0, 1.0], [0.6, 0.8]]))
    image, text = bank_features(out, torch.tensor(False))
    assert not image.any() and not text.any()


def test_guard_counts_on_the_device_and_reads_only_when_checked(caplog):
    guard = NonFiniteGuard(CPU)
    for finite in (False, False, True, False):
        guard.update(torch.tensor(finite))
    with caplog.at_level(logging.WARNING, logger="gritvlp.train"):
        assert guard.check(global_step=4) == 1  # the run of non-finite losses restarted at the last step
    assert "3 non-finite losses in steps 1-4" in caplog.text
    caplog.clear()
    guard.update(torch.tensor(True))
    with caplog.at_level(logging.WARNING, logger="gritvlp.train"):
        assert guard.check(global_step=5) == 0
    assert not caplog.text  # nothing new since the last check


def test_guard_raises_after_too_many_consecutive_non_finite_losses():
    guard = NonFiniteGuard(CPU, consecutive=MAX_CONSECUTIVE_BAD_STEPS - 2, global_step=100)  # as resumed
    guard.update(torch.tensor(False))
    assert guard.check(global_step=101) == MAX_CONSECUTIVE_BAD_STEPS - 1
    guard.update(torch.tensor(False))
    with pytest.raises(FloatingPointError, match=f"{MAX_CONSECUTIVE_BAD_STEPS} consecutive non-finite losses"):
        guard.check(global_step=102)


def test_mlm_inputs_are_a_function_of_the_step():
    cfg = load_config("demo")
    model = PretrainingObjective(GritVLP(cfg.model), cfg.objectives)
    ids = torch.randint(1000, 3000, (4, 10))
    ids[:, 0] = 101
    batch = {"input_ids": ids, "image": torch.zeros(4, 3, 64, 64)}
    seed = step_seed(42, micro_step=7, rank=1, stream="mlm")
    first, again = with_mlm_inputs(batch, model, seed), with_mlm_inputs(batch, model, seed)
    assert all(torch.equal(first[k], again[k]) for k in ("mlm_input_ids", "mlm_positions", "mlm_targets"))
    later = with_mlm_inputs(batch, model, step_seed(42, micro_step=8, rank=1, stream="mlm"))
    assert not torch.equal(first["mlm_positions"], later["mlm_positions"])
    assert seed != step_seed(42, micro_step=7, rank=1)  # not the stream that seeds dropout and sampled negatives
    moved = to_device(first, CPU, torch.float32)
    assert set(moved) == set(first) and moved["mlm_positions"].dtype == torch.int64


def test_no_mlm_inputs_without_the_mlm_objective():
    cfg = load_config("demo", ["objectives.mlm_weight=0"])
    model = PretrainingObjective(GritVLP(cfg.model), cfg.objectives)
    batch = {"input_ids": torch.tensor([[101, 2000, 102]])}
    assert with_mlm_inputs(batch, model, 0) is batch


def test_uint8_images_are_normalised_after_the_copy():
    """The training loader sends uint8 pixels (a quarter of the bytes): to_device normalises them as the CPU
    pipeline would have, then casts to the step's dtype."""
    from gritvlp.data.transforms import NormalizeUint8

    pixels = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    out = to_device({"image": pixels, "input_ids": torch.ones(3, 4, dtype=torch.long)}, CPU, torch.bfloat16)
    assert out["image"].dtype == torch.bfloat16
    assert torch.equal(out["image"], NormalizeUint8()(pixels).to(torch.bfloat16))
    floats = NormalizeUint8()(pixels)  # an already normalised batch (e.g. evaluation) passes as it is
    assert torch.equal(to_device({"image": floats}, CPU, torch.float32)["image"], floats)
