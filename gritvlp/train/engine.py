"""DeepSpeed set-up: reading ds_config, parameter groups, the learning-rate schedule."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR

log = logging.getLogger("gritvlp.train")

# Keys of ds_config that gritvlp's own config owns; setting them there would be silently ignored.
_OWNED_ELSEWHERE = {"scheduler": "the schedule is set by train.lr_schedule, warmup_steps and min_lr_ratio"}


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
    _choose_adam(config, use_cuda)
    return config


def _choose_adam(config: dict, use_cuda: bool) -> None:
    """Adam(W) on the device without DeepSpeed's compiled FusedAdam where it cannot run: torch's fused AdamW (one
    kernel over each flat ZeRO partition, the same decoupled weight decay). Always on CPU; on CUDA when FusedAdam is
    neither prebuilt nor buildable here (no nvcc: pip-installed CUDA has none), where DeepSpeed would otherwise fail
    at start-up. A config that sets torch_adam itself is left as it is; CPU-offloaded optimizers are DeepSpeed's."""
    optimizer = config.get("optimizer")
    if not optimizer or optimizer.get("type", "").lower() not in ("adam", "adamw"):
        return
    params = optimizer.setdefault("params", {})
    offloaded = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
    if offloaded or "torch_adam" in params or (use_cuda and deepspeed_fused_adam_available()):
        return
    params.update(torch_adam=True, fused=True)
    if use_cuda:
        log.info("DeepSpeed's FusedAdam cannot be built here (no prebuilt op, no nvcc): torch's fused AdamW instead")


def deepspeed_fused_adam_available() -> bool:
    """Whether DeepSpeed's FusedAdam can run: prebuilt into the installed DeepSpeed, or compilable now (a CUDA
    toolkit whose nvcc has torch's CUDA major version, ninja, and the builder's own check)."""
    try:
        from deepspeed.git_version_info import installed_ops
        from deepspeed.ops.op_builder import FusedAdamBuilder
        from deepspeed.ops.op_builder.builder import installed_cuda_version
        from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available
    except ImportError:
        return False
    if installed_ops.get("fused_adam"):
        return True
    nvcc = CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc")
    if not nvcc or not os.access(nvcc, os.X_OK) or not is_ninja_available() or not torch.version.cuda:
        return False
    try:
        same_major = installed_cuda_version()[0] == int(torch.version.cuda.split(".")[0])
        return same_major and bool(FusedAdamBuilder().is_compatible(verbose=False))
    except Exception:  # noqa: BLE001 - a toolkit that cannot even be probed cannot build the op
        return False


def zero_stage(ds_config: dict) -> int:
    return ds_config.get("zero_optimization", {}).get("stage", 0)


def precision_dtype(ds_config: dict) -> torch.dtype:
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


# Parameter groups a learning-rate multiplier can address (train.lr_multipliers); everything else is "base".
LR_GROUPS = ("heads", "fusion", "reconstructor")
_HEADS = ("itm_head", "mlm_head", "vision_proj", "text_proj", "concept_head", "attribute_head")


def lr_group(name: str, fusion_layers: set[int]) -> str:
    """The group of a parameter name: the heads (ITM, MLM, the ITC projections, the concept heads), the fusion
    (cross-modal) layers, the FLM reconstructor, or base (the image and text encoders, temperature)."""
    parts = name.split(".")
    parts = parts[1:] if parts[0] == "model" else parts  # the objective wraps the model as `model`
    if parts[0] == "reconstructor":
        return "reconstructor"
    if parts[0] in _HEADS:
        return "heads"
    if parts[:3] == ["text", "encoder", "layer"] and int(parts[3]) in fusion_layers:
        return "fusion"
    return "base"


def _fusion_layers(names: list[str]) -> set[int]:
    """Indices of the BERT layers with cross-attention (the fusion layers)."""
    layers = set()
    for name in names:
        parts = name.split(".")
        parts = parts[1:] if parts[0] == "model" else parts
        if parts[:3] == ["text", "encoder", "layer"] and "crossattention" in parts:
            layers.add(int(parts[3]))
    return layers


