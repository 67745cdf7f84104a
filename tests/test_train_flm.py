"""FLM with GRIT grouping and ITM, end to end through the deepspeed launcher: ZeRO-2 on 2 CPU processes."""

import math

import pytest
import torch
from test_train import ds_config, losses, pretrain

from gritvlp.config import load_config
from gritvlp.model.gritvlp import GritVLP

pytestmark = pytest.mark.slow


def test_flm_grit_itm_trains_under_deepspeed(tmp_path):
    run = tmp_path / "flm"
    flm = ["objectives.text_objective=flm", "objectives.flm_corruption_rate=0.2", "objectives.text_start_step=0"]
    pretrain(run, ds_config(tmp_path, 2), 2, *flm)  # the demo switches the text objective on at step 150
    metrics = losses(run)
    assert sorted(step for step, m in metrics.items() if "loss/total" in m) == [1, 2, 3, 4, 5, 6]
    for m in metrics.values():
        if "loss/total" in m:
            assert math.isfinite(m["loss/total"]) and math.isfinite(m["loss/itm"]) and "loss/mlm" not in m
    assert any("grit/grouping_time_s" in m for m in metrics.values())  # epoch 1 ran in GRIT's grouped order

    trained = GritVLP.from_pretrained(run / "export_fp16")
    assert trained.config.reconstructor_layers == 1
    cfg = load_config("demo", ["objectives.text_objective=flm"])
    torch.manual_seed(cfg.train.seed)  # the trainer's initial weights
    initial = GritVLP(cfg.model)
    moved = {
        name: (trained.state_dict()[name] - value).abs().max().item()
        for name, value in initial.state_dict().items()
        if name.startswith("reconstructor.") and not name.endswith("self.key.bias")  # softmax-invariant: no gradient
    }
    assert min(moved.values()) > 1e-4, moved  # every reconstructor tensor received FLM's gradient through DeepSpeed
