"""A trained model for evaluation, from an fp16 export folder or a DeepSpeed training checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def is_export_folder(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def load_model(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32):
    """A GritVLP in eval mode: an export folder (config.json + model.safetensors) through from_pretrained,
    else a checkpoints folder (its 'latest' tag) or one tag folder, any ZeRO stage, consolidated to fp32."""
    from gritvlp.export import fp32_state_dict
    from gritvlp.model.gritvlp import GritVLP

    if is_export_folder(path):
        return GritVLP.from_pretrained(path, dtype=dtype, device=device).eval()
    weights, model_config = fp32_state_dict(path)
    model = GritVLP.from_config_dict(model_config)
    model.load_state_dict(weights, strict=True)
    return model.to(device=device, dtype=dtype).eval()


def load_model_tokenizer(path: str | Path, model):
    """The tokenizer saved beside an export, else the one the model's config names, writing captions in the model's
    text format (model.text_format: with or without the trailing [SEP])."""
    from gritvlp.data.text import load_tokenizer

    folder, text_format = Path(path), model.config.text_format
    if is_export_folder(folder) and ((folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file()):
        return load_tokenizer(str(folder), text_format)
    return load_tokenizer(model.config.tokenizer, text_format)


def setup_distributed(device_arg: str | None) -> torch.device:
    """Joins the process group when launched by torchrun / deepspeed; returns this rank's device (default: its GPU
    when there is one, else the CPU)."""
    import torch.distributed as dist

    local_gpu = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if device_arg in (None, "cuda"):
        device_arg = local_gpu if torch.cuda.is_available() else "cpu"
    device = torch.device(device_arg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def load_for_evaluation(path: str | Path, device_arg: str | None, dtype_arg: str | None):
    """What an evaluation script starts with: (model, its tokenizer, device, whether this is rank 0), the process
    group joined under a launcher; dtype_arg fp32 / fp16 / bf16, default fp16 on CUDA and fp32 on CPU."""
    import torch.distributed as dist

    device = setup_distributed(device_arg)
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    dtype = dtypes[dtype_arg or ("fp16" if device.type == "cuda" else "fp32")]
    model = load_model(path, device, dtype)
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    return model, load_model_tokenizer(path, model), device, is_main
