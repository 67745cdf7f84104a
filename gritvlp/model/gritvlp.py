"""The GRIT-VLP model: ViT image encoder, BERT text + fusion encoder, projections, ITM and MLM heads, and the
optional pre-training modules: FLM's reconstructor and the concept heads of DiHT's distillation (objects, with
the frozen teacher held outside the state dict, and optionally attributes).

Modules and the encoders only: encode_image, encode_text, fuse (and itm_logits on top of it), layer_states,
reconstruct, concept_logits, attribute_logits. The pre-training losses are composed in gritvlp.objectives
(PretrainingObjective), which calls these.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from gritvlp.config import ModelConfig

from .concepts import ConceptTeacher, build_teacher_model
from .reconstructor import Reconstructor
from .temperature import bounded_temperature
from .text import BertTextFusion, MLMHead, build_bert_config
from .vision import VisionEncoder
from .weights import load_bert_state

log = logging.getLogger("gritvlp.model")
WEIGHTS_NAME = "model.safetensors"  # of an exported folder (config.json + weights), see gritvlp.export
BERT_SPECIAL_TOKENS = {"pad": 0, "cls": 101, "sep": 102, "mask": 103}  # bert-base-uncased's ids


class GritVLP(nn.Module):
    def __init__(self, config: ModelConfig, special_tokens: dict | None = None):
        super().__init__()
        self.config = config
        self.vision = VisionEncoder(config.vision_name, config.image_size, config.vision_kwargs, config.vision_weights)
        bert_config = build_bert_config(config.text_config)
        self.text = BertTextFusion(bert_config, config.num_text_layers, self.vision.width)
        hidden = bert_config.hidden_size
        self.vision_proj = nn.Linear(self.vision.width, config.embed_dim)
        self.text_proj = nn.Linear(hidden, config.embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.mlm_head = MLMHead(bert_config, self.text.embeddings.word_embeddings)
        self.temp = nn.Parameter(torch.tensor([float(config.temp_init)]))  # 1-d: ZeRO-3 partitions it
        self.special_tokens = dict(special_tokens or BERT_SPECIAL_TOKENS)  # ids the masking needs
        layers = config.reconstructor_layers or 0
        self.reconstructor = Reconstructor(bert_config, layers) if layers else None
        self.concept_head, self.attribute_head, self._teacher = None, None, []
        if config.teacher_name:
            self._build_concept_distillation()
        if config.text_weights:
            self.load_text_weights(config.text_weights)
        if config.grad_checkpointing:
            self.set_grad_checkpointing(True)

    # -- set-up -------------------------------------------------------------------------------------
    def load_text_weights(self, path: str) -> None:
        """Loads a local BERT checkpoint into the text and fusion layers and, when it has one, the MLM head.
        Only the fusion layers' cross-attention may stay new (and the MLM head of a BertModel checkpoint, which
        has none): any other text-side tensor the checkpoint lacks is an error naming it."""
        state = {k if k.startswith("mlm_head.") else f"text.{k}": v for k, v in load_bert_state(path).items()}
        ours = self.state_dict()
        loaded = {k: v for k, v in state.items() if k in ours}
        for key, value in loaded.items():
            if ours[key].shape != value.shape:
                raise ValueError(
                    f"BERT weights {path}: {key} has shape {tuple(value.shape)}, model {tuple(ours[key].shape)}"
                )
        head = [k for k in ours if k.startswith("mlm_head.")]
        head_loaded = any(k in loaded for k in head)
        required = [k for k in ours if k.startswith("text.") and ".crossattention." not in k]
        missing = [k for k in required + (head if head_loaded else []) if k not in loaded]
        if missing:
            raise ValueError(f"BERT weights {path} lack {len(missing)} tensors the text side needs: {missing[:5]}")
        self.load_state_dict(loaded, strict=False)
        new = sum(1 for k in ours if k.startswith("text.") and ".crossattention." in k)
        log.info(
            "BERT weights %s: %d tensors loaded%s, %d cross-attention tensors start new, %d ignored %s", path,
            len(loaded), "" if head_loaded else " (no MLM head in the checkpoint: it starts new)", new,
            len(set(state) - set(loaded)), sorted(set(state) - set(loaded))[:5],
        )  # fmt: skip

    def _build_concept_distillation(self) -> None:
        """The student's concept head, its attribute head (model.num_attributes > 0) and, with teacher weights, the
        frozen teacher. Its class count fixes the concept head's size, recorded in self.config so an exported model
        rebuilds the head without the teacher."""
        from gritvlp.data.transforms import CLIP_MEAN, CLIP_STD

        config, teacher = self.config, None
        if config.teacher_weights:
            model = build_teacher_model(config.teacher_name, config.teacher_weights, config.teacher_kwargs)
            teacher = ConceptTeacher(model, CLIP_MEAN, CLIP_STD)
            if config.num_concepts and config.num_concepts != teacher.num_classes:
                raise ValueError(
                    f"model.num_concepts is {config.num_concepts} but the teacher {config.teacher_name} predicts "
                    f"{teacher.num_classes} classes"
                )
            self.config = dataclasses.replace(config, num_concepts=teacher.num_classes)
            self._teacher = [teacher]  # a list: never registered, so never trained, checkpointed or exported
        self.concept_head = nn.Linear(self.vision.width, self.config.num_concepts)
        if config.num_attributes:
            self.attribute_head = nn.Linear(self.vision.width, config.num_attributes)

    @property
    def teacher(self) -> ConceptTeacher | None:
        """The frozen concept teacher, or None (distillation off, or its targets precomputed)."""
        return self._teacher[0] if self._teacher else None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vision.set_grad_checkpointing(enable)
        self.text.encoder.grad_checkpointing = enable

    def compile_blocks(self, **options) -> None:
        """torch.compile, in place, every transformer block: the ViT blocks, the text and fusion layers and the
        FLM reconstructor's layers (options go to torch.compile). Per block, as torchtitan does, so the fused loss
        kernels and the host-side batch preparation stay outside the graphs and one compiled block serves every
        layer of its kind; in place, so parameter names, checkpoints and exports are those of the eager model."""
        blocks = [*self.vision.vit.blocks, *self.text.encoder.layer]
        if self.reconstructor is not None:
            blocks += list(self.reconstructor.layer)
        for block in blocks:
            block.compile(**options)

    def temperature(self) -> torch.Tensor:
        """The contrastive temperature as a 0-dim tensor, always within [temp_min, temp_max]."""
        return bounded_temperature(self.temp, self.config.temp_min, self.config.temp_max)[0]

    def zero3_external_parameters(self) -> list[nn.Parameter]:
        """Parameters the objectives use outside their own module's forward (the MLM decoder, tied to the word
        embeddings, and the MLM bias, both passed to the fused LM loss): ZeRO-3 must gather them for the
        module whose forward computes the losses."""
        return [self.mlm_head.decoder_weight, self.mlm_head.bias]

    # -- encoders -----------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor):
        """Returns image tokens [B, 1+P, Wv] and the normalised projected feature [B, E] of the [CLS] token (or of
        the mean token, model.feature_pooling=mean), in the projection's output dtype (bf16 under bf16 autocast)."""
        tokens = self.vision(images)
        pooled = tokens[:, 0] if self.config.feature_pooling == "cls" else tokens.mean(1)
        return tokens, normalize_in_fp32(self.vision_proj(pooled))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, attn_mask=None):
        """Returns text-encoder states [B, L, H] and the normalised projected [CLS] (or mean) feature [B, E]
        (in the projection's output dtype). attn_mask: optional boolean [L, L] or [B, L, L] self-attention mask
        (query x key, True = may attend), combined with the padding mask; e.g. causal for a unidirectional stream."""
        hidden = self.text.encode_text(input_ids, attention_mask, attn_mask)
        return hidden, normalize_in_fp32(self.text_proj(self._pool_text(hidden, attention_mask)))

    def fuse(self, text_hidden: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor, attn_mask=None):
        """Fusion-encoder states [B, L, H] of text-encoder states attending to image tokens (attn_mask: as in
        encode_text; it restricts the self-attention only, never the cross-attention to the image)."""
        return self.text.fuse(text_hidden, attention_mask, image_embeds, attn_mask)

    def layer_states(self, input_ids, attention_mask, image_embeds, attn_mask=None) -> list[torch.Tensor]:
        """[B, L, H] states of every text layer, then every fusion layer, of one pass (attn_mask as in encode_text)."""
        return self.text.all_states(input_ids, attention_mask, image_embeds, attn_mask)

    def reconstruct(self, contexts: list[torch.Tensor], visible: torch.Tensor) -> torch.Tensor:
        """FLM's reconstruction: one query per text position ([MASK] embedding + that position's embedding) through
        the reconstructor. contexts: per reconstructor layer, the [B, K, H] states it reads; visible: [B, L, K]
        bool. Returns [B, L, H], the input of the MLM head."""
        if self.reconstructor is None:
            raise RuntimeError("this model has no reconstructor: build it with objectives.text_objective=flm")
        b, length = visible.shape[:2]
        mask_ids = torch.full((b, length), self.special_tokens["mask"], dtype=torch.long, device=visible.device)
        return self.reconstructor(self.text.embeddings(mask_ids), contexts, visible)

    def concept_logits(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[B, num_concepts] concept logits of the student's head on the image [CLS] token."""
        if self.concept_head is None:
            raise RuntimeError("this model has no concept head: set model.teacher_name")
        return self.concept_head(image_embeds[:, 0])

    def attribute_logits(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[B, num_attributes] attribute logits (one independent yes/no each) on the image [CLS] token."""
        if self.attribute_head is None:
            raise RuntimeError("this model has no attribute head: set model.num_attributes")
        return self.attribute_head(image_embeds[:, 0])

    def itm_logits(self, image_embeds, text_hidden, attention_mask) -> torch.Tensor:
        """[B, 2] image-text matching logits (index 1: match) of the fused [CLS] state (or the mean fused state,
        model.feature_pooling=mean)."""
        fused = self.fuse(text_hidden, attention_mask, image_embeds)
        return self.itm_head(self._pool_text(fused, attention_mask))

    def _pool_text(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.config.feature_pooling == "cls":
            return hidden[:, 0]
        weights = attention_mask.to(hidden.dtype)[..., None]  # the mean over the caption's tokens
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)

    # -- saving and loading ------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {
            "model": dataclasses.asdict(self.config),
            "special_tokens": self.special_tokens,
            "bert_config": self.text.config.to_dict(),
        }

    @classmethod
    def from_config_dict(cls, data: dict) -> GritVLP:
        """The model of a config_dict() (an export's config.json), randomly initialised: the weights come from the
        checkpoint, so the initialisation files and tokenizer path of the training machine are not used."""
        from gritvlp.config import build_dataclass

        model = {**data["model"], "vision_weights": None, "text_weights": None, "teacher_weights": None,
                 "tokenizer": None}  # fmt: skip
        if "bert_config" in data:
            model["text_config"] = _plain_bert_kwargs(data["bert_config"])
        return cls(build_dataclass(ModelConfig, model, "model."), special_tokens=data.get("special_tokens"))

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> GritVLP:
        """Loads a folder written by gritvlp.export (config.json + model.safetensors)."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} has no config.json: is it a folder written by export_fp16?")
        data = json.loads((folder / "config.json").read_text())
        model = cls.from_config_dict(data)
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}")
        model.load_state_dict(load_file(str(weights)), strict=True)
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
