"""Retrieval fine-tuning objectives: ITC + ITM, with the captions of one image as positives. No MLM.

RetrievalObjective (recipe in-batch): ITC over the local batch. Samples sharing a group id (one image) are positives
of each other in both contrastive directions and are never chosen as ITM negatives: the contrastive kernel receives
the group ids and picks the negatives itself. Each positive is scored against the negatives only (see
gritvlp.kernels.spec), so a second caption of the same image neither helps nor hurts another's term.

QueueRetrievalObjective (recipes albef and grit, ALBEF's and GRIT-VLP's models/model_retrieval.py): ITC of the
online features against the momentum features of the batch and of a queue (gritvlp.objectives.momentum), with soft
targets: a row's target is uniform over every column that shares its image id, batch and queue alike, and with
distillation (alpha > 0) alpha x the momentum model's softmax + (1 - alpha) x that. The ITM negatives are drawn
from the in-batch similarities with the same image masked out.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from gritvlp.config import ObjectivesConfig
from gritvlp.model.gritvlp import GritVLP

from .itc import contrastive_terms, ita
from .itm import itm_loss, itm_pairs

# What forward returns besides the negatives: the logged terms and metrics
TERMS = ("loss", "itc", "itm", "itm_acc", "temp")


def retrieval_objectives(
    itm_negatives: str = "sample", consistency_weight: float = 0.0, gather_features: bool = False
) -> ObjectivesConfig:
    """The objective weights of the in-batch recipe: ITC (+ optional GRIT consistency) and ITM, no MLM. ALBEF and
    GRIT-VLP both fine-tune with sampled ITM negatives and no consistency term."""
    return ObjectivesConfig(
        consistency_weight=consistency_weight, gather_features=gather_features, itm_negatives=itm_negatives,
        mlm_weight=0.0,
    )  # fmt: skip


class RetrievalObjective(nn.Module):
    def __init__(self, model: GritVLP, config: ObjectivesConfig | None = None):
        super().__init__()
        self.model = model
        self.config = config or retrieval_objectives()

    def forward(self, batch: dict) -> dict:
        """Losses of one batch (keys: image, input_ids, attention_mask, group_id). Returns 'loss', the terms of
        TERMS and the chosen ITM negatives (neg_text_for_image, neg_image_for_text: local indices, -1 for none)."""
        cfg, model = self.config, self.model
        image_embeds, image_feat = model.encode_image(batch["image"])
        text_hidden, text_feat = model.encode_text(batch["input_ids"], batch["attention_mask"])
        temp = model.temperature()
        terms = contrastive_terms(image_feat, text_feat, temp, batch["group_id"], cfg)
        itc = ita(terms, cfg.consistency_weight)
        pairs = itm_pairs(image_embeds, text_hidden, batch["attention_mask"], terms.neg_text_for_image,
                          terms.neg_image_for_text)  # fmt: skip
        logits = model.itm_logits(pairs.images, pairs.texts, pairs.attention_mask)
        itm, itm_acc = itm_loss(logits, pairs.labels, pairs.weights)
        return {
            "loss": cfg.itc_weight * itc + cfg.itm_weight * itm,
            "itc": itc.detach(),
            "itm": itm.detach(),
            "itm_acc": itm_acc.detach(),
            "temp": temp.detach(),
            "neg_text_for_image": terms.neg_text_for_image,
            "neg_image_for_text": terms.neg_image_for_text,
        }


class MomentumInputs(NamedTuple):
    """What the momentum branch brings to a step: its features of the batch, the queue before this step's enqueue,
    and the distillation weight of the step (0: none)."""

    image_feat: torch.Tensor  # [B, E]
    text_feat: torch.Tensor  # [B, E]
    queue_image: torch.Tensor  # [Q, E]
    queue_text: torch.Tensor  # [Q, E]
    queue_ids: torch.Tensor  # [Q]
    alpha: float = 0.0


def soft_targets(ids: torch.Tensor, ids_all: torch.Tensor) -> torch.Tensor:
    """[B, N] targets: row i uniform over the columns whose id is ids[i] (its own column always among them)."""
    positive = (ids[:, None] == ids_all[None, :]).float()
    return positive / positive.sum(1, keepdim=True)


def queue_itc(
    image_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor, ids: torch.Tensor, momentum: MomentumInputs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ALBEF's retrieval ITC: (loss, sim_i2t [B, B+Q], sim_t2i [B, B+Q]); the first B columns are the batch's
    momentum features, the rest the queue's. Only the online features receive gradients."""
    image_all = torch.cat([momentum.image_feat, momentum.queue_image]).detach().float()
    text_all = torch.cat([momentum.text_feat, momentum.queue_text]).detach().float()
    targets = soft_targets(ids, torch.cat([ids, momentum.queue_ids]))
    sim_i2t = image_feat.float() @ text_all.T / temp
    sim_t2i = text_feat.float() @ image_all.T / temp
    targets_i2t = targets_t2i = targets
    if momentum.alpha > 0:
        with torch.no_grad():
            temp_m = temp.detach()
            targets_i2t = momentum.alpha * F.softmax(image_all[: len(ids)] @ text_all.T / temp_m, dim=1)
            targets_t2i = momentum.alpha * F.softmax(text_all[: len(ids)] @ image_all.T / temp_m, dim=1)
            targets_i2t = targets_i2t + (1 - momentum.alpha) * targets
            targets_t2i = targets_t2i + (1 - momentum.alpha) * targets
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets_i2t).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * targets_t2i).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i


