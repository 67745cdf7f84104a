"""GRIT-VLP's pre-training objective on the tiny model: losses against an independent computation of docs/METHOD.md's
formulas, gradients, the host-drawn MLM inputs, ITM pairs."""

import dataclasses

import gritvlp.kernels as kernels
import pytest
import torch
import torch.nn.functional as F
from test_model import B, fixed_batch

from gritvlp.config import load_config
from gritvlp.model.gritvlp import GritVLP
from gritvlp.objectives.itm import itm_loss, itm_pairs
from gritvlp.objectives.mlm import IGNORE_INDEX, mask_tokens
from gritvlp.objectives.pretraining import PretrainingObjective


def tiny_objective(**objective_overrides):
    """The demo model with GRIT-VLP's objectives (hardest ITM negatives, the text objective on from step 0)."""
    cfg = load_config("demo")
    grit = {"itm_negatives": "hardest", "text_start_step": 0, "text_ramp_steps": 0}
    objectives = dataclasses.replace(cfg.objectives, **{**grit, **objective_overrides})
    torch.manual_seed(0)
    return PretrainingObjective(GritVLP(cfg.model), objectives).eval()  # eval: no dropout, comparable passes


def independent_ita(img, txt, temp, w_cons=0.2):
    """ITA of docs/METHOD.md section 1, written out with explicit loops over rows."""
    s = img @ txt.T / temp
    n = s.shape[0]
    l_i2t = sum(-torch.log_softmax(s[i], 0)[i] for i in range(n)) / n
    l_t2i = sum(-torch.log_softmax(s[:, i], 0)[i] for i in range(n)) / n
    c_i2t = sum(-(torch.softmax(s[:, i], 0) * torch.log_softmax(s[i], 0)).sum() for i in range(n)) / n
    c_t2i = sum(-(torch.softmax(s[i], 0) * torch.log_softmax(s[:, i], 0)).sum() for i in range(n)) / n
    return (l_i2t + l_t2i) / 2, (c_i2t + c_t2i) / 2


def test_losses_match_independent_formulas():
    objective = tiny_objective()
    model = objective.model
    batch = fixed_batch()
    torch.manual_seed(123)
    out = objective(batch)

    with torch.no_grad():
        image_embeds, img = model.encode_image(batch["image"])
        text_hidden, txt = model.encode_text(batch["input_ids"], batch["attention_mask"])
        temp = model.temperature()
        itc, cons = independent_ita(img, txt, temp)
        assert out["itc"].item() == pytest.approx(itc.item(), rel=1e-5)
        assert out["consistency"].item() == pytest.approx(cons.item(), rel=1e-5)

        # ITM: the hardest negative per row = argmax of softmax(S) with the diagonal zeroed.
        s = img @ txt.T / temp
        weights = torch.softmax(s, 1).masked_fill(torch.eye(B, dtype=torch.bool), 0)
        neg_text = weights.argmax(1)
        weights_t2i = torch.softmax(s.T, 1).masked_fill(torch.eye(B, dtype=torch.bool), 0)
        neg_image = weights_t2i.argmax(1)
        images = torch.cat([image_embeds, image_embeds[neg_image], image_embeds])
        texts = torch.cat([text_hidden, text_hidden, text_hidden[neg_text]])
        masks = torch.cat([batch["attention_mask"]] * 2 + [batch["attention_mask"][neg_text]])
        labels = torch.tensor([1] * B + [0] * 2 * B)
        itm = F.cross_entropy(model.itm_logits(images, texts, masks), labels)
        assert out["itm"].item() == pytest.approx(itm.item(), rel=1e-5)

        # MLM: the same masking draw, full vocabulary logits, CE over the chosen positions only.
        torch.manual_seed(123)
        masked, mlm_labels = mask_tokens(
            batch["input_ids"], vocab_size=model.text.config.vocab_size, mask_token_id=103, pad_token_id=0,
            cls_token_id=101, mask_prob=0.5,
        )  # fmt: skip
        fused = model.text.fuse(
            model.text.encode_text(masked, batch["attention_mask"]), batch["attention_mask"], image_embeds
        )
        logits = model.mlm_head.transform(fused) @ model.text.embeddings.word_embeddings.weight.T + model.mlm_head.bias
        mlm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), mlm_labels.reshape(-1), ignore_index=IGNORE_INDEX)
        assert out["mlm"].item() == pytest.approx(mlm.item(), rel=1e-5)
        total = itc + 0.2 * cons + itm + mlm
        assert out["loss"].item() == pytest.approx(total.item(), rel=1e-5)


def test_backward_reaches_every_trained_parameter():
    objective = tiny_objective().train()
    model = objective.model
    out = objective(fixed_batch())
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    assert model.temp.grad.abs().item() > 0


def test_stop_gradient_on_key_side():
    img = F.normalize(torch.randn(5, 8), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(5, 8), dim=-1).requires_grad_()
    temp = torch.tensor(0.1)
    out = kernels.itc_terms(img, txt, temp, backend="reference")
    (grad_txt,) = torch.autograd.grad(out.loss_i2t, txt, allow_unused=True, materialize_grads=True)
    assert grad_txt.abs().max() == 0  # i2t reaches only the image branch
    out = kernels.itc_terms(img, txt, temp, stop_grad_keys=False, backend="reference")
    (grad_txt,) = torch.autograd.grad(out.loss_i2t, txt)
    assert grad_txt.abs().max() > 0


