"""A picture for TensorBoard of what grouping does: one grouped mini-batch beside one random mini-batch, as
thumbnails with their captions, each marked (in red) with the other samples of its batch that share its caption or
its image, or that connection mining turns into its positive: the false negatives grouping gathers."""

from __future__ import annotations

import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from gritvlp.data.device_images import decode_batch
from gritvlp.data.encoded_images import EncodedBatch, EncodedImage
from gritvlp.data.transforms import CLIP_MEAN, CLIP_STD

THUMB = 96  # pixels per thumbnail side
CAPTION_LINES = 3
MARK_COLOUR = (200, 20, 20)
LINE_HEIGHT = 11
CELL_HEIGHT = THUMB + CAPTION_LINES * LINE_HEIGHT + 6
CELL_WIDTH = THUMB * 2 + 8  # captions get twice the thumbnail's width
TITLE_HEIGHT = 28  # two lines: the batch kind, then its pair counts


def to_pil(image: torch.Tensor | EncodedImage) -> Image.Image:
    """A [3, S, S] image back to a thumbnail: uint8 pixels (the training loader's, normalised on the device), a
    normalised float tensor, or an image still encoded (data.image_decode=device)."""
    if isinstance(image, EncodedImage):
        image = decode_batch(EncodedBatch.collate([image], [-1]), "cpu")[0]
    if image.dtype == torch.uint8:
        return Image.fromarray(image.cpu().permute(1, 2, 0).numpy()).resize((THUMB, THUMB))
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    pixels = ((image.float().cpu() * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(pixels).resize((THUMB, THUMB))


def batch_marks(caption_ids: list, group_ids: list, converted=()) -> list[str]:
    """Per sample of a batch, the positions (#k) of the others that share its caption or its image, or that form a
    converted (mined) pair with it; '' when none do."""
    marks = []
    for i in range(len(caption_ids)):
        parts = []
        for name, ids in (("same caption", caption_ids), ("same image", group_ids)):
            others = [f"#{j}" for j in range(len(ids)) if j != i and ids[j] is not None and ids[j] == ids[i]]
            if others:
                parts.append(f"{name} {' '.join(others)}")
        mined = sorted({b for a, b in converted if a == i} | {a for a, b in converted if b == i} - {i})
        if mined:
            parts.append("mined " + " ".join(f"#{j}" for j in mined))
        marks.append("; ".join(parts))
    return marks


def column(samples: list[dict], title: str, marks: list[str] | None = None) -> Image.Image:
    """One batch as a column of cells: thumbnail, then its position, caption and marks wrapped beside it."""
    canvas = Image.new("RGB", (CELL_WIDTH + THUMB, TITLE_HEIGHT + CELL_HEIGHT * len(samples)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((4, 2), title, fill="black", font=font)
    for row, sample in enumerate(samples):
        top = TITLE_HEIGHT + row * CELL_HEIGHT
        canvas.paste(to_pil(sample["image"]), (4, top))
        lines = textwrap.wrap(f"#{sample['position']} {sample['caption']}", width=34)[:CAPTION_LINES]
        mark = textwrap.wrap(marks[row], width=34)[: CAPTION_LINES + 3 - len(lines)] if marks else []
        for i, line in enumerate(lines + mark):
            colour = "black" if i < len(lines) else MARK_COLOUR
            draw.text((THUMB + 10, top + i * LINE_HEIGHT), line, fill=colour, font=font)
    return canvas


def _pair_count(ids: list) -> int:
    """Pairs i < j with equal ids (None: unknown, never equal)."""
    return sum(ids[i] is not None and ids[i] == ids[j] for i in range(len(ids)) for j in range(i + 1, len(ids)))


def _ids(dataset, name: str, indices: list[int]) -> list:
    ids = getattr(dataset, name, None)
    return [None] * len(indices) if ids is None else [int(ids[i]) for i in indices]


def grouped_vs_random(dataset, grouped: list[int], random: list[int], max_samples: int = 8, converted=()) -> np.ndarray:
    """HWC uint8: the first samples of a grouped mini-batch (left) and of a random one (right), marked with their
    batch's duplicates (dataset.caption_ids / group_ids) and, for the grouped batch, the `converted` pairs
    (positions in it) of connection mining; each title counts the batch's pairs. Unreadable samples are left out."""
    columns = []
    for title, indices, mined in (("GRIT-grouped mini-batch", grouped, converted), ("random mini-batch", random, ())):
        captions, groups = _ids(dataset, "caption_ids", indices), _ids(dataset, "group_ids", indices)
        marks = batch_marks(captions, groups, mined)
        title += f"\n{_pair_count(captions)} same-caption, {_pair_count(groups)} same-image, {len(mined)} mined pairs"
        shown = [(p, dataset[i]) for p, i in enumerate(indices[:max_samples])]
        samples = [{**s, "position": p} for p, s in shown if s is not None]
        columns.append(column(samples, title, [marks[s["position"]] for s in samples]))
    width = sum(c.width for c in columns) + 12
    canvas = Image.new("RGB", (width, max(c.height for c in columns)), "white")
    canvas.paste(columns[0], (0, 0))
    canvas.paste(columns[1], (columns[0].width + 12, 0))
    return np.asarray(canvas)
