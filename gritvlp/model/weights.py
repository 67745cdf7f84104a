"""Reading checkpoints from local files (no hub access at run time)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

BERT_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A .safetensors or torch file; unwraps {'model': ...} / {'state_dict': ...} wrappers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def load_bert_state(folder_or_file: str | Path) -> dict[str, torch.Tensor]:
    """A transformers BERT checkpoint (BertModel or BertForMaskedLM), keys renamed to gritvlp's layout:
    'bert.' prefixes dropped, 'cls.predictions.' -> 'mlm_head.', and the LayerNorm names of the original
    bert-base-uncased release ('LayerNorm.gamma' / 'LayerNorm.beta') -> 'LayerNorm.weight' / 'LayerNorm.bias'."""
    path = Path(folder_or_file)
    if path.is_dir():
        files = [path / name for name in BERT_WEIGHT_FILES if (path / name).is_file()]
        if not files:
            raise FileNotFoundError(f"no {' or '.join(BERT_WEIGHT_FILES)} in {path}")
        path = files[0]
    out = {}
    for key, value in load_state_dict_file(path).items():
        key = _modern_layer_norm_name(key)
        if key.startswith("bert."):
            key = key[len("bert.") :]
        if key.startswith("cls.predictions."):
            key = "mlm_head." + key[len("cls.predictions.") :]
            if key.startswith("mlm_head.decoder."):
                continue  # tied to the word embeddings
        out[key] = value
    return out


def _modern_layer_norm_name(key: str) -> str:
    for old, new in ((".gamma", ".weight"), (".beta", ".bias")):
        if "LayerNorm" in key and key.endswith(old):
            return key[: -len(old)] + new
    return key
