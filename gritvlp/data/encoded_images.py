"""The host half of data.image_decode=device: loader workers read the JPEG header, draw the training transform's
random choices and pass the bytes on; gritvlp.data.device_images decodes and augments them after the copy.

The choices come from AlbefTrainTransform.draw, the function the CPU path draws with, from the same per-sample
seeded generator (ShardDataset seeds it), so both paths draw identical parameters. A worker decodes only what the
device decoder may not handle (not a baseline or progressive Huffman JPEG in RGB/YCbCr or grey: PNG, CMYK,
arithmetic-coded JPEG, ...): those are decoded, cropped and resized here, as the CPU path does, and flipped and
augmented on the device with the rest of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from PIL import Image

from gritvlp.data.transforms import ALBEF_OPS, AlbefTrainTransform, AugmentDraw, TrainDraw

DEVICE_FRAMES = {0xC0, 0xC1, 0xC2}  # start-of-frame markers: baseline, extended and progressive Huffman
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # markers without a length field


def jpeg_frame(data: bytes) -> int | None:
    """The start-of-frame marker of a JPEG (0xC0-0xCF but DHT, JPG and DAC), read by walking the segments in front
    of it; None when the bytes are not a JPEG or end before one."""
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in _STANDALONE:
            pos += 2
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        elif marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header came first
            return None
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def device_decodable(image: Image.Image, data: bytes) -> bool:
    return image.format == "JPEG" and image.mode in ("RGB", "L") and jpeg_frame(data) in DEVICE_FRAMES


@dataclass
class EncodedImage:
    """One training image as a worker hands it on: its JPEG bytes, or (`pixels`) the crop the host decoded and
    resized, plus every random choice of the training transform."""

    data: torch.Tensor  # uint8 [n]: the JPEG; empty when `pixels` is set
    pixels: torch.Tensor | None  # uint8 [3, S, S]: cropped and resized, not yet flipped or augmented
    size: tuple[int, int]  # (height, width) from the header
    drawn: TrainDraw
    image_size: int
    level: float  # RandomAugment's magnitude


class HostDrawTransform:
    """ShardDataset's transform under data.image_decode=device: (lazily opened image, its bytes) -> EncodedImage.
    Raises UndecodableImage (a counted skip) only for an image it has to decode itself."""

    decodes_lazily = True
    takes_bytes = True

    def __init__(self, train: AlbefTrainTransform):
        self.train = train
        self.level = train.augment.level if train.augment is not None else 0

    def __call__(self, image: Image.Image, data: bytes) -> EncodedImage:
        return self.encode(image, data, self.train.draw(image))  # the header's size is all the draw reads

    def encode(self, image: Image.Image, data: bytes, drawn: TrainDraw) -> EncodedImage:
        size = (image.height, image.width)
        image_size = self.train.crop.size[0]
        if device_decodable(image, data):
            data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return EncodedImage(data, None, size, drawn, image_size, self.level)
        pixels = self.train.crop.apply(image, drawn.box)
        return EncodedImage(torch.empty(0, dtype=torch.uint8), pixels, size, drawn, image_size, self.level)


@dataclass
class EncodedBatch:
    """A batch of EncodedImage, as the Collator passes it under "image". The JPEGs are one tensor end to end, so
    that a batch crosses from a worker process in one shared-memory block, not one per image."""

    data: torch.Tensor  # uint8 [sum(lengths)]
    lengths: list[int]  # bytes per sample; 0 for a sample decoded on the host
    pixels: torch.Tensor  # uint8 [k, 3, S, S]: the host-decoded samples, in batch order
    on_host: torch.Tensor  # bool [B]: decoded on the host
    sizes: torch.Tensor  # long [B, 2]: (height, width)
    boxes: torch.Tensor  # long [B, 4]: (top, left, height, width)
    flip: torch.Tensor  # bool [B]
    ops: torch.Tensor  # long [B, N]: index in ALBEF_OPS
    applied: torch.Tensor  # bool [B, N]
    signs: torch.Tensor  # long [B, N]: -1 or 1
    indices: list[int]  # dataset indices, for the log
    image_size: int
    level: float

    @classmethod
    def collate(cls, images: list[EncodedImage], indices: list[int]) -> EncodedBatch:
        if not images:
            raise ValueError("an EncodedBatch needs at least one image")
        first = images[0]
        host = [im.pixels for im in images if im.pixels is not None]
        size = first.image_size
        draws = [im.drawn.augment for im in images]
        return cls(
            data=torch.cat([im.data for im in images]),
            lengths=[im.data.numel() for im in images],
            pixels=torch.stack(host) if host else torch.empty(0, 3, size, size, dtype=torch.uint8),
            on_host=torch.tensor([im.pixels is not None for im in images]),
            sizes=torch.tensor([im.size for im in images], dtype=torch.long),
            boxes=torch.tensor([im.drawn.box for im in images], dtype=torch.long),
            flip=torch.tensor([im.drawn.flip for im in images], dtype=torch.bool),
            ops=torch.tensor([[ALBEF_OPS.index(d.op) for d in row] for row in draws], dtype=torch.long),
            applied=torch.tensor([[d.applied for d in row] for row in draws], dtype=torch.bool),
            signs=torch.tensor([[d.sign for d in row] for row in draws], dtype=torch.long),
            indices=list(indices),
            image_size=size,
            level=first.level,
        )

    def __len__(self) -> int:
        return len(self.lengths)

    def jpegs(self) -> list[torch.Tensor]:
        """Each sample's JPEG bytes (views; empty for a host-decoded sample)."""
        return list(torch.split(self.data, self.lengths))

    def draw(self, row: int) -> TrainDraw:
        ops, applied, signs = (t[row].tolist() for t in (self.ops, self.applied, self.signs))
        augment = tuple(AugmentDraw(ALBEF_OPS[o], a, s) for o, a, s in zip(ops, applied, signs))
        return TrainDraw(tuple(self.boxes[row].tolist()), bool(self.flip[row]), augment)

    def pin_memory(self) -> EncodedBatch:
        """What the DataLoader's pin_memory calls: pins the host-decoded pixels, which are copied to the device with
        non_blocking. The JPEG bytes stay pageable: the decoder stages them itself."""
        return replace(self, pixels=self.pixels.pin_memory())
