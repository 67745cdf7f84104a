"""ALBEF's pre-training augmentation (salesforce/ALBEF dataset/randaugment.py) and the reduced-size decode."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from gritvlp.data import transforms as tr
from gritvlp.data.transforms import (
    ALBEF_OPS,
    AlbefRandomAugment,
    NormalizeUint8,
    ReducedDecodeRandomResizedCrop,
    eval_transform,
    jpeg_reduction,
    train_transform,
)

GREY = (128, 128, 128)


def _uniform(colour=(10, 200, 30), height=32, width=40) -> torch.Tensor:
    return torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1).expand(3, height, width).contiguous()


def _outcomes(augment, pixels, seeds=range(400)) -> list[torch.Tensor]:
    outs = []
    for seed in seeds:
        torch.manual_seed(seed)
        outs.append(augment(pixels))
    return outs


def _grey_mask(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels == 128).all(dim=0)


def _photo_like_jpeg(width: int, height: int, seed: int) -> bytes:
    """Smooth colour fields plus texture and grain: detail at every scale, as photographs have."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((4, 70), (16, 35), (64, 18)):
        small = rng.normal(0, 1, (max(2, cells * height // width), cells, 3)).astype(np.float32)
        field = Image.fromarray(small[..., 0]).resize((width, height), Image.BICUBIC)
        pixels += amplitude * np.asarray(field)[..., None] * (1 + 0.3 * small.std(axis=(0, 1)))
    pixels += 120 + rng.normal(0, 4, pixels.shape)
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


# ---------------------------------------------------------------- the pipeline and the operation list


def test_train_transform_is_albefs_pipeline():
    ops = train_transform(256).transforms
    crop, flip, augment, normalize = ops
    assert type(crop) is ReducedDecodeRandomResizedCrop and crop.size == (256, 256)
    assert crop.scale == (0.2, 1.0) and crop.interpolation == InterpolationMode.BICUBIC
    assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(augment, AlbefRandomAugment) and (augment.num_ops, augment.level) == (2, 7)
    assert augment.ops == ALBEF_OPS
    assert isinstance(normalize, NormalizeUint8)
    assert [type(op) for op in train_transform(64, hflip=False, randaug_n=0).transforms] == [
        ReducedDecodeRandomResizedCrop,
        NormalizeUint8,
    ]


def test_operation_list_is_albefs():
    assert ALBEF_OPS == (
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
    assert set(tr.OPERATIONS) == set(ALBEF_OPS)  # no Color, Contrast, Posterize, Solarize: they change hues
    with pytest.raises(ValueError, match="Solarize"):
        AlbefRandomAugment(ops=("Identity", "Solarize"))
    with pytest.raises(ValueError, match="magnitude"):
        AlbefRandomAugment(2, 11)


def test_ops_are_drawn_uniformly_with_replacement():
    augment = AlbefRandomAugment(2, 7)
    drawn = []
    real = dict(tr.OPERATIONS)
    for name in ALBEF_OPS:
        tr.OPERATIONS[name] = lambda pixels, level, name=name: drawn.append(name) or pixels
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            for _ in range(3000):
                augment(_uniform())
    finally:
        tr.OPERATIONS.update(real)
    counts = np.array([drawn.count(name) for name in ALBEF_OPS])
    assert counts.sum() == pytest.approx(3000, rel=0.08)  # 6000 draws, half applied
    assert counts.min() > 0.7 * counts.mean() and counts.max() < 1.3 * counts.mean()


# ---------------------------------------------------------------- per-operation probability and magnitudes


def test_a_drawn_operation_is_skipped_half_the_time():
    pixels = _uniform((100, 100, 100))
    once = _outcomes(AlbefRandomAugment(1, 7, ops=("Brightness",)), pixels, range(600))
    values = [int(out[0, 0, 0]) for out in once]
    assert set(values) == {100, 136}  # brightness x1.36 at level 7, or nothing
    assert 0.44 < values.count(136) / 600 < 0.56
    twice = [int(out[0, 0, 0]) for out in _outcomes(AlbefRandomAugment(2, 7, ops=("Brightness",)), pixels, range(600))]
    assert set(twice) == {100, 136, 184}
    assert 0.19 < twice.count(100) / 600 < 0.31 and 0.19 < twice.count(184) / 600 < 0.31


@pytest.mark.parametrize("level", [3, 7, 10])
@pytest.mark.parametrize("axis", ["TranslateX", "TranslateY"])
def test_translate_moves_level_pixels_and_fills_grey(level, axis):
    pixels = _uniform(height=30, width=40)
    outs = _outcomes(AlbefRandomAugment(1, level, ops=(axis,)), pixels, range(60))
    seen = set()
    for out in outs:
        grey = _grey_mask(out)
        if not grey.any():
            assert torch.equal(out, pixels)
            seen.add("skipped")
            continue
        lines = grey.all(dim=0) if axis == "TranslateX" else grey.all(dim=1)  # fully grey columns / rows
        assert int(lines.sum()) == level and int(grey.sum()) == level * (30 if axis == "TranslateX" else 40)
        assert torch.equal(out[:, ~grey], pixels[:, ~grey])  # the rest is the image, moved
        seen.add("start" if lines[0] else "end")
    assert seen == {"skipped", "start", "end"}  # applied half the time, either direction


def _dilate(mask: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(3))) > 0


def test_rotate_is_21_degrees_about_the_centre_with_grey_fill():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()
    centre = (32.5, 24.5)  # ALBEF's (W/2, H/2) with pixel centres at integers is PIL's (W/2 + 0.5, H/2 + 0.5)
    for seed in range(6):
        torch.manual_seed(seed)
        out = tr._rotate(pixels, 7).permute(1, 2, 0).numpy().astype(int)
        matches = 0
        for angle in (21, -21):  # PIL rotates counter-clockwise, as cv2.getRotationMatrix2D does
            pil = np.asarray(image.rotate(angle, Image.BILINEAR, center=centre, fillcolor=GREY), int)
            fill = np.asarray(Image.new("L", image.size, 255).rotate(angle, center=centre, fillcolor=0)) == 0
            inside = ~_dilate(fill)
            inside[[0, -1], :] = inside[:, [0, -1]] = False  # PIL clamps at the frame, OpenCV reads grey beyond it
            if np.abs(out - pil)[inside].max() <= 1:
                matches += 1
                deep_fill = ~_dilate(~fill)
                assert deep_fill.mean() > 0.05 and (out[deep_fill] == 128).all()
        assert matches == 1


@pytest.mark.parametrize("axis", ["ShearX", "ShearY"])
def test_shear_is_0_21_with_grey_fill(axis):
    size = 60
    pixels = _uniform(height=size, width=size)
    applied = [o for o in _outcomes(AlbefRandomAugment(1, 7, ops=(axis,)), pixels, range(20)) if _grey_mask(o).any()]
    assert 4 <= len(applied) <= 16
    distance = torch.arange(size, dtype=torch.float32)
    for out in applied:
        grey = _grey_mask(out).float()
        per_line = grey.sum(dim=1) if axis == "ShearX" else grey.sum(dim=0)  # grey pixels per row / column
        # |shear| x distance from the line through the origin (the first row / column), for either sign
        assert (per_line - 0.21 * distance).abs().max() <= 1.5


@pytest.mark.parametrize("name", ["AutoContrast", "Equalize", "Brightness", "Sharpness"])
def test_photometric_ops_equal_pil(name):
    """ALBEF's numpy versions reproduce PIL's; these tensor versions must too (AutoContrast without ALBEF's uint8
    overflow, which whitens a channel whose minimum is above 0)."""
    rng = np.random.default_rng(1)
    array = rng.normal(120, 50, (40, 56, 3)).clip(7, 250).astype(np.uint8)
    image = Image.fromarray(array)
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    reference = {
        "AutoContrast": lambda: ImageOps.autocontrast(image),
        "Equalize": lambda: ImageOps.equalize(image),
        "Brightness": lambda: ImageEnhance.Brightness(image).enhance(1.36),
        "Sharpness": lambda: ImageEnhance.Sharpness(image).enhance(1.36),
    }[name]()
    out = tr.OPERATIONS[name](pixels, 7).permute(1, 2, 0).numpy()
    assert np.array_equal(out, np.asarray(reference))
    assert not np.array_equal(out, array)


# ---------------------------------------------------------------- decoding at reduced size, crop, normalisation


def test_jpeg_reduction_keeps_at_least_the_output_resolution():
    assert jpeg_reduction((600, 600), (256, 256)) == 2
    assert jpeg_reduction((1100, 1030), (256, 256)) == 4
    assert jpeg_reduction((2100, 2050), (256, 256)) == 8
    assert jpeg_reduction((520, 1100), (256, 256)) == 2
    assert jpeg_reduction((500, 2000), (256, 256)) == 1
    assert jpeg_reduction((480, 480), (256, 256)) == 1


def test_reduced_decode_stays_close_to_full_decode():
    data = _photo_like_jpeg(1024, 768, seed=0)
    crop = ReducedDecodeRandomResizedCrop(256, (0.2, 1.0), interpolation=InterpolationMode.BICUBIC)
    reduced = 0
    for seed in range(12):
        lazy = Image.open(io.BytesIO(data))
        torch.manual_seed(seed)
        fast = crop(lazy).float()
        reduced += lazy.width < 1024
        torch.manual_seed(seed)
        full = crop(Image.open(io.BytesIO(data)).convert("RGB")).float()  # decoded already: no reduction
        mse = (fast - full).pow(2).mean().item()
        assert (fast - full).abs().mean() < 2.5 and 10 * np.log10(255**2 / max(mse, 1e-9)) > 35
    assert 3 <= reduced <= 11  # large crops were decoded at half size, small ones at full size


def test_crop_matches_torchvision_random_resized_crop():
    image = Image.open(io.BytesIO(_photo_like_jpeg(320, 240, seed=2))).convert("RGB")
    ours = ReducedDecodeRandomResizedCrop(96, (0.2, 1.0), interpolation=InterpolationMode.BICUBIC)
    theirs = T.Compose([T.RandomResizedCrop(96, (0.2, 1.0), interpolation=InterpolationMode.BICUBIC), T.PILToTensor()])
    for seed in range(5):
        torch.manual_seed(seed)
        a = ours(image).float()
        torch.manual_seed(seed)
        b = theirs(image).float()
        assert (a - b).abs().mean() < 0.5


def test_normalize_equals_to_tensor_and_normalize():
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    reference = T.Compose([T.ToTensor(), T.Normalize(tr.CLIP_MEAN, tr.CLIP_STD)])(image)
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()
    assert torch.allclose(NormalizeUint8()(pixels), reference, atol=1e-5)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_any_image_mode_gives_three_channels(mode):
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 60)).convert(mode).save(buf, "JPEG" if mode in ("L", "CMYK") else "PNG")
    for transform in (train_transform(24), eval_transform(24)):
        out = transform(Image.open(io.BytesIO(buf.getvalue())))
        assert out.shape == (3, 24, 24) and out.dtype == torch.float32


def test_undecodable_bytes_raise_undecodable_image():
    data = _photo_like_jpeg(256, 192, seed=4)
    truncated = data[: len(data) * 6 // 10]  # the header is intact: PIL opens it and fails while decoding
    with pytest.raises(tr.UndecodableImage):
        eval_transform(16)(Image.open(io.BytesIO(truncated)))


def test_unnormalised_training_output_is_the_pixels_the_normalisation_reads():
    """train_transform(normalize=False), the trainer's loader: uint8 pixels that normalise on the device into exactly
    what the normalised pipeline returns for the same draws."""
    image_bytes = _photo_like_jpeg(96, 80, seed=3)
    for seed in range(5):
        outputs = []
        for normalize in (True, False):
            torch.manual_seed(seed)
            outputs.append(train_transform(48, normalize=normalize)(Image.open(io.BytesIO(image_bytes))))
        normalised, pixels = outputs
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 48, 48)
        assert torch.equal(NormalizeUint8()(pixels), normalised)
