"""The device half of data.image_decode=device: an EncodedBatch -> the normalised float [B, 3, S, S] batch.

Per batch: torchvision.io.decode_jpeg on the list of JPEGs (batched nvJPEG on CUDA; libjpeg-turbo on the CPU, where
the same code runs for tests), each sample's crop (the box RandomResizedCrop drew on the host, in full-size
coordinates) resized to S x S bicubic with anti-aliasing in float32 (torch has no uint8 kernel for it on CUDA),
rounded as the CPU path's uint8 kernel rounds, then, batched, the flip, RandomAugment (gritvlp.data.device_augment)
and CLIP's normalisation. The decode is always full size; the CPU path decodes large crops at a reduced DCT scale,
which is its only difference to this one besides the resize's arithmetic (fixed-point there, float32 here: a level
apart on under 1% of the pixels).

Why torchvision rather than NVIDIA DALI: torchvision is already a dependency, its decode_jpeg batches through nvJPEG
with one call (the same call decodes on the CPU, so every line here is tested without a GPU), and the augmentation
stays in torch, sharing the CPU path's definitions. DALI (nvidia-dali-cuda120 is a 425 MB wheel per CUDA major
version) decodes well, also with the A100/H100 hardware JPEG engine, but it runs its own pipeline and threads that
would have to take over from the DataLoader and the GRIT sampler's order (or be fed through its external source),
and ALBEF's operations (grey-filled OpenCV-style warps, PIL's equalisation and sharpness) would have to be rebuilt
from its operators, which define them differently. torchvision 0.29 deprecates its image decoders in favour of
TorchCodec's (decode_jpeg on CPU and CUDA from 0.16), not yet a dependency here: moving over changes `_decode` and
`_decode_one` only.

An image whose bytes the decoder rejects (its header parsed on the host) cannot be dropped any more: its caption is
already in the batch. The batch is then decoded image by image to find it; it is logged, counted in
`replaced_images`, and decoded by PIL on the host instead (full size, same crop), or, when PIL fails too, replaced by
a grey image (128; it is still flipped, augmented and normalised), so the batch keeps its size and order.
"""

from __future__ import annotations

import functools
import io
import logging

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from gritvlp.data.device_augment import augment_batch
from gritvlp.data.encoded_images import EncodedBatch
from gritvlp.data.transforms import GREY, NormalizeUint8, UndecodableImage, decode_rgb

log = logging.getLogger("gritvlp.data")
DECODE_CHUNK = 64  # JPEGs decoded at once: bounds the full-size images alive on the device
replaced_images = 0  # images of this process the decoder rejected (see the module's docstring)


def decode_batch(batch: EncodedBatch, device: torch.device | str) -> torch.Tensor:
    """The normalised float32 [B, 3, S, S] batch on `device`."""
    device = torch.device(device)
    size = batch.image_size
    resized = torch.empty(len(batch), 3, size, size, dtype=torch.float32, device=device)
    on_host = batch.on_host.nonzero().flatten()
    if len(on_host):
        resized[on_host.to(device)] = batch.pixels.to(device, non_blocking=True).float()
    jpegs = batch.jpegs()
    rows = (~batch.on_host).nonzero().flatten().tolist()
    for start in range(0, len(rows), DECODE_CHUNK):
        chunk = rows[start : start + DECODE_CHUNK]
        for row, image in zip(chunk, _decode(batch, [jpegs[r] for r in chunk], chunk, device)):
            resized[row] = _crop_resize(image, batch.boxes[row].tolist(), size)
    pixels = resized.round_().clamp_(0, 255).to(torch.uint8)
    flip = batch.flip.nonzero().flatten().to(device)
    pixels[flip] = pixels[flip].flip(-1)
    augment_batch(pixels, batch.ops, batch.applied, batch.signs, batch.level)
    return normalize_pixels(pixels)


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32, CLIP's normalisation, on the pixels' device."""
    return _normalize(pixels.device)(pixels)


@functools.lru_cache
def _normalize(device: torch.device) -> NormalizeUint8:
    return NormalizeUint8().to(device)


def _crop_resize(image: torch.Tensor, box: list[int], size: int) -> torch.Tensor:
    """[3, H, W] uint8 -> the box (top, left, height, width) resized to [3, S, S] float32, unrounded. Two passes,
    the width's then the height's, rounded to whole levels in between as the CPU path's uint8 kernel (and PIL) does:
    the two then differ by one level on well under 1% of the pixels (one pass: on 10-20%)."""
    top, left, height, width = box
    region = image[None, :, top : top + height, left : left + width].float()
    wide = F.interpolate(region, size=(height, size), mode="bicubic", antialias=True).round_().clamp_(0, 255)
    return F.interpolate(wide, size=(size, size), mode="bicubic", antialias=True)[0]


def _decode(batch: EncodedBatch, jpegs: list[torch.Tensor], rows: list[int], device) -> list[torch.Tensor]:
    """[3, H, W] uint8 per JPEG, on the device: all at once, or one by one when that fails."""
    try:
        images = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        images = [_decode_one(jpeg, device) for jpeg in jpegs]
    sizes = [batch.sizes[row].tolist() for row in rows]
    good = [image is not None and list(image.shape[1:]) == size for image, size in zip(images, sizes)]
    return [image if ok else _replace(batch, row, device) for image, row, ok in zip(images, rows, good)]


def _decode_one(jpeg: torch.Tensor, device) -> torch.Tensor | None:
    try:
        return decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def _replace(batch: EncodedBatch, row: int, device) -> torch.Tensor:
    """The full-size image of a sample the device decoder rejected: PIL's decode, else grey."""
    global replaced_images
    replaced_images += 1
    height, width = batch.sizes[row].tolist()
    data = batch.jpegs()[row].numpy().tobytes()
    try:
        pixels = torch.from_numpy(np.asarray(decode_rgb(Image.open(io.BytesIO(data)))).copy()).permute(2, 0, 1)
        if list(pixels.shape[1:]) != [height, width]:
            raise UndecodableImage(f"decoded {tuple(pixels.shape[1:])}, header says {(height, width)}")
        how = "decoded by PIL on the host instead"
    except (UndecodableImage, OSError, ValueError) as err:
        pixels = torch.full((3, height, width), GREY, dtype=torch.uint8)
        how = f"PIL fails too ({err}): replaced by a grey image"
    log.warning("sample %d: the device decoder rejects its JPEG; %s (%d image(s) replaced in this process)",
                batch.indices[row], how, replaced_images)  # fmt: skip
    return pixels.to(device)
