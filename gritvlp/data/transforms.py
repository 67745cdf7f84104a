"""Image transforms of ALBEF pre-training: PIL image (opened, decoded or not) -> normalised float tensor [3, S, S].

The training pipeline is ALBEF's (salesforce/ALBEF, dataset/__init__.py and dataset/randaugment.py):
RandomResizedCrop(S, scale=(0.2, 1.0), bicubic), RandomHorizontalFlip, RandomAugment(2, 7) over ten operations
that keep colours (colour words in captions stay true), ToTensor, Normalize with CLIP's statistics.

Speed: the crop is drawn before the JPEG is decoded, so the decoder skips the resolution the crop cannot use
(libjpeg's DCT scaling by 1/2, 1/4 or 1/8, through PIL's `draft`). After decoding, the image stays a uint8 tensor:
the crop is a view, the resize is torch's uint8 bicubic kernel (PIL's filter, several times faster than PIL's own),
RandomAugment's operations are computed on the tensor as ALBEF computes them on its numpy array (except where ALBEF's
uint8 arithmetic overflows: AutoContrast and Sharpness compute what PIL computes, see their functions), and the float
tensor is written once, already normalised.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ALBEF_OPS = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
MAX_LEVEL = 10
APPLY_PROBABILITY = 0.5  # each drawn operation is applied with this probability
GREY = 128  # fill of the geometric operations, in every channel
TRANSLATE_PIXELS = 10  # shift in pixels at MAX_LEVEL: absolute, whatever the image size
SHEAR_AT_MAX = 0.3
ROTATE_DEGREES_AT_MAX = 30.0
DCT_SCALES = (8, 4, 2)  # the reductions PIL's JPEG draft mode offers
GEOMETRIC_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})  # these draw a direction


class UndecodableImage(Exception):
    """The image bytes could not be decoded."""


@dataclass(frozen=True)
class AugmentDraw:
    """One of RandomAugment's N draws: the operation, whether it is applied and, for an applied geometric one, its
    direction (1 otherwise)."""

    op: str
    applied: bool
    sign: int = 1


@dataclass(frozen=True)
class TrainDraw:
    """Every random choice of the training transform for one image, drawn before any pixel is decoded."""

    box: tuple[int, int, int, int]  # (top, left, height, width) in the full image, as RandomResizedCrop draws it
    flip: bool
    augment: tuple[AugmentDraw, ...]


# ---------------------------------------------------------------- decoding, crop and resize


def decode_rgb(image: Image.Image, reduce: int = 1) -> Image.Image:
    """Decode a lazily opened image as RGB, JPEGs at 1/reduce of their size; decoded images pass through."""
    try:
        if reduce > 1:
            image.draft("RGB", (image.width // reduce, image.height // reduce))  # no-op once decoded / not a JPEG
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as err:  # PIL raises many types for bad bytes
        raise UndecodableImage(str(err) or type(err).__name__) from err


def jpeg_reduction(region: tuple[int, int], out_size: tuple[int, int]) -> int:
    """The largest DCT reduction after which a (w, h) region still holds at least out_size (w, h) pixels.

    With at least as many source pixels as output pixels, the resize still only downsamples, so the result stays
    close to a full decode: the DCT reduction acts as a first, anti-aliased downsampling stage.
    """
    for scale in DCT_SCALES:
        if region[0] >= out_size[0] * scale and region[1] >= out_size[1] * scale:
            return scale
    return 1


def _decode_scaled(image: Image.Image, reduce: int) -> tuple[Image.Image, int]:
    """The decoded RGB image and the reduction the decoder applied (1 when it could not: decoded, not a JPEG)."""
    width = image.width
    image = decode_rgb(image, reduce)
    return image, (reduce if image.width != width else 1)


def _pixels(image: Image.Image) -> torch.Tensor:
    """[H, W, 3] uint8 tensor of an RGB image: one copy out of PIL, no more."""
    array = np.asarray(image)  # read-only (it wraps the exported bytes); torch only reads it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def resize_region(pixels: torch.Tensor, box: tuple[int, int, int, int], out_size: tuple[int, int]) -> torch.Tensor:
    """Crop (left, top, right, bottom) of [H, W, 3] uint8 resized to out_size (w, h) -> [3, h, w] uint8: bicubic,
    anti-aliased, as PIL resamples (torch's uint8 kernel matches PIL's bicubic to rounding)."""
    left, top, right, bottom = box
    region = pixels[top:bottom, left:right].permute(2, 0, 1)[None]  # a view: channels-last NCHW
    return F.interpolate(region, size=(out_size[1], out_size[0]), mode="bicubic", antialias=True)[0]


class ReducedDecodeRandomResizedCrop(T.RandomResizedCrop):
    """torchvision's RandomResizedCrop (the same random draws, the same crop) -> [3, S, S] uint8, decoding only
    the resolution the crop can use. A crop of a reduced decode is rounded to its pixel grid (under half a pixel)."""

    def draw(self, image: Image.Image) -> tuple[int, int, int, int]:
        """(top, left, height, width), from the size in the header: no decode."""
        return tuple(self.get_params(image, self.scale, self.ratio))

    def apply(self, image: Image.Image, box: tuple[int, int, int, int]) -> torch.Tensor:
        top, left, height, width = box
        out_size = (self.size[1], self.size[0])
        image, reduce = _decode_scaled(image, jpeg_reduction((width, height), out_size))
        scaled = tuple(round(v / reduce) for v in (left, top, left + width, top + height))
        return resize_region(_pixels(image), scaled, out_size)

    def forward(self, image: Image.Image) -> torch.Tensor:
        return self.apply(image, self.draw(image))


class HorizontalFlip(T.RandomHorizontalFlip):
    """torchvision's RandomHorizontalFlip (the same draw), with the draw apart from the flip."""

    def draw(self) -> bool:
        return bool(torch.rand(1) < self.p)

    def apply(self, pixels: torch.Tensor, flip: bool) -> torch.Tensor:
        return pixels.flip(-1) if flip else pixels

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.apply(pixels, self.draw())


