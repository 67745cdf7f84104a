"""Photograph-like JPEGs for benchmarks and throughput runs: 1/f luminance and colour fields (natural images are
close to 1/f), soft-edged objects and sensor grain, so that JPEG sizes and decode costs resemble web photographs
(a flat or random-noise image decodes far faster or slower than a photograph)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def pink_noise(height: int, width: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """A unit-variance field with amplitude spectrum 1/f^exponent (natural images are close to 1/f)."""
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f**exponent
    spectrum[0, 0] = 0.0
    field = np.fft.irfft2(spectrum, s=(height, width))
    return field / field.std()


def photo_like_jpeg(width: int, height: int, rng: np.random.Generator, quality: int = 90) -> bytes:
    from PIL import Image, ImageDraw, ImageFilter

    luma = 110 + 45 * pink_noise(height, width, 1.2, rng)
    cb, cr = (18 * pink_noise(height, width, 1.4, rng) for _ in range(2))
    tint = rng.normal(0, 10, 3)
    rgb = np.stack([luma + 1.4 * cr + tint[0], luma - 0.35 * cb - 0.7 * cr + tint[1], luma + 1.8 * cb + tint[2]], -1)
    background = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    mask = Image.new("L", (width, height))
    draw = ImageDraw.Draw(mask)
    for _ in range(5):
        x, y = rng.integers(0, width), rng.integers(0, height)
        box = (x, y, x + rng.integers(width // 10, width // 2), y + rng.integers(height // 10, height // 2))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=255)
    objects = 140 + 50 * pink_noise(height, width, 1.3, rng)
    objects = np.stack([objects * s for s in rng.uniform(0.6, 1.2, 3)], -1).clip(0, 255).astype(np.uint8)
    image = Image.composite(Image.fromarray(objects), background, mask.filter(ImageFilter.GaussianBlur(1.0)))
    pixels = np.asarray(image, np.float32) + rng.normal(0, 2.0, (height, width, 3))
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=quality)
    return out.getvalue()


def write_shard(path: Path, width: int, height: int, count: int, seed: int, first_key: int = 0) -> float:
    """A shard of `count` distinct images in img2dataset's layout (keys from first_key on, each with its own
    caption); returns the mean JPEG size in KB."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    sizes = []
    with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
        for key in range(first_key, first_key + count):
            jpeg = photo_like_jpeg(width, height, rng)
            sizes.append(len(jpeg))
            caption = f"a photograph number {key} of a scene with several objects on a textured background"
            sink.write({"__key__": f"{key:09d}", "jpg": jpeg, "txt": caption.encode(), "json": b"{}"})
    return float(np.mean(sizes)) / 1e3
