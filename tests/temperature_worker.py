"""Run by test_temperature.py under torchrun (CPU, gloo): a few optimizer steps of a DeepSpeed engine on a loss that
pushes the demo model's temperature past a bound, at each ZeRO stage in fp32 and bf16. Rank 0 prints one JSON line
per run: the stored temperature afterwards, in the module and in the optimizer's fp32 master copy."""

import json

import deepspeed
import torch
import torch.nn as nn
from deepspeed.utils import safe_get_full_fp32_param

from gritvlp.config import load_config
from gritvlp.model.gritvlp import GritVLP
from gritvlp.train.step import optimizer_step

MICRO_STEPS = 12  # 6 optimizer steps of 2 micro-steps
LR = 1e-3


class PushTemperature(nn.Module):
    """loss = direction x the bounded temperature: +1 pushes it down, -1 up."""

    def __init__(self, model: GritVLP, direction: float):
        super().__init__()
        self.model, self.direction = model, direction

    def forward(self):
        return self.direction * self.model.temperature()


def master_value(engine, param) -> float:
    full = safe_get_full_fp32_param(param)  # ZeRO 1-3 and DeepSpeed's bf16 optimizer
    if full is not None:
        return full.item()
    optimizer = engine.optimizer
    for group16, group32 in zip(getattr(optimizer, "fp16_groups", ()), getattr(optimizer, "fp32_groups", ())):
        for p, master in zip(group16, group32):  # FP16_UnfusedOptimizer (bf16 without ZeRO, torch's Adam)
            if p is param:
                return master.item()
    return param.item()  # fp32 without ZeRO: the parameter is the master


def run(stage: int, precision: str, direction: float, clamp: bool) -> dict:
    config = load_config("demo").model
    torch.manual_seed(0)
    model = GritVLP(config).requires_grad_(False)
    model.temp.requires_grad_(True)
    start = config.temp_min + 0.002 if direction > 0 else config.temp_max - 0.002
    with torch.no_grad():
        model.temp.fill_(start)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": precision == "bf16"},
    }
    engine, _, _, _ = deepspeed.initialize(model=PushTemperature(model, direction), model_parameters=[model.temp],
                                           config=ds_config)  # fmt: skip
    for _ in range(MICRO_STEPS):
        engine.backward(engine())
        optimizer_step(engine, model) if clamp else engine.step()
    module = model.temp.ds_tensor if hasattr(model.temp, "ds_id") else model.temp
    return {"stage": stage, "precision": precision, "direction": direction, "clamp": clamp,
            "master": master_value(engine, model.temp), "module": module.float().flatten()[0].item()}  # fmt: skip


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    runs = [(stage, precision, True) for stage in (0, 1, 2, 3) for precision in ("fp32", "bf16")]
    runs += [(0, "fp32", False), (2, "bf16", False)]  # without the clamp: the drift it prevents
    for stage, precision, clamp in runs:
        for direction in (1.0, -1.0):
            result = run(stage, precision, direction, clamp)
            if torch.distributed.get_rank() == 0:
                print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
