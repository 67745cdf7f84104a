"""The DiHT preset (gritvlp/configs/diht.yaml): it loads and validates, and one training step of its objectives
(contrastive HN-NCE only, object and attribute concept distillation) on a tiny model logs finite
loss/distill_objects and loss/distill_attributes."""

import json
import math

import pytest
import torch

from gritvlp.config import ConfigError, load_config
from gritvlp.data.collate import Collator
from gritvlp.data.text import load_tokenizer
from gritvlp.model.gritvlp import GritVLP
from gritvlp.objectives.pretraining import TERMS, PretrainingObjective
from gritvlp.train.monitor import Monitor

# The demo preset's model: the preset's objectives on a model that trains in a second on a CPU
TINY = [
    "model.vision_name=vit_tiny_patch16_224",
    "model.vision_kwargs={patch_size: 8, embed_dim: 96, depth: 3, num_heads: 3}",
    "model.image_size=64",
    "model.text_config={hidden_size: 96, num_hidden_layers: 4, num_attention_heads: 3, intermediate_size: 384, "
    "max_position_embeddings: 64}",
    "model.num_text_layers=2",
    "model.embed_dim=64",
]


def test_diht_preset_loads_and_validates():
    cfg = load_config("diht")
    objectives = cfg.objectives
    assert (objectives.hn_alpha, objectives.hn_beta) == (1.0, 0.5)
    assert objectives.itc_weight > 0 and objectives.itm_weight == objectives.mlm_weight == 0
    assert objectives.consistency_weight == 0 and not cfg.sampling.grit
    assert cfg.model.teacher_name == "vit_base_patch16_224" and cfg.model.teacher_weights is None
    assert cfg.model.num_concepts == 1000 and cfg.model.num_attributes == 0
    assert cfg.model.reconstructor_layers == 0
    assert load_config("diht", ["model.num_attributes=300"]).model.num_attributes == 300
    with pytest.raises(ConfigError, match="'objectives.distill_weight'"):
        load_config("diht", ["objectives.distill_weight=0"])


def test_one_diht_step_logs_both_distillation_terms(tmp_path):
    cfg = load_config("diht", [*TINY, "model.num_concepts=7", "model.num_attributes=5"])
    torch.manual_seed(0)
    objective = PretrainingObjective(GritVLP(cfg.model), cfg.objectives).train()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    labels = [
        {"ids": [3, 1], "probs": [0.8, 0.2], "attributes": [0, 4]},
        {"ids": [6], "probs": [1.0], "attributes": []},
        {"ids": [0, 2], "probs": [0.5, 0.5]},  # no attribute labels: counts for nothing in that term
        {"ids": [5], "probs": [0.9], "attributes": [2], "attribute_probs": [0.6]},
    ]
    captions = ["a red car", "a blue sky", "a small dog", "a shiny red car"]
    samples = [{"image": image, "caption": caption, "index": i, "group_id": i, "concepts": concepts}
               for i, (image, caption, concepts) in enumerate(zip(images, captions, labels))]  # fmt: skip
    host = Collator(load_tokenizer(), cfg.data.max_tokens, num_attributes=5)(samples)
    batch = {k: v for k, v in objective.prepare_batch(host).items() if torch.is_tensor(v)}
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-3)
    out = objective(batch)
    assert not {"itm", "mlm", "flm"} & set(out)  # contrastive and distillation only
    out["loss"].backward()
    head = objective.model.attribute_head.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(head, objective.model.attribute_head.weight)

    monitor = Monitor(tmp_path, total_steps=1, initial_step=0, enabled=True)
    terms = {k: out[k].item() for k in TERMS if k in out}
    monitor.log_train(1, terms, lr=1e-3, grad_norm=None, samples_per_s=4.0, step_time_s=1.0, skipped_samples=0)
    monitor.close()
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    for name in ("loss/total", "loss/itc", "loss/distill", "loss/distill_objects", "loss/distill_attributes"):
        assert math.isfinite(logged[name]), name
    assert logged["loss/distill_objects"] > 0 and logged["loss/distill_attributes"] > 0
    weight = cfg.objectives.distill_attribute_weight
    expected = logged["loss/distill_objects"] + weight * logged["loss/distill_attributes"]
    assert logged["loss/distill"] == pytest.approx(expected, rel=1e-5)
