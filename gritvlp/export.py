"""DeepSpeed checkpoint (ZeRO stage 0-3) -> fp16 safetensors folder for fine-tuning.

The folder holds config.json (enough to rebuild the model with no other file), model.safetensors and
the tokenizer files; GritVLP.from_pretrained(folder) loads it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gritvlp.model.gritvlp import WEIGHTS_NAME

log = logging.getLogger("gritvlp.export")

FP16_MAX = torch.finfo(torch.float16).max
# Checkpoints hold the pre-training objective, which wraps the model as its `model` submodule.
MODEL_PREFIX = "model."


def _tag_folder(checkpoint: Path) -> tuple[Path, str]:
    """Accepts a checkpoints folder with a 'latest' file, or one tag folder."""
    if (checkpoint / "latest").is_file():
        tag = (checkpoint / "latest").read_text().strip()
        return checkpoint, tag
    if checkpoint.is_dir() and any(checkpoint.glob("*model_states.pt")):
        return checkpoint.parent, checkpoint.name
    raise FileNotFoundError(f"{checkpoint} is neither a DeepSpeed checkpoints folder (with 'latest') nor a tag folder")


def _client_state(tag_dir: Path) -> tuple[dict, int]:
    files = sorted(tag_dir.glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"no model states file in {tag_dir}")
    states = torch.load(files[0], map_location="cpu", weights_only=False)
    if "model_config" not in states:
        raise ValueError(f"{tag_dir} was not written by gritvlp (no model_config in its client state)")
    return states, states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0)


def fp32_state_dict(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The full fp32 weights and the model config of a checkpoint, whatever its ZeRO stage; the temperature is the
    value the model uses (see effective_temperature)."""
    folder, tag = _tag_folder(Path(checkpoint))
    states, stage = _client_state(folder / tag)
    if stage == 0:
        weights = {k: v.float() for k, v in states["module"].items()}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
    return effective_temperature(model_weights(weights), states["model_config"]), states["model_config"]


def model_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's own tensors of a checkpoint's state dict (the objective's, whose keys start with 'model.')."""
    if weights and all(key.startswith(MODEL_PREFIX) for key in weights):
        return {key[len(MODEL_PREFIX) :]: value for key, value in weights.items()}
    return weights


def effective_temperature(weights: dict[str, torch.Tensor], model_config: dict) -> dict[str, torch.Tensor]:
    """The weights with 'temp' clamped to [temp_min, temp_max], the value the model uses. Training keeps the stored
    value inside, but a checkpoint of an older run may hold one beyond, which code reading it unclamped (ALBEF's
    retrieval model) would use as it is."""
    if "temp" not in weights:
        return weights
    from gritvlp.config import ModelConfig

    cfg = model_config.get("model", {})
    low, high = cfg.get("temp_min", ModelConfig.temp_min), cfg.get("temp_max", ModelConfig.temp_max)
    return {**weights, "temp": weights["temp"].clamp(low, high)}


def to_fp16(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Casts floating tensors to fp16; a value fp16 cannot hold is an error, never a silent inf."""
    out = {}
    for name, tensor in weights.items():
        if tensor.is_floating_point():
            if not torch.isfinite(tensor).all():
                raise ValueError(f"tensor '{name}' holds NaN or inf: the checkpoint is damaged")
            peak = tensor.abs().max().item() if tensor.numel() else 0.0
            if peak > FP16_MAX:
                raise ValueError(
                    f"tensor '{name}' has a value of magnitude {peak:.4g}, beyond fp16's {FP16_MAX:.0f}: "
                    "export in fp32 or bf16 instead"
                )
            tensor = tensor.to(torch.float16)
        out[name] = tensor.contiguous()
    return out


def export_fp16(checkpoint: str | Path, out_dir: str | Path) -> Path:
    from gritvlp.data.text import load_tokenizer

    weights, model_config = fp32_state_dict(checkpoint)
    fp16 = to_fp16(weights)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(fp16, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(model_config, indent=2))
    model_cfg = model_config["model"]
    load_tokenizer(model_cfg.get("tokenizer"), model_cfg.get("text_format", "cls_sep")).save_pretrained(str(out_dir))
    log.info("exported %d tensors (%.1f M parameters) to %s", len(fp16), sum(t.numel() for t in fp16.values()) / 1e6, out_dir)
    return out_dir


def load_exported_state(folder: str | Path) -> dict[str, torch.Tensor]:
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}")
    return load_file(str(path))