@torch.no_grad()
def in_batch_negatives(sim: torch.Tensor, ids: torch.Tensor, mode: str = "sample") -> torch.Tensor:
    """One ITM negative per row of sim [B, B] (scaled similarities): drawn from softmax(sim) over the columns of
    another image ("sample", ALBEF's multinomial, here by the Gumbel-max trick, which never meets a row of zeros) or
    the most similar of them ("hardest"). -1 where every column shows the row's own image."""
    other = ids[:, None] != ids[None, :]
    logits = sim.float().masked_fill(~other, float("-inf"))
    if mode == "sample":
        uniform = torch.rand(logits.shape, device=logits.device).clamp_(min=torch.finfo(torch.float32).tiny)
        logits = logits - torch.log(-torch.log(uniform))
    return torch.where(other.any(1), logits.argmax(1), -1)


class QueueRetrievalObjective(nn.Module):
    """ITC against the momentum features of the batch and the queue, ITM on sampled in-batch negatives."""

    def __init__(self, model: GritVLP, itm_negatives: str = "sample"):
        super().__init__()
        self.model = model
        self.itm_negatives = itm_negatives

    def forward(self, batch: dict, momentum: MomentumInputs) -> dict:
        """Losses of one batch (keys: image, input_ids, attention_mask, group_id): the keys of TERMS and the chosen
        ITM negatives (local indices, -1 for none)."""
        model, ids = self.model, batch["group_id"]
        image_embeds, image_feat = model.encode_image(batch["image"])
        text_hidden, text_feat = model.encode_text(batch["input_ids"], batch["attention_mask"])
        temp = model.temperature()
        itc, sim_i2t, sim_t2i = queue_itc(image_feat, text_feat, temp, ids, momentum)
        b = ids.shape[0]
        neg_text_for_image = in_batch_negatives(sim_i2t[:, :b], ids, self.itm_negatives)
        neg_image_for_text = in_batch_negatives(sim_t2i[:, :b], ids, self.itm_negatives)
        pairs = itm_pairs(image_embeds, text_hidden, batch["attention_mask"], neg_text_for_image, neg_image_for_text)
        logits = model.itm_logits(pairs.images, pairs.texts, pairs.attention_mask)
        itm, itm_acc = itm_loss(logits, pairs.labels, pairs.weights)
        return {
            "loss": itc + itm,
            "itc": itc.detach(),
            "itm": itm.detach(),
            "itm_acc": itm_acc.detach(),
            "temp": temp.detach(),
            "neg_text_for_image": neg_text_for_image,
            "neg_image_for_text": neg_image_for_text,
        }


def freeze_mlm_head(model: GritVLP) -> None:
    """Fine-tuning never uses the MLM head's own weights (its decoder is the word embeddings, which stay trained):
    frozen, they get no optimizer state and keep their pre-trained values in the export."""
    for param in model.mlm_head.parameters():
        param.requires_grad_(False)
