"""DeepSpeed set-up: reading ds_config, parameter groups, the learning-rate schedule."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR

log = logging.getLogger("gritvlp.train")

# Keys of ds_config that gritvlp's own config owns; setting them there would be silently ignored.
_OWNED_ELSEWHERE = {"scheduler": "the schedule is set by train.warmup_steps / train.min_lr_ratio"}


def load_ds_config(path: str | Path, use_cuda: bool, lr: float | None = None) -> dict:
    """Reads a DeepSpeed JSON config and adapts it to the machine (fp32 and torch AdamW on CPU); `lr`, when set,
    replaces the optimizer's learning rate (train.lr of gritvlp's config)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {path}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {err}") from err
    for key, why in _OWNED_ELSEWHERE.items():
        if key in config:
            raise ValueError(f"DeepSpeed config {path}: remove the '{key}' block ({why})")
    if "train_micro_batch_size_per_gpu" not in config:
        raise ValueError(f"DeepSpeed config {path} must set train_micro_batch_size_per_gpu")
    if config.get("fp16", {}).get("enabled") and config.get("bf16", {}).get("enabled"):
        raise ValueError(f"DeepSpeed config {path}: enable one of fp16 and bf16, not both")
    if lr is not None:
        config.setdefault("optimizer", {}).setdefault("params", {})["lr"] = lr
    if not use_cuda:
        for precision in ("fp16", "bf16"):
            if config.get(precision, {}).get("enabled"):
                log.warning("no CUDA device: %s disabled, training in fp32 on CPU", precision)
                config[precision]["enabled"] = False
        optimizer = config.get("optimizer")
        if optimizer and optimizer.get("type", "").lower() in ("adam", "adamw"):
            zero = config.get("zero_optimization", {})
            if not zero.get("offload_optimizer", {}).get("device") == "cpu":
                optimizer.setdefault("params", {})["torch_adam"] = True  # fused CUDA Adam is unavailable
    return config


def zero_stage(ds_config: dict) -> int:
    return ds_config.get("zero_optimization", {}).get("stage", 0)


def precision_dtype(ds_config: dict) -> torch.dtype:
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: none on biases, norms, embeddings' LayerNorm, temperature."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "norm" in name.lower() or name.endswith((".bias", "temp")):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def cosine_with_warmup(total_steps: int, warmup_steps: int, start_ratio: float, min_ratio: float):
    """Multiplier of the base lr: linear warm-up from start_ratio to 1, then cosine decay to min_ratio.
    GRIT-VLP / ALBEF: lr 1e-4, warm-up from 1e-5 (start_ratio 0.1), cosine to 1e-5 (min_ratio 0.1)."""
    total_steps = max(1, total_steps)
    warmup_steps = min(warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return start_ratio + (1 - start_ratio) * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_engine(module, ds_config: dict, total_steps: int, warmup_steps: int, start_ratio: float, min_ratio: float):
    """The DeepSpeed engine of `module` (the pre-training objective), its optimizer's parameter groups and the
    learning-rate schedule."""
    import deepspeed

    if "optimizer" not in ds_config:
        raise ValueError("DeepSpeed config needs an 'optimizer' block (type AdamW, lr, weight_decay)")
    weight_decay = ds_config["optimizer"].get("params", {}).get("weight_decay", 0.0)
    schedule = cosine_with_warmup(total_steps, warmup_steps, start_ratio, min_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        model_parameters=parameter_groups(module, weight_decay),
        config=ds_config,
        lr_scheduler=lambda opt: LambdaLR(opt, schedule),
    )
    return engine
