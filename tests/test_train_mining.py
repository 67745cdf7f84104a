"""MAFA's false-negative handling end to end through the deepspeed launcher: identical-caption positives, connection
mining with a filter model from an export folder, and smoothed ITC, on ZeRO-2 with 2 CPU processes."""

import math

import pytest
import torch
from test_train import ds_config, losses, pretrain

from gritvlp.albef import write_export_folder
from gritvlp.config import load_config
from gritvlp.model.gritvlp import GritVLP

pytestmark = pytest.mark.slow


def test_mining_and_smoothing_train_under_deepspeed(tmp_path):
    torch.manual_seed(7)
    write_export_folder(GritVLP(load_config("demo").model), tmp_path / "filter")  # an untrained filter
    run = tmp_path / "mafa"
    mafa = [f"objectives.mining_filter={tmp_path / 'filter'}", "objectives.mining_low=0.0",
            "objectives.mining_high=0.5", "objectives.itc_smoothing=0.5", "objectives.itc_smoothing_start_epoch=1",
            "objectives.text_start_step=0"]  # fmt: skip
    pretrain(run, ds_config(tmp_path, 2), 2, *mafa)
    metrics = losses(run)
    trained = {step: m for step, m in metrics.items() if "loss/total" in m}
    assert sorted(trained) == [1, 2, 3, 4, 5, 6]
    for m in trained.values():
        assert math.isfinite(m["loss/total"]) and math.isfinite(m["loss/mlm"])
        assert 0 <= m["grit/false_negative_share"] <= 1 and m["grit/itm_false_negative_share"] == 0
        # low = 0: every chosen negative is either converted (> 0.5) or replaced; 2 directions x 8 samples
        assert m["grit/converted_negatives"] + m["grit/replaced_negatives"] == pytest.approx(16)
    assert sum(m["grit/converted_negatives"] for m in trained.values()) > 0
    assert (run / "export_fp16" / "model.safetensors").is_file()
