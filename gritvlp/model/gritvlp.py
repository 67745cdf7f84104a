"""The GRIT-VLP model: ViT image encoder, BERT text + fusion encoder, projections, ITM and MLM heads.

forward(batch) computes the pre-training losses in one call, so that DeepSpeed (ZeRO-3 included)
sees every parameter used inside the engine's forward.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gritvlp.config import ModelConfig, ObjectivesConfig
from gritvlp.objectives.itc import contrastive_loss
from gritvlp.objectives.itm import itm_loss, itm_pairs
from gritvlp.objectives.mlm import MLM_KEYS, prepare_mlm

from .text import BertTextFusion, MLMHead, build_bert_config
from .vision import VisionEncoder
from .weights import load_bert_state


class GritVLP(nn.Module):
    def __init__(self, config: ModelConfig, objectives: ObjectivesConfig | None = None, special_tokens=None):
        super().__init__()
        self.config = config
        self.objectives = objectives or ObjectivesConfig()
        self.vision = VisionEncoder(config.vision_name, config.image_size, config.vision_kwargs, config.vision_weights)
        bert_config = build_bert_config(config.text_config)
        self.text = BertTextFusion(bert_config, config.num_text_layers, self.vision.width)
        hidden = bert_config.hidden_size
        self.vision_proj = nn.Linear(self.vision.width, config.embed_dim)
        self.text_proj = nn.Linear(hidden, config.embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.mlm_head = MLMHead(bert_config, self.text.embeddings.word_embeddings)
        self.temp = nn.Parameter(torch.tensor([float(config.temp_init)]))  # 1-d: ZeRO-3 partitions it
        # Token ids the masking needs; defaults are BERT-uncased's.
        self.special_tokens = special_tokens or {"pad": 0, "cls": 101, "sep": 102, "mask": 103}
        if config.text_weights:
            self.load_text_weights(config.text_weights)
        if config.grad_checkpointing:
            self.set_grad_checkpointing(True)

    # -- set-up -------------------------------------------------------------------------------------
    def load_text_weights(self, path: str) -> None:
        """Loads a local BERT checkpoint into the text and fusion layers (cross-attention stays new)."""
        state = load_bert_state(path)
        ours = self.state_dict()
        text_state = {f"text.{k}": v for k, v in state.items() if f"text.{k}" in ours}
        text_state.update({k: v for k, v in state.items() if k.startswith("mlm_head.") and k in ours})
        for key, value in text_state.items():
            if ours[key].shape != value.shape:
                raise ValueError(f"BERT weights {path}: {key} has shape {tuple(value.shape)}, model {tuple(ours[key].shape)}")
        if not any(k.startswith("text.encoder.") for k in text_state):
            raise ValueError(f"BERT weights {path} hold no encoder layer this model can use")
        self.load_state_dict(text_state, strict=False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vision.set_grad_checkpointing(enable)
        self.text.encoder.grad_checkpointing = enable

    def clamped_temp(self) -> torch.Tensor:
        # A clamp in the graph (not an in-place clamp of the parameter) stays right with ZeRO master weights.
        return self.temp.clamp(self.config.temp_min, self.config.temp_max)[0]

    # -- encoders -----------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor):
        """Returns image tokens [B, 1+P, Wv] and the normalised projected [CLS] feature [B, E]
        (in the projection's output dtype: bf16 under bf16 autocast)."""
        tokens = self.vision(images)
        return tokens, normalize_in_fp32(self.vision_proj(tokens[:, 0]))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Returns text-encoder states [B, L, H] and the normalised projected [CLS] feature [B, E]
        (in the projection's output dtype)."""
        hidden = self.text.encode_text(input_ids, attention_mask)
        return hidden, normalize_in_fp32(self.text_proj(hidden[:, 0]))

    def itm_logits(self, image_embeds, text_hidden, attention_mask) -> torch.Tensor:
        fused = self.text.fuse(text_hidden, attention_mask, image_embeds)
        return self.itm_head(fused[:, 0])

    # -- pre-training -------------------------------------------------------------------------------
    def prepare_mlm(self, input_ids: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """This model's MLM inputs for a host batch (see gritvlp.objectives.mlm.prepare_mlm), on the CPU."""
        tokens = self.special_tokens
        return prepare_mlm(
            input_ids, vocab_size=self.text.config.vocab_size, mask_token_id=tokens["mask"],
            pad_token_id=tokens["pad"], cls_token_id=tokens["cls"], mask_prob=self.objectives.mask_prob,
            generator=generator,
        )  # fmt: skip

    def forward(self, batch: dict) -> dict:
        """Pre-training losses for one batch (keys: image, input_ids, attention_mask, group_id, and the MLM
        inputs mlm_input_ids, mlm_positions, mlm_targets of prepare_mlm).

        Without the MLM inputs they are drawn here from the default CPU generator, after copying input_ids
        to the host: the slow path (on CUDA the copy waits for the device), for direct use of the model.
        Training prepares them on the host before the batch moves to the device.
        Returns the total 'loss', each term, metrics and the detached features for the GRIT bank.
        """
        cfg = self.objectives
        images, input_ids, attention_mask = batch["image"], batch["input_ids"], batch["attention_mask"]
        group_ids = batch.get("group_id")
        if group_ids is None:
            group_ids = torch.arange(images.shape[0], device=images.device)
        temp = self.clamped_temp()

        image_embeds, image_feat = self.encode_image(images)
        text_hidden, text_feat = self.encode_text(input_ids, attention_mask)
        itc = contrastive_loss(image_feat, text_feat, temp, group_ids, cfg)
        out = {
            "itc": (itc.loss_i2t + itc.loss_t2i) / 2,
            "consistency": itc.loss_consistency,
            "temp": temp.detach(),
            "image_feat": image_feat.detach(),
            "text_feat": text_feat.detach(),
        }
        out.update(similarity_stats(image_feat.detach(), text_feat.detach(), itc.neg_text_for_image))
        total = cfg.itc_weight * itc.loss

        if cfg.itm_weight > 0:
            pairs = itm_pairs(image_embeds, text_hidden, attention_mask, itc.neg_text_for_image, itc.neg_image_for_text)
            logits = self.itm_logits(pairs.images, pairs.texts, pairs.attention_mask)
            out["itm"], out["itm_acc"] = itm_loss(logits, pairs.labels, pairs.weights)
            total = total + cfg.itm_weight * out["itm"]

        if cfg.mlm_weight > 0:
            mlm = self._mlm_inputs(batch)
            masked_hidden = self.text.encode_text(mlm["mlm_input_ids"], attention_mask)
            fused = self.text.fuse(masked_hidden, attention_mask, image_embeds)
            out["mlm"] = self.mlm_head(fused, mlm["mlm_positions"], mlm["mlm_targets"])
            total = total + cfg.mlm_weight * out["mlm"]

        out["loss"] = total
        return out

    def _mlm_inputs(self, batch: dict) -> dict:
        """The batch's host-prepared MLM inputs, or (slow path) inputs drawn now and moved to its device."""
        if all(key in batch for key in MLM_KEYS):
            return {key: batch[key] for key in MLM_KEYS}
        device = batch["input_ids"].device
        return {key: value.to(device) for key, value in self.prepare_mlm(batch["input_ids"]).items()}

    # -- saving and loading ------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {
            "model": dataclasses.asdict(self.config),
            "objectives": dataclasses.asdict(self.objectives),
            "special_tokens": self.special_tokens,
            "bert_config": self.text.config.to_dict(),
        }

    @classmethod
    def from_config_dict(cls, data: dict) -> GritVLP:
        from gritvlp.config import _build

        model_cfg = _build(ModelConfig, data["model"], "model.")
        # Weights come from the checkpoint: never reload the initialisation files.
        model_cfg = dataclasses.replace(model_cfg, vision_weights=None, text_weights=None)
        if "bert_config" in data:
            model_cfg = dataclasses.replace(model_cfg, text_config=_plain_bert_kwargs(data["bert_config"]))
        objectives = _build(ObjectivesConfig, data.get("objectives", {}), "objectives.")
        return cls(model_cfg, objectives, special_tokens=data.get("special_tokens"))

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> GritVLP:
        """Loads a folder written by gritvlp.export (config.json + model.safetensors)."""
        from gritvlp.export import load_exported_state

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} has no config.json: is it a folder written by export_fp16?")
        data = json.loads((folder / "config.json").read_text())
        model = cls.from_config_dict(data)
        model.load_state_dict(load_exported_state(folder), strict=True)
        return model.to(device=device, dtype=dtype)


def _plain_bert_kwargs(bert_config: dict) -> dict:
    keep = (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
        "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id",
    )  # fmt: skip
    return {k: bert_config[k] for k in keep if k in bert_config}


def normalize_in_fp32(feature: torch.Tensor) -> torch.Tensor:
    """L2-normalises in fp32 for accuracy, returns the input dtype: bf16 features halve the contrastive
    kernel's reads."""
    return F.normalize(feature.float(), dim=-1).to(feature.dtype)


@torch.no_grad()
def similarity_stats(image_feat, text_feat, neg_text_for_image) -> dict:
    """Mean positive, in-batch negative and chosen-ITM-negative cosine similarity, in O(B D)."""
    b = image_feat.shape[0]
    image_feat, text_feat = image_feat.float(), text_feat.float()
    positive = (image_feat * text_feat).sum(-1)
    total = image_feat.sum(0) @ text_feat.sum(0)
    stats = {"sim_pos": positive.mean()}
    if b > 1:
        stats["sim_neg"] = (total - positive.sum()) / (b * (b - 1))
    valid = (neg_text_for_image >= 0).float()
    chosen = (image_feat * text_feat[neg_text_for_image.clamp(min=0)]).sum(-1)
    stats["sim_itm_neg"] = (chosen * valid).sum() / valid.sum().clamp(min=1)  # no host sync
    return stats
