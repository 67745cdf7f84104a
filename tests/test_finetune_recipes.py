"""The parts of the albef and grit fine-tuning recipes: the feature queue with image ids, the soft ITC targets over
the positives of batch and queue, ITM negatives from the in-batch similarities, the momentum encoder's update, the
per-epoch learning rate, the recipes' settings and the test set's k_test."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_finetune import FeatureModel

from gritvlp.config import load_config
from gritvlp.eval.retrieval import default_k_test
from gritvlp.model.gritvlp import GritVLP
from gritvlp.objectives.momentum import EMPTY_ID, FeatureQueue, MomentumEncoder
from gritvlp.objectives.retrieval import (
    MomentumInputs,
    QueueRetrievalObjective,
    in_batch_negatives,
    queue_itc,
    soft_targets,
)
from gritvlp.train.engine import epoch_cosine
from gritvlp.train.finetune import FinetuneConfig, FineTuner

# ---------------------------------------------------------------- the queue


def rows(*ids: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image and text features that name their id (image [id, 0], text [0, id]) and the ids."""
    ids = torch.tensor(ids)
    zeros = torch.zeros(len(ids))
    return torch.stack([ids.float(), zeros], 1), torch.stack([zeros, ids.float()], 1), ids


def test_a_new_queue_holds_random_unit_features_without_ids():
    queue = FeatureQueue(6, 4, seed=3)
    assert queue.ids.tolist() == [EMPTY_ID] * 6 and int(queue.ptr) == 0
    torch.testing.assert_close(queue.image_feat.norm(dim=1), torch.ones(6))
    assert torch.equal(queue.text_feat, FeatureQueue(6, 4, seed=3).text_feat)  # the same on every rank
    assert set(dict(queue.named_buffers())) == {"image_feat", "text_feat", "ids", "ptr"}  # in its state dict


def test_the_queue_enqueues_at_the_pointer_and_wraps_around():
    queue = FeatureQueue(5, 2)
    queue.enqueue(*rows(10, 11, 12))
    assert queue.ids.tolist() == [10, 11, 12, EMPTY_ID, EMPTY_ID] and int(queue.ptr) == 3
    queue.enqueue(*rows(13, 14, 15))  # two at the end, the third wraps to the front
    assert queue.ids.tolist() == [15, 11, 12, 13, 14] and int(queue.ptr) == 1
    assert queue.image_feat[:, 0].tolist() == [15, 11, 12, 13, 14] and queue.text_feat[:, 1].tolist() == [15, 11, 12, 13, 14]  # fmt: skip
    queue.enqueue(*rows())  # a rank with no usable sample
    assert int(queue.ptr) == 1
    queue.enqueue(*rows(20, 21, 22, 23, 24, 25, 26))  # more than it holds: written from slot 1 on, the last 5 stay
    assert queue.ids.tolist() == [24, 25, 26, 22, 23] and int(queue.ptr) == (1 + 7) % 5
    restored = FeatureQueue(5, 2, seed=9)
    restored.load_state_dict(queue.state_dict())
    for name, buffer in queue.named_buffers():
        assert torch.equal(dict(restored.named_buffers())[name], buffer)


# ---------------------------------------------------------------- soft targets and the ITC loss


def test_soft_targets_are_uniform_over_every_positive_in_batch_and_queue():
    ids = torch.tensor([7, 8])
    queue_ids = torch.tensor([8, EMPTY_ID, 7, 7])
    targets = soft_targets(ids, torch.cat([ids, queue_ids]))
    third, half = 1 / 3, 1 / 2
    expected = torch.tensor([[third, 0, 0, 0, third, third], [0, half, half, 0, 0, 0]])
    torch.testing.assert_close(targets, expected)


