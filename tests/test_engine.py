"""The optimizer's parameter groups with per-group learning-rate multipliers (FLM's 5x on heads, fusion layers and
reconstructor), the learning-rate schedules, and both under DeepSpeed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.nn as nn

from gritvlp.config import ConfigError, load_config
from gritvlp.model.gritvlp import GritVLP
from gritvlp.train import engine as engine_module
from gritvlp.train.engine import linear_with_warmup, load_ds_config, lr_group, parameter_groups

REPO = Path(__file__).resolve().parents[1]
FLM = {"heads": 5.0, "fusion": 5.0, "reconstructor": 5.0}


class Objective(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = GritVLP(load_config("demo", ["objectives.text_objective=flm"]).model)


def group_of(groups: list[dict]) -> dict[int, dict]:
    return {id(p): g for g in groups for p in g["params"]}


def test_multipliers_give_heads_fusion_layers_and_reconstructor_their_own_rate():
    objective = Objective()
    groups = parameter_groups(objective, 0.01, lr=1e-4, multipliers=FLM)
    where = group_of(groups)
    params = dict(objective.named_parameters())
    assert len(where) == len(params)  # each parameter in exactly one group
    assert "lr" not in groups[0] and groups[0]["weight_decay"] == 0.01  # the base rate's group first (train/lr)
    fusion = objective.model.text.encoder.num_text_layers
    expected = {
        "model.itm_head.weight": (5e-4, 0.01), "model.itm_head.bias": (5e-4, 0.0),
        "model.vision_proj.weight": (5e-4, 0.01), "model.mlm_head.bias": (5e-4, 0.0),
        f"model.text.encoder.layer.{fusion}.crossattention.self.query.weight": (5e-4, 0.01),
        f"model.text.encoder.layer.{fusion}.attention.self.query.weight": (5e-4, 0.01),  # all of a fusion layer
        "model.reconstructor.layer.0.crossattention.self.query.weight": (5e-4, 0.01),
        "model.text.encoder.layer.0.attention.self.query.weight": (1e-4, 0.01),  # a text layer
        "model.text.embeddings.word_embeddings.weight": (1e-4, 0.01),  # tied to the MLM decoder: base
        "model.vision.vit.pos_embed": (1e-4, 0.01),
        "model.temp": (1e-4, 0.0),
    }  # fmt: skip
    for name, (lr, decay) in expected.items():
        group = where[id(params[name])]
        assert (group.get("lr", 1e-4), group["weight_decay"]) == pytest.approx((lr, decay)), name


def test_without_multipliers_the_groups_are_decay_and_no_decay():
    objective = Objective()
    for multipliers in (None, {"heads": 1.0}):
        groups = parameter_groups(objective, 0.02, lr=1e-4, multipliers=multipliers)
        assert [g["weight_decay"] for g in groups] == [0.02, 0.0] and not any("lr" in g for g in groups)
    with pytest.raises(ValueError, match="need the optimizer's lr"):
        parameter_groups(objective, 0.02, multipliers=FLM)
    assert lr_group("text.encoder.layer.3.output.dense.weight", {2, 3}) == "fusion"
    assert lr_group("text.encoder.layer.1.output.dense.weight", {2, 3}) == "base"


def test_linear_schedule_warms_up_then_decays_to_the_floor():
    factor = linear_with_warmup(total_steps=100, warmup_steps=10, start_ratio=0.0, min_ratio=0.0)
    assert [factor(s) for s in (0, 9)] == pytest.approx([0.1, 1.0])
    assert [factor(s) for s in (10, 55, 100, 200)] == pytest.approx([1.0, 0.5, 0.0, 0.0])


def test_config_checks_the_schedule_and_the_multipliers():
    cfg = load_config("demo", ["train.lr_schedule=linear", "train.lr_multipliers.fusion=3"])
    assert cfg.train.lr_schedule == "linear" and cfg.train.lr_multipliers == {"fusion": 3}
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        load_config("demo", ["train.lr_schedule=step"])
    with pytest.raises(ConfigError, match="takes the groups heads, fusion, reconstructor"):
        load_config("demo", ["train.lr_multipliers.vision=2"])
    with pytest.raises(ConfigError, match="train.lr_multipliers.heads"):
        load_config("demo", ["train.lr_multipliers.heads=0"])


DEEPSPEED_CHECK = """
import json, sys, torch
from gritvlp.train.distributed import init_distributed
from gritvlp.train.engine import build_engine, linear_with_warmup, load_ds_config
from test_engine import Objective, FLM
init_distributed(False)
torch.manual_seed(0)
ds = load_ds_config(sys.argv[1], False, lr=1e-4)
engine = build_engine(Objective(), ds, linear_with_warmup(10, 0, 1.0, 0.0), FLM)
rates = []
for _ in range(3):
    rates.append([g["lr"] for g in engine.optimizer.param_groups])
    engine.lr_scheduler.step()
adam = engine.optimizer.optimizer
print(json.dumps({"rates": rates, "optimizer": type(adam).__name__, "fused": adam.defaults.get("fused")}))
"""


def test_deepspeed_keeps_each_groups_rate_and_schedules_all_alike(tmp_path):
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    config["train_micro_batch_size_per_gpu"] = 2
    (tmp_path / "ds.json").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", DEEPSPEED_CHECK, str(tmp_path / "ds.json")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["optimizer"] == "AdamW" and report["fused"] is True  # torch's fused AdamW under ZeRO on CPU
    rates = report["rates"]
    for step, factor in enumerate((1.0, 0.9, 0.8)):
        assert rates[step][:2] == pytest.approx([1e-4 * factor] * 2)  # base groups
        assert rates[step][2:] == pytest.approx([5e-4 * factor] * (len(rates[step]) - 2))


def write_ds_config(tmp_path, **optimizer_params) -> Path:
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    config["optimizer"]["params"].update(optimizer_params)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("buildable", [True, False])
def test_torch_fused_adamw_where_deepspeed_fused_adam_cannot_build(tmp_path, monkeypatch, buildable):
    """CUDA: DeepSpeed's FusedAdam when it is prebuilt or buildable, torch's fused AdamW otherwise; CPU: always
    torch's. bf16 stays on with CUDA only."""
    monkeypatch.setattr(engine_module, "deepspeed_fused_adam_available", lambda: buildable)
    path = write_ds_config(tmp_path)
    cuda = load_ds_config(path, use_cuda=True)["optimizer"]["params"]
    assert ("torch_adam" not in cuda and "fused" not in cuda) if buildable else cuda["torch_adam"] and cuda["fused"]
    cpu = load_ds_config(path, use_cuda=False)
    assert cpu["optimizer"]["params"]["torch_adam"] and cpu["optimizer"]["params"]["fused"]
    assert not cpu["bf16"]["enabled"] and load_ds_config(path, use_cuda=True)["bf16"]["enabled"]


def test_an_explicit_optimizer_choice_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_module, "deepspeed_fused_adam_available", lambda: False)
    params = load_ds_config(write_ds_config(tmp_path, torch_adam=False), use_cuda=True)["optimizer"]["params"]
    assert params["torch_adam"] is False and "fused" not in params
    offload = json.loads((REPO / "ds_configs" / "zero2_offload.json").read_text())["optimizer"]["params"]
    params = load_ds_config(REPO / "ds_configs" / "zero2_offload.json", use_cuda=False)["optimizer"]["params"]
    assert params == offload  # DeepSpeed's CPU Adam serves an offloaded optimizer
