"""Encoding a whole retrieval set once: the ITC features rank, the token states feed the ITM re-ranking."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm


@dataclass
class EncodedSet:
    image_tokens: torch.Tensor  # [N_img, 1 + P, Wv]
    image_feat: torch.Tensor  # [N_img, E], L2-normalised
    text_hidden: torch.Tensor  # [N_txt, L, H]
    text_feat: torch.Tensor  # [N_txt, E], L2-normalised
    attention_mask: torch.Tensor  # [N_txt, L]


def model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


@torch.no_grad()
def encode_images(model, images: Dataset, device, batch_size: int = 64, num_workers: int = 0, progress: bool = True):
    """(image tokens, image features) of every image, in dataset order."""
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers)
    dtype = model_dtype(model)
    tokens, feats = [], []
    for batch in tqdm(loader, desc="encoding images", disable=not progress):
        batch_tokens, batch_feat = model.encode_image(batch.to(device=device, dtype=dtype))
        tokens.append(batch_tokens)
        feats.append(batch_feat)
    return torch.cat(tokens), torch.cat(feats)


def tokenize(tokenizer, captions: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All captions padded to the longest one, as the training collator tokenises. The tokenizer decides the text
    format: give the model's (gritvlp.eval.loading.load_model_tokenizer), which writes what the model was trained on
    (with or without the trailing [SEP], model.text_format)."""
    tokens = tokenizer(captions, padding="longest", truncation=True, max_length=max_tokens, return_tensors="pt")
    return tokens["input_ids"].long(), tokens["attention_mask"].long()


@torch.no_grad()
def encode_captions(
    model, tokenizer, captions: list[str], device, max_tokens: int = 30, batch_size: int = 256, progress: bool = True
):
    """(text states, text features, attention mask) of every caption, in order."""
    input_ids, attention_mask = tokenize(tokenizer, captions, max_tokens)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    hidden, feats = [], []
    starts = range(0, len(captions), batch_size)
    for start in tqdm(starts, desc="encoding captions", disable=not progress):
        rows = slice(start, start + batch_size)
        batch_hidden, batch_feat = model.encode_text(input_ids[rows], attention_mask[rows])
        hidden.append(batch_hidden)
        feats.append(batch_feat)
    return torch.cat(hidden), torch.cat(feats), attention_mask


def encode_set(
    model, data, tokenizer, device, *, batch_size=64, text_batch_size=256, max_tokens=30, num_workers=0, progress=True
) -> EncodedSet:
    """Encodes a RetrievalSet's images and captions."""
    image_tokens, image_feat = encode_images(model, data.images, device, batch_size, num_workers, progress)
    text_hidden, text_feat, attention_mask = encode_captions(
        model, tokenizer, data.captions, device, max_tokens, text_batch_size, progress
    )
    return EncodedSet(image_tokens, image_feat, text_hidden, text_feat, attention_mask)