class ReducedDecodeResize(torch.nn.Module):
    """Resize to (S, S), bicubic -> [3, S, S] uint8, decoding a JPEG at the smallest DCT size covering S x S."""

    def __init__(self, image_size: int):
        super().__init__()
        self.out_size = (image_size, image_size)

    def forward(self, image: Image.Image) -> torch.Tensor:
        image, _ = _decode_scaled(image, jpeg_reduction(image.size, self.out_size))
        return resize_region(_pixels(image), (0, 0, *image.size), self.out_size)


class NormalizeUint8(torch.nn.Module):
    """ToTensor + Normalize in one pass: [3, H, W] uint8 -> float, (x / 255 - mean) / std."""

    def __init__(self, mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        mean, std = torch.tensor(mean), torch.tensor(std)
        self.register_buffer("scale", (1.0 / (255.0 * std)).view(3, 1, 1))
        self.register_buffer("shift", (-mean / std).view(3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.to(torch.float32).mul_(self.scale).add_(self.shift)


# ---------------------------------------------------------------- ALBEF's RandomAugment, on [3, H, W] uint8
# The geometric operations take a signed level: the caller draws the direction (AlbefRandomAugment.draw).


def _chance(p: float) -> bool:
    return torch.rand(()).item() < p


def _enhance_factor(level: float) -> float:
    """Brightness and sharpness: 0.1 at level 0 to 1.9 at level 10 (1.36 at 7); never negated."""
    return level / MAX_LEVEL * 1.8 + 0.1


def _apply_tables(pixels: torch.Tensor, tables: np.ndarray) -> torch.Tensor:
    """Per-channel 256-entry uint8 lookup tables."""
    source = pixels.numpy()
    out = np.empty_like(source)
    for channel in range(source.shape[0]):
        np.take(tables[channel], source[channel], out=out[channel])
    return torch.from_numpy(out)


def _autocontrast_table(channel: np.ndarray) -> np.ndarray:
    """Stretch [min, max] to [0, 255]: PIL's autocontrast without cutoff, which ALBEF's autocontrast_func means to
    reproduce. Not ALBEF's result: its offset -low * scale negates a uint8 `low`, which wraps to 256 - low
    (salesforce/ALBEF issue 134), so every non-constant channel whose minimum is above 0 comes out 255 throughout; only
    channels that already reach 0 are stretched. Here `low` is a Python int, as PIL computes it."""
    low, high = int(channel.min()), int(channel.max())
    if high <= low:
        return np.arange(256, dtype=np.uint8)
    scale = 255 / (high - low)
    return (np.arange(256) * scale - low * scale).clip(0, 255).astype(np.uint8)


def _equalize_table(channel: np.ndarray) -> np.ndarray:
    """PIL's histogram equalisation, as ALBEF computes it."""
    histogram = np.bincount(channel.ravel(), minlength=256)
    used = histogram[histogram != 0]
    step = (used.sum() - used[-1]) // 255
    if step == 0:
        return np.arange(256, dtype=np.uint8)
    cumulative = np.concatenate([[step // 2], step // 2 + np.cumsum(histogram[:-1])])
    return (cumulative // step).clip(0, 255).astype(np.uint8)


def _autocontrast(pixels: torch.Tensor, level: float) -> torch.Tensor:
    return _apply_tables(pixels, np.stack([_autocontrast_table(c) for c in pixels.numpy()]))


def _equalize(pixels: torch.Tensor, level: float) -> torch.Tensor:
    return _apply_tables(pixels, np.stack([_equalize_table(c) for c in pixels.numpy()]))


def brightness_table(level: float) -> np.ndarray:
    return (np.arange(256, dtype=np.float32) * np.float32(_enhance_factor(level))).clip(0, 255).astype(np.uint8)


def _brightness(pixels: torch.Tensor, level: float) -> torch.Tensor:
    return _apply_tables(pixels, np.stack([brightness_table(level)] * pixels.shape[0]))


def _blur3x3(image: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13) on the interior of [..., H, W] float, as sums of
    shifted views (a grouped conv2d is many times slower on the CPU)."""
    rows = image[..., :-2, :] + image[..., 1:-1, :] + image[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    return box.add_(image[..., 1:-1, 1:-1], alpha=4).div_(13)


def sharpness(pixels: torch.Tensor, level: float) -> torch.Tensor:
    """Blend away from the 3x3 blur (rounded to uint8) inside a one-pixel border, which is kept; [..., H, W] uint8.
    ALBEF casts the blend to uint8 unclipped, so values past 0 or 255 wrap around; they are clipped here, as PIL
    does."""
    image = pixels.to(torch.float32)
    blurred = _blur3x3(image).round_()
    inner = blurred + _enhance_factor(level) * (image[..., 1:-1, 1:-1] - blurred)
    out = pixels.clone()
    out[..., 1:-1, 1:-1] = inner.clamp_(0, 255).to(torch.uint8)
    return out


def _pixel_to_grid(width: int, height: int) -> np.ndarray:
    """Pixel coordinates (centres at integers) -> grid_sample's normalised coordinates (align_corners=False)."""
    return np.array([[2 / width, 0, 1 / width - 1], [0, 2 / height, 1 / height - 1], [0, 0, 1]])


def _translation(level: float) -> float:
    return -(level / MAX_LEVEL * TRANSLATE_PIXELS)


def affine_forward(op: str, level: float, width: int, height: int) -> np.ndarray:
    """The 2x3 map of a geometric operation at a signed level from source to output pixel coordinates (centres at
    integers), as ALBEF builds it for OpenCV's warpAffine. Rotate turns counter-clockwise about (W/2, H/2), as
    cv2.getRotationMatrix2D builds it."""
    forward = np.eye(2, 3)
    if op in ("ShearX", "ShearY"):
        axis = int(op == "ShearY")
        forward[axis, 1 - axis] = level / MAX_LEVEL * SHEAR_AT_MAX
    elif op in ("TranslateX", "TranslateY"):
        forward[int(op == "TranslateY"), 2] = _translation(level)
    elif op == "Rotate":
        angle = math.radians(level / MAX_LEVEL * ROTATE_DEGREES_AT_MAX)
        cos, sin = math.cos(angle), math.sin(angle)
        cx, cy = width / 2, height / 2
        forward = np.array([[cos, sin, (1 - cos) * cx - sin * cy], [-sin, cos, sin * cx + (1 - cos) * cy]])
    else:
        raise ValueError(f"{op!r} is not a geometric operation ({sorted(GEOMETRIC_OPS)})")
    return forward


def warp_theta(forward: np.ndarray, width: int, height: int) -> np.ndarray:
    """grid_sample's 2x3 matrix (output -> source, normalised coordinates) of a forward map in pixel coordinates."""
    to_grid = _pixel_to_grid(width, height)
    inverse = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))
    return (to_grid @ inverse @ np.linalg.inv(to_grid))[:2]


def warp_batch(pixels: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] uint8 warped by theta [B, 2, 3] (float32, warp_theta's) as OpenCV's warpAffine does it for ALBEF:
    bilinear, with every pixel outside the image grey."""
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    centred = pixels.to(torch.float32).sub_(GREY)  # zero padding of the centred image = grey padding
    out = F.grid_sample(centred, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.add_(GREY).round_().clamp_(0, 255).to(torch.uint8)


def _shift(pixels: torch.Tensor, shift: int, dim: int) -> torch.Tensor:
    """Content moved by a whole number of pixels along dim, grey where it uncovers (what bilinear sampling gives)."""
    out = torch.full_like(pixels, GREY)
    size = pixels.shape[dim]
    if abs(shift) < size:
        kept = pixels.narrow(dim, max(0, -shift), size - abs(shift))
        out.narrow(dim, max(0, shift), size - abs(shift)).copy_(kept)
    return out


def _geometric(pixels: torch.Tensor, level: float, op: str) -> torch.Tensor:
    height, width = pixels.shape[1:]
    shift = _translation(level)
    if op.startswith("Translate") and shift == int(shift):
        return _shift(pixels, int(shift), dim=2 if op == "TranslateX" else 1)
    theta = torch.tensor(warp_theta(affine_forward(op, level, width, height), width, height), dtype=torch.float32)
    return warp_batch(pixels[None], theta[None])[0]


def _rotate(pixels: torch.Tensor, level: float) -> torch.Tensor:
    return _geometric(pixels, level, "Rotate")


OPERATIONS = {
    "Identity": lambda pixels, level: pixels,
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
    "Brightness": _brightness,
    "Sharpness": sharpness,
    **{op: lambda pixels, level, op=op: _geometric(pixels, level, op) for op in sorted(GEOMETRIC_OPS)},
}


class AlbefRandomAugment(torch.nn.Module):
    """ALBEF's RandomAugment(N, M, isPIL=True, augs=ALBEF_OPS) on [3, H, W] uint8, drawing from torch's RNG.

    N operations are drawn uniformly with replacement; each is then applied with probability 1/2 at level M of 10
    (at M = 7: shear 0.21, translation 7 px, rotation 21 degrees, each of random sign; brightness and sharpness
    x1.36). The geometric operations fill with grey (128, 128, 128).
    """

    def __init__(self, num_ops: int = 2, level: float = 7, ops: tuple[str, ...] = ALBEF_OPS):
        super().__init__()
        if not 0 <= level <= MAX_LEVEL:
            raise ValueError(f"RandomAugment magnitude must be in 0..{MAX_LEVEL}, got {level}")
        unknown = set(ops) - set(OPERATIONS)
        if unknown:
            raise ValueError(f"unknown RandomAugment operation(s) {sorted(unknown)}; known: {list(OPERATIONS)}")
        self.num_ops, self.level, self.ops = num_ops, level, tuple(ops)

    def draw(self) -> tuple[AugmentDraw, ...]:
        """The choices, in the order ALBEF draws them: the N operations, then per operation whether it is applied
        and, for an applied geometric one, its direction."""
        draws = []
        for choice in torch.randint(len(self.ops), (self.num_ops,)).tolist():
            op = self.ops[choice]
            applied = _chance(APPLY_PROBABILITY)
            sign = -1 if applied and op in GEOMETRIC_OPS and _chance(0.5) else 1
            draws.append(AugmentDraw(op, applied, sign))
        return tuple(draws)

    def apply(self, pixels: torch.Tensor, draws: tuple[AugmentDraw, ...]) -> torch.Tensor:
        for draw in draws:
            if draw.applied:
                pixels = OPERATIONS[draw.op](pixels.contiguous(), draw.sign * self.level)
        return pixels

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.apply(pixels, self.draw())

    def extra_repr(self) -> str:
        return f"num_ops={self.num_ops}, level={self.level}, ops={list(self.ops)}"


# ---------------------------------------------------------------- pipelines


class LazyDecodeCompose(T.Compose):
    """A Compose whose first step decodes the image itself, so it may be handed a lazily opened image."""

    decodes_lazily = True


class AlbefTrainTransform(LazyDecodeCompose):
    """The training pipeline. It draws every random choice first (`draw`, from the header alone) and then applies
    them (`apply`): the same draws, in the same order, as its steps run one after the other would make. The device
    path (gritvlp.data.encoded_images) draws with this same `draw` on the host."""

    def __init__(self, crop, flip, augment, normalize):
        super().__init__([t for t in (crop, flip, augment, normalize) if t is not None])
        self.crop, self.flip, self.augment, self.normalize = crop, flip, augment, normalize

    def draw(self, image: Image.Image) -> TrainDraw:
        box = self.crop.draw(image)
        flip = self.flip.draw() if self.flip is not None else False
        return TrainDraw(box, flip, self.augment.draw() if self.augment is not None else ())

    def apply(self, image: Image.Image, drawn: TrainDraw) -> torch.Tensor:
        pixels = self.crop.apply(image, drawn.box)
        pixels = pixels.flip(-1) if drawn.flip else pixels
        if self.augment is not None:
            pixels = self.augment.apply(pixels, drawn.augment)
        return pixels if self.normalize is None else self.normalize(pixels)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.apply(image, self.draw(image))


def train_transform(
    image_size: int, crop_scale=(0.2, 1.0), hflip=True, randaug_n=2, randaug_m=7, normalize: bool = True
) -> T.Compose:
    """The training pipeline -> normalised float [3, S, S], or with normalize=False the uint8 pixels, for a trainer
    that normalises on the device (a quarter of the bytes through pinned memory and the host-to-device copy, and
    no float pass in the worker)."""
    crop = ReducedDecodeRandomResizedCrop(image_size, tuple(crop_scale), interpolation=InterpolationMode.BICUBIC)
    flip = HorizontalFlip() if hflip else None
    augment = AlbefRandomAugment(randaug_n, randaug_m) if randaug_n > 0 else None
    return AlbefTrainTransform(crop, flip, augment, NormalizeUint8() if normalize else None)


def eval_transform(image_size: int) -> T.Compose:
    return LazyDecodeCompose([ReducedDecodeResize(image_size), NormalizeUint8()])
