"""Retrieval fine-tuning objective (ALBEF / GRIT-VLP): ITC + ITM, with the captions of one image as positives.

Samples sharing a group id (one image) are positives of each other in both contrastive directions and are never
chosen as ITM negatives: the contrastive kernel receives the group ids and picks the negatives itself (ALBEF samples
them from the in-batch similarities, GRIT takes the hardest). Each positive is scored against the negatives only
(see gritvlp.kernels.spec), so a second caption of the same image neither helps nor hurts another's term.
No MLM: the model's MLM head is unused here.
"""

from __future__ import annotations

import torch.nn as nn

from gritvlp.config import ObjectivesConfig
from gritvlp.model.gritvlp import GritVLP

from .itc import contrastive_terms, ita
from .itm import itm_loss, itm_pairs

# What forward returns besides the negatives: the logged terms and metrics
TERMS = ("loss", "itc", "itm", "itm_acc", "temp")


def retrieval_objectives(
    itm_negatives: str = "sample", consistency_weight: float = 0.0, gather_features: bool = False
) -> ObjectivesConfig:
    """The objective weights of fine-tuning: ITC (+ optional GRIT consistency) and ITM, no MLM. ALBEF fine-tunes
    with sampled ITM negatives and no consistency term."""
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


def freeze_mlm_head(model: GritVLP) -> None:
    """Fine-tuning never uses the MLM head's own weights (its decoder is the word embeddings, which stay trained):
    frozen, they get no optimizer state and keep their pre-trained values in the export."""
    for param in model.mlm_head.parameters():
        param.requires_grad_(False)
