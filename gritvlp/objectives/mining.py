"""MAFA's efficient connection mining (ECM; Byun, Kim and Moon, CVPR 2024, github jaeseokbyun/MAFA).

GRIT's hardest in-batch negative is often no negative at all: a caption that fits the anchor's image too. A
frozen, already pre-trained filter model re-judges each chosen ITM negative pair with its ITM head:

    match probability > high (0.8 in MAFA's code)   the pair becomes a positive: an ITM positive, an extra MLM
                                                    pair, and a positive of its row in the ITC targets
    low (0.5) < probability <= high                  the negative is replaced by the next-hardest one
    probability <= low                               kept as a negative

Both directions are mined, as in MAFA: each image's chosen text, and each text's chosen image. The candidates
are picked here (the hardest two by similarity, or two drawn without replacement from softmax(s) by the Gumbel
top-k trick for sampled negatives), so the ITC kernel then runs once, with the mined positives among its targets.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("gritvlp.objectives")
ALBEF_SUFFIXES = (".pth", ".pt", ".bin")


@dataclass
class MinedNegatives:
    """Per direction d (0: each local image's text, 1: each local text's image), local batch indices."""

    negatives: torch.Tensor  # [2, B] the ITM pair's other side after mining (-1: none)
    converted: torch.Tensor  # [2, B] bool: that pair is a positive (labelled 1 in ITM)
    replaced: torch.Tensor  # [2, B] bool: the chosen pair was replaced by the next-hardest one
    extra_positives: torch.Tensor  # [2, B] the converted pair's other side, -1 elsewhere (the ITC targets)

    def converted_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(image rows, text rows) of the converted pairs. Compacting them waits for the device (a host sync)."""
        rows = torch.arange(self.negatives.shape[1], device=self.negatives.device)
        image_rows = torch.cat([rows, self.extra_positives[1].clamp(min=0)])
        text_rows = torch.cat([self.extra_positives[0].clamp(min=0), rows])
        keep = self.converted.flatten().nonzero().squeeze(1)
        return image_rows[keep], text_rows[keep]


def top2_negatives(
    image_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor, positives: torch.Tensor, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and second ITM negative of every local row, [2, B] each (-1: none left): the two most similar
    non-positives ("hardest"), or two drawn from softmax(s) without replacement ("sample": Gumbel top-2).
    positives: [B, B] bool, symmetric."""
    s = (image_feat.float() @ text_feat.float().T) / temp.float()
    first, second = [], []
    for sim in (s, s.T):  # i2t: image rows over texts; t2i: text rows over images
        key = sim
        if mode == "sample":
            key = key - torch.log(-torch.log(torch.rand_like(key).clamp(min=1e-20)))
        key = key.masked_fill(positives, float("-inf"))
        values, index = key.topk(min(2, key.shape[1]), dim=1)
        index = torch.where(torch.isfinite(values), index, torch.full_like(index, -1))
        first.append(index[:, 0])
        second.append(index[:, 1] if index.shape[1] > 1 else torch.full_like(index[:, 0], -1))
    return torch.stack(first), torch.stack(second)


def without_last_token(attention_mask: torch.Tensor) -> torch.Tensor:
    """The [B, L] mask with each caption's last token (the [SEP] of a cls_sep caption) masked out: every other
    position then reads what it would without that token."""
    last = attention_mask.sum(1, keepdim=True) - 1
    return attention_mask.scatter(1, last, 0)


class ConnectionMiner:
    """Holds the frozen filter model outside the trained module tree (never trained, checkpointed or exported).

    batch_format: the text format of the batches it judges (the trained model's model.text_format); None: the
    filter's own. A filter imported from ALBEF / GRIT-VLP reads captions without [SEP] (cls_only): in cls_sep
    batches each caption's [SEP] is then hidden from it by the attention mask."""

    def __init__(self, filter_model, low: float = 0.5, high: float = 0.8, batch_format: str | None = None):
        if not 0 <= low <= high <= 1:
            raise ValueError(f"mining thresholds need 0 <= low <= high <= 1, got {low} and {high}")
        filter_format = filter_model.config.text_format
        self.hide_sep = batch_format not in (None, filter_format)
        if self.hide_sep and filter_format != "cls_only":
            raise ValueError(f"the mining filter model reads captions as {filter_format}, which batches of "
                             f"{batch_format} cannot give it: use a filter of the model's text format")  # fmt: skip
        filter_model.requires_grad_(False).eval()
        self._filter = [filter_model]
        self.low, self.high = low, high

    @property
    def filter(self):
        return self._filter[0]

    @torch.no_grad()
    def match_probability(self, images, input_ids, attention_mask, image_rows, text_rows) -> torch.Tensor:
        """The filter's ITM match probability of the pairs (images[image_rows[k]], texts[text_rows[k]])."""
        model = self.filter
        if next(model.parameters()).device != images.device or next(model.parameters()).dtype != images.dtype:
            model.to(device=images.device, dtype=images.dtype)  # on first use, in the batch's precision
        size = model.config.image_size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)
        if self.hide_sep:
            attention_mask = without_last_token(attention_mask)
        image_tokens, _ = model.encode_image(images)
        text_hidden, _ = model.encode_text(input_ids, attention_mask)
        logits = model.itm_logits(image_tokens[image_rows], text_hidden[text_rows], attention_mask[text_rows])
        return logits.float().softmax(dim=-1)[:, 1]

    @torch.no_grad()
    def __call__(self, batch: dict, image_feat, text_feat, temp, positives: torch.Tensor, mode: str) -> MinedNegatives:
        first, second = top2_negatives(image_feat, text_feat, temp, positives, mode)
        b = first.shape[1]
        rows = torch.arange(b, device=first.device)
        image_rows = torch.cat([rows, first[1].clamp(min=0)])  # (image i, its text) then (text i's image, text i)
        text_rows = torch.cat([first[0].clamp(min=0), rows])
        probability = self.match_probability(batch["image"], batch["input_ids"], batch["attention_mask"],
                                             image_rows, text_rows).view(2, b)  # fmt: skip
        chosen = first >= 0
        converted = chosen & (probability > self.high)
        replaced = chosen & (probability > self.low) & ~converted
        return MinedNegatives(
            negatives=torch.where(replaced, second, first),
            converted=converted,
            replaced=replaced,
            extra_positives=torch.where(converted, first, torch.full_like(first, -1)),
        )


def load_filter_model(path: str | Path, image_size: int, albef_preset: str = "vitb16_bert"):
    """The filter model: a gritvlp export folder or training checkpoint, or an ALBEF / GRIT-VLP .pth (read into the
    model of `albef_preset`, by default the paper-size one, at `image_size`, as scripts/convert_albef.py does; its
    MLM head may be missing, as in ALBEF's fine-tuned checkpoints). Frozen, in eval mode."""
    from gritvlp.model.gritvlp import GritVLP

    path = Path(path)
    if path.is_file() and path.suffix in ALBEF_SUFFIXES:
        from gritvlp import albef
        from gritvlp.config import load_config

        model_cfg = dataclasses.replace(load_config(albef_preset).model, image_size=image_size, vision_weights=None,
                                        text_weights=None, text_format=albef.TEXT_FORMAT)  # fmt: skip
        model = GritVLP(model_cfg)
        albef.load_albef_weights(model, path, allow_missing=("mlm_head.",))
    else:
        from gritvlp.eval.loading import load_model

        model = load_model(path)
    log.info("connection mining: filter model %s (%.1f M parameters, frozen)", path,
             sum(p.numel() for p in model.parameters()) / 1e6)  # fmt: skip
    return model.requires_grad_(False).eval()