def parameter_groups(
    model: torch.nn.Module, weight_decay: float, lr: float | None = None, multipliers: dict | None = None
) -> list[dict]:
    """Weight decay on weight matrices only: none on biases, norms, embeddings' LayerNorm, temperature. With
    multipliers ({group of LR_GROUPS: factor}), the groups' parameters train at factor x lr (the schedule scales
    every group alike); the first group is always the base rate's, the one logged as train/lr."""
    multipliers = {k: v for k, v in (multipliers or {}).items() if v != 1}
    if multipliers and lr is None:
        raise ValueError("learning-rate multipliers need the optimizer's lr")
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    fusion = _fusion_layers([name for name, _ in trainable])
    groups: dict[tuple[str, bool], list] = {}
    for name, param in trainable:
        no_decay = param.ndim < 2 or "norm" in name.lower() or name.endswith((".bias", "temp"))
        group = lr_group(name, fusion)
        groups.setdefault((group if group in multipliers else "base", no_decay), []).append(param)
    order = [("base", False), ("base", True)] + [(g, d) for g in LR_GROUPS for d in (False, True)]
    out = []
    for group, no_decay in order:
        params = groups.get((group, no_decay))
        if not params and group != "base":
            continue
        entry = {"params": params or [], "weight_decay": 0.0 if no_decay else weight_decay}
        if group != "base":
            entry["lr"] = lr * multipliers[group]
        out.append(entry)
    return out


def cosine_with_warmup(total_steps: int, warmup_steps: int, start_ratio: float, min_ratio: float):
    """Multiplier of the base lr: linear warm-up from start_ratio to 1, then cosine decay to min_ratio.
    GRIT-VLP / ALBEF: lr 1e-4, warm-up from 1e-5 (start_ratio 0.1), cosine to 1e-5 (min_ratio 0.1)."""
    return _with_warmup(total_steps, warmup_steps, start_ratio, min_ratio, lambda t: 0.5 * (1 + math.cos(math.pi * t)))


def linear_with_warmup(total_steps: int, warmup_steps: int, start_ratio: float, min_ratio: float):
    """Multiplier of the base lr: linear warm-up from start_ratio to 1, then linear decay to min_ratio (FLM: to 0)."""
    return _with_warmup(total_steps, warmup_steps, start_ratio, min_ratio, lambda t: 1 - t)


def _with_warmup(total_steps: int, warmup_steps: int, start_ratio: float, min_ratio: float, decay):
    total_steps = max(1, total_steps)
    warmup_steps = min(warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return start_ratio + (1 - start_ratio) * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * decay(min(1.0, progress))

    return factor


LR_SCHEDULES = {"cosine": cosine_with_warmup, "linear": linear_with_warmup}


def epoch_cosine(steps_per_epoch: int, epochs: int, min_ratio: float):
    """Multiplier of the base lr, constant within an epoch: min_ratio + (1 - min_ratio) (1 + cos(pi e / E)) / 2 in
    epoch e of E. ALBEF's and GRIT-VLP's fine-tuning schedule (timm's CosineLRScheduler stepped once per epoch; its
    one-epoch warm-up starts at the base lr, so it changes nothing)."""
    steps_per_epoch, epochs = max(1, steps_per_epoch), max(1, epochs)

    def factor(step: int) -> float:
        epoch = min(step // steps_per_epoch, epochs - 1)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * epoch / epochs))

    return factor


def build_engine(module, ds_config: dict, schedule, lr_multipliers: dict | None = None):
    """The DeepSpeed engine of `module` (the objective), its optimizer's parameter groups and the learning-rate
    schedule: `schedule(step)` multiplies every group's rate at optimiser step `step`."""
    import deepspeed

    if "optimizer" not in ds_config:
        raise ValueError("DeepSpeed config needs an 'optimizer' block (type AdamW, lr, weight_decay)")
    params = ds_config["optimizer"].get("params", {})
    groups = parameter_groups(module, params.get("weight_decay", 0.0), params.get("lr"), lr_multipliers)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        model_parameters=groups,
        config=ds_config,
        lr_scheduler=lambda opt: LambdaLR(opt, schedule),
    )
    return engine
