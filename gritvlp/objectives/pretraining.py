"""GRIT-VLP's pre-training objective, composed: ITA (contrastive + consistency) + ITM on hard negatives + MLM.

PretrainingObjective wraps the model; its forward computes every loss of a batch, so DeepSpeed (which wraps this
module) sees every parameter used inside the engine's forward, ZeRO-3 included: the parameters the losses use
outside their own module's forward (the tied MLM decoder) are registered on this module by
register_zero3_external_parameters().
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.profiler import record_function

from gritvlp.config import ObjectivesConfig
from gritvlp.model.gritvlp import GritVLP

from .itc import consistency, contrastive_terms, ita
from .itm import itm_loss, itm_pairs
from .mlm import MLM_KEYS, masked_lm_loss, prepare_mlm
from .stats import similarity_stats

# What forward returns besides the features: the logged terms and metrics
TERMS = ("loss", "itc", "consistency", "itm", "mlm", "itm_acc", "temp", "sim_pos", "sim_neg", "sim_itm_neg")


class PretrainingObjective(nn.Module):
    def __init__(self, model: GritVLP, config: ObjectivesConfig):
        super().__init__()
        self.model = model
        self.config = config

    def register_zero3_external_parameters(self) -> None:
        import deepspeed

        for param in self.model.zero3_external_parameters():
            deepspeed.zero.register_external_parameter(self, param)

    def prepare_batch(self, host_batch: dict, generator: torch.Generator | None = None) -> dict:
        """The host batch plus its MLM inputs, drawn on the CPU (see gritvlp.objectives.mlm.prepare_mlm)."""
        if self.config.mlm_weight <= 0:
            return host_batch
        tokens = self.model.special_tokens
        mlm = prepare_mlm(
            host_batch["input_ids"], vocab_size=self.model.text.config.vocab_size, mask_token_id=tokens["mask"],
            pad_token_id=tokens["pad"], cls_token_id=tokens["cls"], mask_prob=self.config.mask_prob,
            generator=generator,
        )  # fmt: skip
        return {**host_batch, **mlm}

    def forward(self, batch: dict) -> dict:
        """Losses of one batch (keys: image, input_ids, attention_mask, group_id, and the MLM inputs of
        prepare_batch). Returns 'loss' (the weighted total), each term, metrics and the detached features for the
        GRIT bank. Without the MLM inputs they are drawn here, after copying input_ids to the host: the slow path
        (on CUDA the copy waits for the device), for direct use. Each part runs in a profiler range
        (gritvlp.vision, .text, .itc, .itm, .mlm), which scripts/bench_step.py reads for its breakdown."""
        cfg, model = self.config, self.model
        with record_function("gritvlp.vision"):
            image_embeds, image_feat = model.encode_image(batch["image"])
        with record_function("gritvlp.text"):
            text_hidden, text_feat = model.encode_text(batch["input_ids"], batch["attention_mask"])
        with record_function("gritvlp.itc"):
            temp = model.temperature()
            terms = contrastive_terms(image_feat, text_feat, temp, _group_ids(batch), cfg)
            out = {
                "itc": (terms.loss_i2t + terms.loss_t2i) / 2,
                "consistency": consistency(terms).detach(),
                "temp": temp.detach(),
                "image_feat": image_feat.detach(),
                "text_feat": text_feat.detach(),
                **similarity_stats(image_feat.detach(), text_feat.detach(), terms.neg_text_for_image),
            }
            total = cfg.itc_weight * ita(terms, cfg.consistency_weight)
        if cfg.itm_weight > 0:
            with record_function("gritvlp.itm"):
                pairs = itm_pairs(image_embeds, text_hidden, batch["attention_mask"], terms.neg_text_for_image,
                                  terms.neg_image_for_text)  # fmt: skip
                logits = model.itm_logits(pairs.images, pairs.texts, pairs.attention_mask)
                out["itm"], out["itm_acc"] = itm_loss(logits, pairs.labels, pairs.weights)
                total = total + cfg.itm_weight * out["itm"]
        if cfg.mlm_weight > 0:
            with record_function("gritvlp.mlm"):
                out["mlm"] = self._mlm(batch, image_embeds)
                total = total + cfg.mlm_weight * out["mlm"]
        out["loss"] = total
        return out

    def _mlm(self, batch: dict, image_embeds: torch.Tensor) -> torch.Tensor:
        if not all(key in batch for key in MLM_KEYS):  # the slow path: masks drawn now, on the host
            device = batch["input_ids"].device
            batch = {**batch, **{k: v.to(device) for k, v in self.prepare_batch(batch).items() if k in MLM_KEYS}}
        masked = self.model.text.encode_text(batch["mlm_input_ids"], batch["attention_mask"])
        fused = self.model.fuse(masked, batch["attention_mask"], image_embeds)
        return masked_lm_loss(self.model.mlm_head, fused, batch["mlm_positions"], batch["mlm_targets"])


def _group_ids(batch: dict) -> torch.Tensor:
    """Samples of one group (one image) are each other's positives; by default every sample is its own group."""
    group_ids = batch.get("group_id")
    if group_ids is None:
        group_ids = torch.arange(batch["image"].shape[0], device=batch["image"].device)
    return group_ids