def hand_loss(sims: list[list[float]], targets: list[list[float]]) -> float:
    """Mean over rows of -sum_j t_j log softmax(s)_j, written out."""
    total = 0.0
    for s, t in zip(sims, targets):
        log_z = math.log(sum(math.exp(v) for v in s))
        total -= sum(tj * (sj - log_z) for sj, tj in zip(s, t))
    return total / len(sims)


def queue_case(alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, MomentumInputs]:
    """Two samples (ids 7, 8) in 2-d, a queue of three: a copy of image 7's pair, one of 8's, an empty slot."""
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.8, 0.6], [0.6, 0.8]])
    momentum = MomentumInputs(
        image_feat=torch.tensor([[0.6, 0.8], [0.0, 1.0]]), text_feat=torch.tensor([[1.0, 0.0], [0.8, 0.6]]),
        queue_image=torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]),
        queue_text=torch.tensor([[0.6, 0.8], [0.0, 1.0], [0.0, -1.0]]),
        queue_ids=torch.tensor([7, 8, EMPTY_ID]), alpha=alpha,
    )  # fmt: skip
    return image, text, torch.tensor(0.5), torch.tensor([7, 8]), momentum


def test_queue_itc_against_a_hand_computed_case():
    image, text, temp, ids, momentum = queue_case(alpha=0.0)
    loss, sim_i2t, sim_t2i = queue_itc(image, text, temp, ids, momentum)
    # columns: momentum text of samples 7, 8, then queue texts (7, 8, empty); similarities / 0.5
    s_i2t = [[2.0, 1.6, 1.2, 0.0, 0.0], [0.0, 1.2, 1.6, 2.0, -2.0]]
    # text 7 [0.8, 0.6] and text 8 [0.6, 0.8] against momentum images 7, 8, then queue images 7, 8, empty
    s_t2i = [[1.92, 1.2, 1.6, 1.2, -1.6], [2.0, 1.6, 1.2, 1.6, -1.2]]
    torch.testing.assert_close(sim_i2t, torch.tensor(s_i2t))
    torch.testing.assert_close(sim_t2i, torch.tensor(s_t2i))
    targets = [[0.5, 0, 0.5, 0, 0], [0, 0.5, 0, 0.5, 0]]  # own column and the queue's copy of its image
    expected = (hand_loss(s_i2t, targets) + hand_loss(s_t2i, targets)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_distillation_mixes_the_momentum_softmax_into_the_targets():
    image, text, temp, ids, momentum = queue_case(alpha=0.4)
    loss, sim_i2t, sim_t2i = queue_itc(image, text, temp, ids, momentum)
    text_all = torch.cat([momentum.text_feat, momentum.queue_text])
    image_all = torch.cat([momentum.image_feat, momentum.queue_image])
    hard = [[0.5, 0, 0.5, 0, 0], [0, 0.5, 0, 0.5, 0]]
    expected = 0.0
    for sims, momentum_sims in ((sim_i2t, momentum.image_feat @ text_all.T / 0.5), (sim_t2i, momentum.text_feat @ image_all.T / 0.5)):  # fmt: skip
        targets = [
            [0.4 * math.exp(v) / sum(math.exp(u) for u in row) + 0.6 * h for v, h in zip(row, hard_row)]
            for row, hard_row in zip(momentum_sims.tolist(), hard)
        ]
        expected += hand_loss(sims.tolist(), targets) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() != pytest.approx(queue_itc(image, text, temp, ids, queue_case(0.0)[-1])[0].item(), rel=1e-3)


def test_the_itc_gradient_reaches_the_online_features_only():
    image, text, temp, ids, momentum = queue_case(alpha=0.4)
    image.requires_grad_(True)
    momentum = momentum._replace(image_feat=momentum.image_feat.requires_grad_(True))
    queue_itc(image, text, temp, ids, momentum)[0].backward()
    assert image.grad is not None and image.grad.abs().sum() > 0 and momentum.image_feat.grad is None


# ---------------------------------------------------------------- ITM negatives


def test_in_batch_negatives_are_sampled_from_other_images_and_the_hardest_is_the_most_similar():
    ids = torch.tensor([0, 0, 1, 2])
    sim = torch.tensor([[9.0, 8.0, 1.0, 3.0], [8.0, 9.0, 2.0, 1.0], [0.0, 5.0, 9.0, 4.0], [1.0, 0.0, 2.0, 9.0]])
    assert in_batch_negatives(sim, ids, "hardest").tolist() == [3, 2, 1, 2]
    drawn = torch.stack([in_batch_negatives(sim, ids) for _ in range(2000)])
    assert (ids[drawn] != ids[None, :]).all()
    share = (drawn[:, 0] == 3).float().mean().item()  # softmax over columns 2 and 3 of row 0: e^3 / (e^1 + e^3)
    assert share == pytest.approx(math.exp(3) / (math.exp(1) + math.exp(3)), abs=0.04)
    assert in_batch_negatives(sim[:2, :2], ids[:2]).tolist() == [-1, -1]  # one image: no negative


def test_the_queue_objective_adds_itc_and_itm():
    torch.manual_seed(0)
    batch = {
        "image": torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]),
        "input_ids": torch.tensor([[1.0, 0.1, 0, 0], [1.0, 0, 0.1, 0], [0.2, 1.0, 0, 0], [0, 0.3, 1.0, 0]]),
        "attention_mask": torch.ones(4, 1),
        "group_id": torch.tensor([0, 0, 1, 2]),
    }
    queue = FeatureQueue(3, 4, seed=1)
    momentum = MomentumInputs(F.normalize(batch["image"], dim=-1), F.normalize(batch["input_ids"], dim=-1),
                              queue.image_feat, queue.text_feat, queue.ids)  # fmt: skip
    out = QueueRetrievalObjective(FeatureModel())(batch, momentum)
    itc, _, _ = queue_itc(momentum.image_feat, momentum.text_feat, torch.tensor(0.1), batch["group_id"], momentum)
    torch.testing.assert_close(out["itc"], itc)
    torch.testing.assert_close(out["loss"], out["itc"] + out["itm"])
    assert out["neg_text_for_image"][0].item() in (2, 3) and out["neg_image_for_text"][1].item() in (2, 3)