def test_host_prepared_mlm_inputs_are_the_ones_used():
    objective = tiny_objective()
    batch = fixed_batch()
    torch.manual_seed(9)
    drawn_in_forward = objective(batch)["mlm"]
    prepared = objective.prepare_batch(batch, torch.Generator().manual_seed(9))
    torch.manual_seed(0)  # the default generator no longer matters
    assert objective(prepared)["mlm"].item() == pytest.approx(drawn_in_forward.item(), rel=1e-6)
    other = objective.prepare_batch(batch, torch.Generator().manual_seed(10))
    assert objective(other)["mlm"].item() != pytest.approx(drawn_in_forward.item(), rel=1e-3)


def test_no_labelled_token_gives_zero_mlm_loss_in_the_graph():
    objective = tiny_objective().train()
    batch = fixed_batch()
    none_labelled = torch.zeros(0, dtype=torch.long)
    prepared = {
        **batch,
        "mlm_input_ids": batch["input_ids"],
        "mlm_positions": none_labelled,
        "mlm_targets": none_labelled,
    }
    out = objective(prepared)
    assert out["mlm"].item() == 0.0 and out["mlm"].requires_grad
    out["loss"].backward()
    bias_grad = objective.model.mlm_head.bias.grad
    assert bias_grad is not None and bias_grad.abs().max() == 0


def test_itm_pairs_keep_3b_pairs_and_weight_out_missing_negatives():
    img = torch.arange(4).float()[:, None, None].expand(4, 2, 3)
    txt = torch.arange(4).float()[:, None, None].expand(4, 5, 3) + 10
    mask = torch.arange(4)[:, None].expand(4, 5)
    pairs = itm_pairs(img, txt, mask, torch.tensor([1, -1, 3, 0]), torch.tensor([2, 2, -1, 1]))
    assert pairs.labels.tolist() == [1] * 4 + [0] * 8
    # ALBEF's order: positives, (negative image, text i), (image i, negative text); -1 stands in as 0
    assert pairs.images[:, 0, 0].tolist() == [0, 1, 2, 3, 2, 2, 0, 1, 0, 1, 2, 3]
    assert pairs.texts[:, 0, 0].tolist() == [10, 11, 12, 13, 10, 11, 12, 13, 11, 10, 13, 10]
    assert pairs.attention_mask[:, 0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 1, 0, 3, 0]
    assert pairs.weights.tolist() == [1] * 4 + [1, 1, 0, 1] + [1, 0, 1, 1]


def test_itm_loss_and_accuracy_ignore_pairs_of_weight_zero():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([1, 1, 0, 0, 0, 0])
    weights = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    logits = torch.randn(6, 2, generator=g)
    logits[3] = torch.tensor([-20.0, 20.0])  # confidently wrong: would dominate loss and accuracy if counted
    logits[5] = torch.tensor([-20.0, 20.0])
    loss, accuracy = itm_loss(logits, labels, weights)
    valid = weights.bool()
    assert loss.item() == pytest.approx(F.cross_entropy(logits[valid], labels[valid]).item(), rel=1e-6)
    expected_acc = (logits[valid].argmax(1) == labels[valid]).float().mean().item()
    assert accuracy.item() == pytest.approx(expected_acc)
    logits[3] = torch.tensor([20.0, -20.0])
    assert itm_loss(logits, labels, weights)[0].item() == pytest.approx(loss.item(), rel=1e-6)


def test_same_image_duplicates_are_never_itm_negatives():
    model = tiny_objective().model
    batch = fixed_batch()
    batch["group_id"] = torch.tensor([0, 0, 1, 1, 2, 3])
    with torch.no_grad():
        _, img = model.encode_image(batch["image"])
        _, txt = model.encode_text(batch["input_ids"], batch["attention_mask"])
    out = kernels.itc_terms(img, txt, torch.tensor(0.07), group_ids=batch["group_id"])
    for i, j in enumerate(out.neg_text_for_image.tolist()):
        assert batch["group_id"][i] != batch["group_id"][j]


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = fixed_batch()
    grads = []
    for enable in (False, True):
        objective = tiny_objective().train()
        objective.model.set_grad_checkpointing(enable)
        torch.manual_seed(7)
        objective(batch)["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in objective.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_text_objective_switches_on_at_its_step_and_ramps_up():
    objective = tiny_objective(text_start_step=10, text_ramp_steps=4)
    batch = objective.prepare_batch(fixed_batch(), torch.Generator().manual_seed(3))
    contributions = {}
    for step in (0, 9, 10, 11, 13, 50):
        objective.set_step(step)
        out = objective(batch)
        others = objective.config.itc_weight * (out["itc"] + objective.config.consistency_weight * out["consistency"])
        contributions[step] = ((out["loss"] - others - out["itm"]) / out["mlm"]).item()
    assert contributions[0] == pytest.approx(0.0, abs=1e-6) and contributions[9] == pytest.approx(0.0, abs=1e-6)
    assert [round(contributions[s], 4) for s in (10, 11, 13, 50)] == [0.25, 0.5, 1.0, 1.0]
    objective.set_step(0)
    out = objective(batch)
    out["loss"].backward()  # still computed while off: every parameter gets a (zero) gradient
    assert objective.model.mlm_head.bias.grad is not None and objective.model.mlm_head.bias.grad.abs().max() == 0
