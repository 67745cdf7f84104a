"""GRIT-VLP's pre-training objective, composed: ITA (contrastive + consistency) + ITM on hard negatives + a text
objective (MLM, or FLM: objectives.text_objective) + concept distillation when the model has a concept head
(objects, and attributes when it has an attribute head).

False negatives are handled as MAFA does: samples with identical captions are positives of each other
(objectives.caption_positives), a frozen filter model re-judges the chosen ITM negatives (connection mining,
objectives.mining_filter) and the ITC targets can be smoothed (objectives.itc_smoothing).

PretrainingObjective wraps the model; its forward computes every loss of a batch, so DeepSpeed (which wraps this
module) sees every parameter used inside the engine's forward, ZeRO-3 included: the parameters the losses use
outside their own module's forward (the tied MLM decoder) are registered on this module by
register_zero3_external_parameters().
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
from torch.profiler import record_function

from gritvlp.config import ObjectivesConfig
from gritvlp.model.gritvlp import GritVLP

from .distill import ATTRIBUTE_KEYS, CONCEPT_KEYS, attribute_loss, distill_loss, precomputed_targets, teacher_targets
from .false_negatives import duplicate_pairs, false_negative_stats
from .flm import FLM_KEYS, FLM_TERMS, flm_losses, prepare_flm
from .itc import consistency, contrastive_terms, ita
from .itm import itm_loss, itm_pairs
from .mining import ConnectionMiner, MinedNegatives, load_filter_model
from .mlm import MLM_KEYS, masked_lm_loss, pair_tokens, prepare_mlm
from .stats import similarity_stats

log = logging.getLogger("gritvlp.objectives")
# The false-negative statistics (gritvlp.objectives.false_negatives; the last two only while mining)
FALSE_NEGATIVE_TERMS = ("false_negative_share", "itm_false_negative_share", "converted_negatives",
                        "replaced_negatives")  # fmt: skip
# Concept distillation: the term in the total (objects + weighted attributes) and its two parts
DISTILL_TERMS = ("distill", "distill_objects", "distill_attributes")
# What forward returns besides the features: the logged terms and metrics (each only when its objective runs)
TERMS = ("loss", "itc", "consistency", "itm", "mlm", *FLM_TERMS, *DISTILL_TERMS, "itm_acc", "temp", "sim_pos",
         "sim_neg", "sim_itm_neg", *FALSE_NEGATIVE_TERMS)  # fmt: skip


class PretrainingObjective(nn.Module):
    def __init__(self, model: GritVLP, config: ObjectivesConfig, miner: ConnectionMiner | None = None):
        """miner: connection mining with a filter model already loaded; None loads objectives.mining_filter when
        it is set."""
        super().__init__()
        self.model = model
        self.config = config
        self.text_scale = 1.0  # of the text objective's weight; see set_step
        self.smoothing = config.itc_smoothing if config.itc_smoothing_start_epoch == 0 else 0.0  # see set_step
        if miner is None and config.mining_filter:
            filter_model = load_filter_model(config.mining_filter, model.config.image_size)
            miner = ConnectionMiner(filter_model, config.mining_low, config.mining_high, model.config.text_format)
        self.miner = miner
        if miner is not None:
            self._check_filter(miner.filter)

    def _check_filter(self, filter_model) -> None:
        ours, theirs = self.model.text.config.vocab_size, filter_model.text.config.vocab_size
        if ours != theirs:
            raise ValueError(f"the mining filter model has a vocabulary of {theirs} tokens, the model {ours}: the "
                             "filter must read the same token ids")  # fmt: skip
        if self.config.text_objective == "flm":
            log.warning("connection mining with FLM: mined pairs join ITM and the ITC targets, not the FLM batch")

    def set_step(self, global_step: int, epoch: int = 0) -> None:
        """The text objective (MLM / FLM) switches on at objectives.text_start_step and ramps up linearly over
        objectives.text_ramp_steps: its large early gradients, clipped together with ITC's, would otherwise hold
        back the contrastive alignment of a model trained from scratch. Still computed while off (weight 0), so
        every parameter gets a gradient at every step. ITC's smoothing starts at objectives.itc_smoothing_start_epoch
        (MAFA: epoch 1, with the first grouped batches)."""
        start, ramp = self.config.text_start_step, self.config.text_ramp_steps
        self.text_scale = min(1.0, max(0.0, (global_step - start + 1) / ramp)) if ramp else float(global_step >= start)
        self.smoothing = self.config.itc_smoothing if epoch >= self.config.itc_smoothing_start_epoch else 0.0

    def register_zero3_external_parameters(self) -> None:
        import deepspeed

        for param in self.model.zero3_external_parameters():
            deepspeed.zero.register_external_parameter(self, param)

    @property
    def runs_mlm(self) -> bool:
        return self.config.text_objective == "mlm" and self.config.mlm_weight > 0

    @property
    def runs_flm(self) -> bool:
        return self.config.text_objective == "flm" and self.config.flm_weight > 0

    def prepare_batch(self, host_batch: dict, generator: torch.Generator | None = None) -> dict:
        """The host batch plus the inputs of its text objective, drawn on the CPU (see
        gritvlp.objectives.mlm.prepare_mlm and gritvlp.objectives.flm.prepare_flm)."""
        if self.runs_flm:
            flm = prepare_flm(host_batch["input_ids"], host_batch["attention_mask"],
                              corruption_rate=self.config.flm_corruption_rate, generator=generator)  # fmt: skip
            return {**host_batch, **flm}
        if not self.runs_mlm:
            return host_batch
        tokens = self.model.special_tokens
        mlm = prepare_mlm(
            host_batch["input_ids"], vocab_size=self.model.text.config.vocab_size, mask_token_id=tokens["mask"],
            pad_token_id=tokens["pad"], cls_token_id=tokens["cls"], mask_prob=self.config.mask_prob,
            generator=generator,
        )  # fmt: skip
        return {**host_batch, **mlm}

    def forward(self, batch: dict) -> dict:
        """Losses of one batch (keys: image, input_ids, attention_mask, group_id, the MLM or FLM inputs of
        prepare_batch, and optionally precomputed concept targets concept_ids / concept_probs and attribute targets
        attribute_targets / attribute_mask, which a model with an attribute head needs). Returns 'loss' (the
        weighted total), each term, metrics and the detached features for the GRIT bank. Without the MLM or FLM
        inputs they are drawn here, after copying input_ids to the host: the slow path (on CUDA the copy waits for
        the device), for direct use. Each part runs in a profiler range (gritvlp.vision, .text, .itc (with .mining),
        .itm, .mlm, .flm, .distill), which scripts/bench_step.py reads for its breakdown. With caption_id [B] in the
        batch, identical captions are positives (objectives.caption_positives) and counted as false negatives."""
        cfg, model = self.config, self.model
        with record_function("gritvlp.vision"):
            image_embeds, image_feat = model.encode_image(batch["image"])
        with record_function("gritvlp.text"):
            text_hidden, text_feat = model.encode_text(batch["input_ids"], batch["attention_mask"])
        with record_function("gritvlp.itc"):
            terms, mined, negatives, out = self._contrastive(batch, image_feat, text_feat)
            total = cfg.itc_weight * ita(terms, cfg.consistency_weight, self.smoothing)
        if cfg.itm_weight > 0:
            with record_function("gritvlp.itm"):
                pairs = itm_pairs(image_embeds, text_hidden, batch["attention_mask"], negatives[0], negatives[1],
                                  None if mined is None else mined.converted)  # fmt: skip
                logits = model.itm_logits(pairs.images, pairs.texts, pairs.attention_mask)
                out["itm"], out["itm_acc"] = itm_loss(logits, pairs.labels, pairs.weights)
                total = total + cfg.itm_weight * out["itm"]
        if self.runs_mlm:
            with record_function("gritvlp.mlm"):
                out["mlm"] = self._mlm(batch, image_embeds, mined)
                total = total + self.text_scale * cfg.mlm_weight * out["mlm"]
        if self.runs_flm:
            with record_function("gritvlp.flm"):
                flm_terms = flm_losses(model, self._with_inputs(batch, FLM_KEYS), image_embeds,
                                       cfg.lm_weight_grad_accumulation)  # fmt: skip
                out.update({k: v if k == "flm" else v.detach() for k, v in flm_terms.items()})
                total = total + self.text_scale * cfg.flm_weight * out["flm"]
        if model.concept_head is not None:
            with record_function("gritvlp.distill"):
                out.update(self._distill(batch, image_embeds))
                total = total + cfg.distill_weight * out["distill"]
        out["loss"] = total
        return out

    def _with_inputs(self, batch: dict, keys: tuple[str, ...]) -> dict:
        """The batch with its host-drawn objective inputs; drawn now when missing (the slow path)."""
        if all(key in batch for key in keys):
            return batch
        device = batch["input_ids"].device
        return {**batch, **{k: v.to(device) for k, v in self.prepare_batch(batch).items() if k in keys}}

    def _distill(self, batch: dict, image_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """Concept distillation: "distill" (objects + distill_attribute_weight x attributes, in the graph) and its
        parts (detached). Object targets come from the batch when it carries them (the teacher is then not run),
        else from the teacher on this batch's images; attribute targets always come from the batch."""
        objects = self._distill_objects(batch, image_embeds)
        if self.model.attribute_head is None:
            return {"distill": objects, "distill_objects": objects.detach()}
        if not all(key in batch for key in ATTRIBUTE_KEYS):
            raise ValueError("model.num_attributes > 0 needs attribute_targets / attribute_mask in every batch "
                             "(Collator(..., num_attributes=model.num_attributes) makes them)")  # fmt: skip
        attributes = attribute_loss(self.model.attribute_logits(image_embeds), batch["attribute_targets"],
                                    batch["attribute_mask"])  # fmt: skip
        total = objects + self.config.distill_attribute_weight * attributes
        return {"distill": total, "distill_objects": objects.detach(), "distill_attributes": attributes.detach()}

    def _distill_objects(self, batch: dict, image_embeds: torch.Tensor) -> torch.Tensor:
        model, temperature = self.model, self.config.distill_temperature
        if all(key in batch for key in CONCEPT_KEYS):
            targets, weights = precomputed_targets(
                batch["concept_ids"], batch["concept_probs"], model.config.num_concepts, temperature
            )
        elif model.teacher is not None:
            images = batch["image"]
            teacher = model.teacher.to(device=images.device)  # held outside the module tree: moved on first use
            targets, weights = teacher_targets(teacher, images, temperature)
        else:
            raise ValueError("distillation without teacher weights needs precomputed concept targets in every batch")
        return distill_loss(model.concept_logits(image_embeds), targets, weights, temperature)

    def _contrastive(self, batch: dict, image_feat: torch.Tensor, text_feat: torch.Tensor):
        """The ITC terms, mining's verdicts (None when off), the ITM negatives [2, B] (the kernel's, or mining's)
        and the logged values of the contrastive part."""
        cfg = self.config
        group_ids, caption_ids = _group_ids(batch), batch.get("caption_id")
        positive_captions = caption_ids if cfg.caption_positives else None
        temp = self.model.temperature()
        mined = self._mine(batch, image_feat, text_feat, temp, group_ids, positive_captions)
        terms = contrastive_terms(
            image_feat, text_feat, temp, group_ids, cfg, caption_ids=positive_captions,
            extra_positives=None if mined is None else mined.extra_positives, pick_negatives=mined is None,
        )  # fmt: skip
        if mined is None:
            negatives, converted = torch.stack([terms.neg_text_for_image, terms.neg_image_for_text]), None
        else:
            negatives, converted = mined.negatives, mined.converted
        out = {
            "itc": (terms.loss_i2t + terms.loss_t2i) / 2,
            "consistency": consistency(terms).detach(),
            "temp": temp.detach(),
            "image_feat": image_feat.detach(),
            "text_feat": text_feat.detach(),
            **similarity_stats(image_feat.detach(), text_feat.detach(), negatives[0]),
            **false_negative_stats(duplicate_pairs(group_ids, caption_ids), *negatives, converted),
        }
        if mined is not None:
            out["converted_negatives"] = mined.converted.sum().float()
            out["replaced_negatives"] = mined.replaced.sum().float()
        return terms, mined, negatives, out

    @torch.no_grad()
    def converted_pairs(self, batch: dict) -> list[tuple[int, int]]:
        """The (image row, text row) pairs of a batch that connection mining turns into positives, with the model
        as it is now, in eval mode (for the grouping picture); [] when mining is off."""
        if self.miner is None:
            return []
        model, was_training = self.model, self.model.training
        model.eval()
        try:
            _, image_feat = model.encode_image(batch["image"])
            _, text_feat = model.encode_text(batch["input_ids"], batch["attention_mask"])
            caption_ids = batch.get("caption_id") if self.config.caption_positives else None
            mined = self._mine(batch, image_feat, text_feat, model.temperature(), _group_ids(batch), caption_ids)
        finally:
            model.train(was_training)
        image_rows, text_rows = mined.converted_pairs()
        return list(zip(image_rows.tolist(), text_rows.tolist()))

    def _mine(self, batch, image_feat, text_feat, temp, group_ids, caption_ids) -> MinedNegatives | None:
        """Connection mining of this batch's ITM negatives (None when off). The local positives (same image, and
        same caption when those are positives) are never candidates."""
        if self.miner is None:
            return None
        with record_function("gritvlp.mining"):
            positives = duplicate_pairs(group_ids, caption_ids).fill_diagonal_(True)
            return self.miner(batch, image_feat.detach(), text_feat.detach(), temp.detach(), positives,
                              self.config.itm_negatives)  # fmt: skip

    def _mlm(self, batch: dict, image_embeds: torch.Tensor, mined: MinedNegatives | None = None) -> torch.Tensor:
        """MLM of the batch's pairs, and of the pairs mining turned into positives (MAFA: each such text, with its
        own masking, fused with its new image), in one mean over the masked tokens."""
        batch = self._with_inputs(batch, MLM_KEYS)
        mask = batch["attention_mask"]
        masked = self.model.text.encode_text(batch["mlm_input_ids"], mask)
        fused = self.model.fuse(masked, mask, image_embeds)
        extra = None
        if mined is not None:
            image_rows, text_rows = mined.converted_pairs()
            if text_rows.numel():
                pair_fused = self.model.fuse(masked[text_rows], mask[text_rows], image_embeds[image_rows])
                extra = pair_tokens(pair_fused, text_rows, batch["mlm_positions"], batch["mlm_targets"], len(masked))
        return masked_lm_loss(self.model.mlm_head, fused, batch["mlm_positions"], batch["mlm_targets"], extra,
                              self.config.lm_weight_grad_accumulation)  # fmt: skip


def _group_ids(batch: dict) -> torch.Tensor:
    """Samples of one group (one image) are each other's positives; by default every sample is its own group."""
    group_ids = batch.get("group_id")
    if group_ids is None:
        group_ids = torch.arange(batch["image"].shape[0], device=batch["image"].device)
    return group_ids
