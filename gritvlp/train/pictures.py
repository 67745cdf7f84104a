"""A picture for TensorBoard of what grouping does: one grouped mini-batch beside one random mini-batch, as
thumbnails with their captions."""

from __future__ import annotations

import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from gritvlp.data.transforms import CLIP_MEAN, CLIP_STD

THUMB = 96  # pixels per thumbnail side
CAPTION_LINES = 3
LINE_HEIGHT = 11
CELL_HEIGHT = THUMB + CAPTION_LINES * LINE_HEIGHT + 6
CELL_WIDTH = THUMB * 2 + 8  # captions get twice the thumbnail's width
TITLE_HEIGHT = 16


def to_pil(image: torch.Tensor) -> Image.Image:
    """A normalised [3, S, S] tensor back to a thumbnail."""
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    pixels = ((image.float().cpu() * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(pixels).resize((THUMB, THUMB))


def column(samples: list[dict], title: str) -> Image.Image:
    """One batch as a column of cells: thumbnail, then its caption wrapped beside it."""
    canvas = Image.new("RGB", (CELL_WIDTH + THUMB, TITLE_HEIGHT + CELL_HEIGHT * len(samples)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((4, 2), title, fill="black", font=font)
    for row, sample in enumerate(samples):
        top = TITLE_HEIGHT + row * CELL_HEIGHT
        canvas.paste(to_pil(sample["image"]), (4, top))
        lines = textwrap.wrap(sample["caption"], width=34)[:CAPTION_LINES + 3]
        for i, line in enumerate(lines):
            draw.text((THUMB + 10, top + i * LINE_HEIGHT), line, fill="black", font=font)
    return canvas


def grouped_vs_random(dataset, grouped: list[int], random: list[int], max_samples: int = 8) -> np.ndarray:
    """HWC uint8: the first samples of a grouped mini-batch (left) and of a random one (right). Unreadable
    samples (None) are left out."""
    columns = []
    for title, indices in (("GRIT-grouped mini-batch", grouped), ("random mini-batch", random)):
        samples = [s for s in (dataset[i] for i in indices[:max_samples]) if s is not None]
        columns.append(column(samples, title))
    width = sum(c.width for c in columns) + 12
    canvas = Image.new("RGB", (width, max(c.height for c in columns)), "white")
    canvas.paste(columns[0], (0, 0))
    canvas.paste(columns[1], (columns[0].width + 12, 0))
    return np.asarray(canvas)