# ---------------------------------------------------------------- the momentum encoder


def tiny_model() -> GritVLP:
    torch.manual_seed(0)
    return GritVLP(load_config("demo").model)


def test_the_momentum_encoder_copies_the_encoders_and_projections_only():
    model = tiny_model()
    momentum = MomentumEncoder(model, 0.995)
    names = {name for name, _ in momentum.encoder.named_parameters()}
    assert {"vision_proj.weight", "text_proj.weight", "text.embeddings.word_embeddings.weight"} <= names
    assert not any(n.startswith(("itm_head", "mlm_head")) or ".crossattention." in n for n in names)
    assert not any(p.requires_grad for p in momentum.parameters())
    images, ids = torch.randn(2, 3, 64, 64), torch.randint(1000, 2000, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    model.eval(), momentum.eval()
    image_feat, text_feat = momentum.features(images, ids, mask)
    torch.testing.assert_close(image_feat, model.encode_image(images)[1])
    torch.testing.assert_close(text_feat, model.encode_text(ids, mask)[1])


def test_the_momentum_update_is_an_exponential_moving_average():
    model = tiny_model()
    momentum = MomentumEncoder(model, 0.9)
    before = {n: p.clone() for n, p in momentum.encoder.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    online = dict(model.named_parameters())
    momentum.update(model)
    for name, param in momentum.encoder.named_parameters():
        torch.testing.assert_close(param, 0.9 * before[name] + 0.1 * online[name])


def test_the_momentum_copy_keeps_fp32_under_a_bf16_model():
    """An EMA step of 0.005 x the difference would round away in bf16; the fp32 copy keeps it."""
    model = tiny_model()
    momentum = MomentumEncoder(model, 0.995)
    model.to(torch.bfloat16)
    start = momentum.encoder.text_proj.weight.clone()
    with torch.no_grad():
        model.text_proj.weight.add_(0.5)
    momentum.update(model)
    moved = momentum.encoder.text_proj.weight - start
    assert momentum.encoder.text_proj.weight.dtype == torch.float32
    torch.testing.assert_close(moved, 0.005 * (model.text_proj.weight.float() - start))


# ---------------------------------------------------------------- schedule, recipes, k_test


def test_the_learning_rate_is_stepped_once_per_epoch_as_albef_does():
    factor = epoch_cosine(steps_per_epoch=10, epochs=5, min_ratio=0.1)
    lr = [1e-5 * factor(step) for step in range(50)]
    for epoch in range(5):  # timm's cosine at t = epoch of 5, from 1e-5 to 1e-6
        expected = 1e-6 + 0.5 * (1e-5 - 1e-6) * (1 + math.cos(math.pi * epoch / 5))
        assert lr[10 * epoch : 10 * epoch + 10] == pytest.approx([expected] * 10)
    assert lr[0] == pytest.approx(1e-5) and factor(10_000) == factor(49)  # past the end: the last epoch's


def test_recipes_set_the_momentum_queue_and_distillation():
    albef = FinetuneConfig("export", train_shards="t", test_shards="s")
    assert (albef.recipe, albef.momentum, albef.queue_size, albef.alpha) == ("albef", 0.995, 65536, 0.4)
    grit = FinetuneConfig("export", train_shards="t", test_shards="s", recipe="grit")
    assert (grit.momentum, grit.queue_size, grit.alpha, grit.itm_negatives) == (0.995, 65280, 0.0, "sample")
    plain = FinetuneConfig("export", train_shards="t", test_shards="s", recipe="in-batch", consistency_weight=0.2)
    assert (plain.has_momentum, plain.queue_size, plain.alpha) == (False, 0, 0)
    tuned = FinetuneConfig("export", train_shards="t", test_shards="s", queue_size=1024, alpha=0.0)
    assert (tuned.queue_size, tuned.alpha, tuned.momentum) == (1024, 0.0, 0.995)
    with pytest.raises(ValueError, match="alpha need a recipe with a momentum encoder"):
        FinetuneConfig("export", train_shards="t", test_shards="s", recipe="in-batch", alpha=0.4)
    with pytest.raises(ValueError, match="belong to the in-batch recipe"):
        FinetuneConfig("export", train_shards="t", test_shards="s", consistency_weight=0.2)
    with pytest.raises(ValueError, match="recipe must be one of"):
        FinetuneConfig("export", train_shards="t", test_shards="s", recipe="blip")
    with pytest.raises(ValueError, match="select must be one of"):
        FinetuneConfig("export", train_shards="t", test_shards="s", select="r1")
    with pytest.raises(ValueError, match="0 <= momentum < 1"):
        FinetuneConfig("export", train_shards="t", test_shards="s", momentum=1.0)


def test_a_momentum_recipe_refuses_zero3_before_building_anything(tmp_path):
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {}},
                              "zero_optimization": {"stage": 3}}))  # fmt: skip
    cfg = FinetuneConfig(str(tmp_path / "no_export"), train_shards="t", test_shards="s", recipe="grit")
    with pytest.raises(ValueError, match="ZeRO-3 partitions"):
        FineTuner(cfg, str(ds))


def test_k_test_is_the_datasets_but_at_most_albefs_share_of_the_test_images():
    assert default_k_test("coco", 5000) == 256  # ALBEF's COCO protocol unchanged
    assert default_k_test("flickr30k", 1000) == 128  # and Flickr30k's, the largest share: 12.8%
    assert default_k_test("coco", 423) == 54  # the demo's test images: not 256 of 423
    assert default_k_test("flickr30k", 3) == 1
