"""Weights in and out of ALBEF's checkpoint layout (salesforce/ALBEF; GRIT-VLP's checkpoints use it too).

ALBEF's names: visual_encoder.* (a ViT with timm's parameter names), text_encoder.bert.* (its pre-training
BertForMaskedLM) or text_encoder.* (the BertModel of its retrieval and fine-tuning models),
text_encoder.cls.predictions.* (the MLM head), vision_proj, text_proj, itm_head and a 0-dim temp. ALBEF adds
momentum copies of the encoders and projections (*_m) and feature queues; GRIT-VLP's checkpoints have neither.
Layers and fusion split must agree: ALBEF's BERT has cross-attention from layer 6 on, like vitb16_bert.

ALBEF's and GRIT-VLP's code feeds its models "[CLS] words" without a trailing [SEP]: their weights imported here
are read that way (model.text_format = "cls_only"); a model trained here reads "[CLS] words [SEP]" ("cls_sep").
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("gritvlp.albef")

LAYOUTS = ("pretrain", "retrieval")
TEXT_FORMAT = "cls_only"  # how ALBEF's and GRIT-VLP's code tokenises: no trailing [SEP]
TEXT_PREFIX = {"pretrain": "text_encoder.bert.", "retrieval": "text_encoder."}
MOMENTUM_MODULES = ("visual_encoder", "vision_proj", "text_encoder", "text_proj")
QUEUE_BUFFERS = ("image_queue", "text_queue", "idx_queue", "queue_ptr")
DEFAULT_QUEUE_SIZE = 65536
MLM_PREFIX = "text_encoder.cls.predictions."
# ALBEF's MLM decoder is tied to the word embeddings and its bias to the head's bias; this model stores each once.
TIED = {
    MLM_PREFIX + "decoder.weight": "text.embeddings.word_embeddings.weight",
    MLM_PREFIX + "decoder.bias": "mlm_head.bias",
}
# (ALBEF prefix, gritvlp prefix): the most specific first.
RENAMES = (
    ("visual_encoder.", "vision.vit."),
    (MLM_PREFIX + "transform.", "mlm_head.transform."),
    (MLM_PREFIX + "bias", "mlm_head.bias"),
    ("text_encoder.bert.", "text."),
    ("text_encoder.", "text."),
)


# ---------------------------------------------------------------- ALBEF -> gritvlp


def load_albef_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an ALBEF / GRIT-VLP .pth file (found under 'model' when wrapped)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict (tensors by name, or under 'model')")
    return state


def is_ignored_on_import(name: str) -> bool:
    """Momentum copies, queues and the position_ids buffer have no counterpart in GritVLP."""
    return name in QUEUE_BUFFERS or name.split(".", 1)[0].endswith("_m") or name.endswith("embeddings.position_ids")


def gritvlp_name(albef_name: str) -> str:
    for albef_prefix, our_prefix in RENAMES:
        if albef_name.startswith(albef_prefix):
            return our_prefix + albef_name[len(albef_prefix) :]
    return albef_name  # vision_proj, text_proj, itm_head, temp


def albef_to_gritvlp(albef_state: dict[str, torch.Tensor], model, allow_missing: tuple[str, ...] = ()) -> dict:
    """ALBEF-layout tensors renamed, reshaped and checked for `model` (a GritVLP); loads nothing.

    Position embeddings are resampled to the model's image size. Any model tensor left without a value is an
    error, unless its name starts with one of allow_missing (e.g. 'mlm_head.' for a retrieval checkpoint).
    """
    ignored = [name for name in albef_state if is_ignored_on_import(name)]
    tied = {name: value for name, value in albef_state.items() if name in TIED}
    ours = {
        gritvlp_name(name): value
        for name, value in albef_state.items()
        if name not in tied and not is_ignored_on_import(name)
    }
    _resolve_tied(ours, tied)
    expected = model.state_dict()
    if "temp" in ours and ours["temp"].numel() == 1:
        ours["temp"] = ours["temp"].reshape(expected["temp"].shape)  # 0-dim there, [1] here
    if "vision.vit.pos_embed" in ours:
        ours["vision.vit.pos_embed"] = resample_pos_embed(ours["vision.vit.pos_embed"], model.vision.vit)
    _check_names_and_shapes(ours, expected, allow_missing)
    if ignored:
        log.info("ignored %d momentum/queue/buffer entries (e.g. %s)", len(ignored), ", ".join(ignored[:3]))
    return ours


def _resolve_tied(ours: dict, tied: dict) -> None:
    for albef_name, our_name in TIED.items():
        if albef_name not in tied:
            continue
        if our_name not in ours:
            ours[our_name] = tied[albef_name]
        elif not torch.equal(ours[our_name], tied[albef_name]):
            raise ValueError(f"{albef_name} differs from the tensor it is tied to here ({our_name}); GritVLP ties them")


def resample_pos_embed(pos_embed: torch.Tensor, vit) -> torch.Tensor:
    """Bicubic resampling of the patch grid to the ViT's (no antialiasing: the same values ALBEF's
    interpolate_pos_embed gives)."""
    if pos_embed.shape == vit.pos_embed.shape:
        return pos_embed
    from timm.layers import resample_abs_pos_embed

    prefix = vit.num_prefix_tokens
    old_side = round((pos_embed.shape[1] - prefix) ** 0.5)
    if old_side * old_side != pos_embed.shape[1] - prefix:
        raise ValueError(f"pos_embed of shape {tuple(pos_embed.shape)} is not a square grid plus {prefix} token(s)")
    new_grid = list(vit.patch_embed.grid_size)
    log.info("resampling position embeddings from %dx%d to %dx%d patches", old_side, old_side, *new_grid)
    resampled = resample_abs_pos_embed(
        pos_embed.float(), new_grid, [old_side, old_side], num_prefix_tokens=prefix, antialias=False
    )
    return resampled.to(pos_embed.dtype)


def _check_names_and_shapes(ours: dict, expected: dict, allow_missing: tuple[str, ...]) -> None:
    missing = [k for k in expected if k not in ours and not k.startswith(tuple(allow_missing))]
    unexpected = [k for k in ours if k not in expected]
    wrong = [
        f"{k} {tuple(v.shape)} (model {tuple(expected[k].shape)})"
        for k, v in ours.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} model tensor(s) have no value in the checkpoint: {', '.join(missing[:8])}")
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint tensor(s) fit no model tensor: {', '.join(unexpected[:8])}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {', '.join(wrong[:8])}")
    if problems:
        raise ValueError("ALBEF checkpoint does not fit this model: " + "; ".join(problems))


def load_albef_weights(model, source: str | Path | dict, allow_missing: tuple[str, ...] = ()) -> None:
    """Loads an ALBEF / GRIT-VLP checkpoint (a .pth path or its state dict) into a GritVLP."""
    state = load_albef_file(source) if isinstance(source, (str, Path)) else source
    model.load_state_dict(albef_to_gritvlp(state, model, allow_missing), strict=False)


# ---------------------------------------------------------------- gritvlp -> ALBEF


def albef_name(our_name: str, layout: str = "pretrain") -> str:
    if our_name.startswith("vision.vit."):
        return "visual_encoder." + our_name[len("vision.vit.") :]
    if our_name.startswith("text."):
        return TEXT_PREFIX[layout] + our_name[len("text.") :]
    if our_name.startswith("mlm_head."):
        return MLM_PREFIX + our_name[len("mlm_head.") :]
    return our_name


def gritvlp_to_albef(
    model, layout: str = "pretrain", queue_size: int = DEFAULT_QUEUE_SIZE, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The model's weights as ALBEF's pre-training ('pretrain') or retrieval ('retrieval') model holds them, fp32.

    The momentum copies are the online weights (what ALBEF's copy_params() makes of them at start-up; the
    tensors are shared, so torch.save writes them once); queues are random unit columns, as ALBEF starts them.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    weights = {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in model.state_dict().items()}
    online = {
        albef_name(name, layout): value
        for name, value in weights.items()
        if layout == "pretrain" or not name.startswith("mlm_head.")  # ALBEF's retrieval model has no MLM head
    }
    # ALBEF's retrieval and fine-tuning models use temp unclamped: write the value this model uses
    online["temp"] = weights["temp"].clamp(model.config.temp_min, model.config.temp_max).reshape(())
    max_positions = weights["text.embeddings.position_embeddings.weight"].shape[0]
    online[TEXT_PREFIX[layout] + "embeddings.position_ids"] = torch.arange(max_positions)[None]
    if layout == "pretrain":
        for albef_tied, ours in TIED.items():
            online[albef_tied] = weights[ours]
    momentum = {momentum_name(name): value for name, value in online.items() if momentum_name(name)}
    embed_dim = weights["vision_proj.weight"].shape[0]
    return {**online, **momentum, **_queues(embed_dim, queue_size, layout, seed)}


def momentum_name(name: str) -> str | None:
    """'visual_encoder.x' -> 'visual_encoder_m.x'; None for tensors without a momentum copy."""
    module, _, rest = name.partition(".")
    return f"{module}_m.{rest}" if module in MOMENTUM_MODULES else None


def _queues(embed_dim: int, queue_size: int, layout: str, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    queues = {
        name: F.normalize(torch.randn(embed_dim, queue_size, generator=generator), dim=0)
        for name in ("image_queue", "text_queue")
    }
    queues["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    if layout == "retrieval":
        queues["idx_queue"] = torch.full((1, queue_size), -100, dtype=torch.long)  # ALBEF's "no sample" id
    return queues


def save_albef_checkpoint(
    model, path: str | Path, layout: str = "pretrain", queue_size: int = DEFAULT_QUEUE_SIZE
) -> Path:
    """Writes {'model': state dict} as ALBEF's and GRIT-VLP's scripts read it (checkpoint['model'])."""
    if model.config.text_format != TEXT_FORMAT:
        log.warning(
            "%s: the model reads captions as '[CLS] words [SEP]' (model.text_format=%s), but ALBEF's and GRIT-VLP's "
            "code tokenises without [SEP]: its text features there will differ from gritvlp's", path,
            model.config.text_format,
        )  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = gritvlp_to_albef(model, layout, queue_size)
    torch.save({"model": state}, path)
    log.info("wrote %d ALBEF %s-layout tensors to %s", len(state), layout, path)
    return path


# ---------------------------------------------------------------- gritvlp export folders


def write_export_folder(model, out_dir: str | Path) -> Path:
    """Writes the model as gritvlp.export does (config.json with its text format, fp16 model.safetensors with the
    temperature it uses, tokenizer), so that GritVLP.from_pretrained(out_dir) loads it."""
    from safetensors.torch import save_file

    from gritvlp.data.text import load_tokenizer
    from gritvlp.export import WEIGHTS_NAME, effective_temperature, to_fp16

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config_dict()
    weights = effective_temperature({k: v.detach().cpu() for k, v in model.state_dict().items()}, config)
    save_file(to_fp16(weights), str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    load_tokenizer(model.config.tokenizer, model.config.text_format).save_pretrained(str(out_dir))
    return out_dir
