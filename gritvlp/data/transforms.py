"""Image transforms of ALBEF-style pre-training: PIL RGB image -> normalised float tensor [3, S, S]."""

from __future__ import annotations

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class AlbefRandAugment(T.RandAugment):
    """torchvision's RandAugment limited to ALBEF's operations, with magnitude on ALBEF's 0-10 scale.

    ALBEF has no Color, Contrast, Posterize or Solarize: they change hues, which would make colour words in
    captions false. 11 magnitude bins put m=7 at 70% of each op's range, as ALBEF's level 7 of 10 does.
    """

    OPS = tuple(
        "Identity AutoContrast Equalize Brightness Sharpness ShearX ShearY TranslateX TranslateY Rotate".split()
    )

    def __init__(self, num_ops: int = 2, magnitude: int = 7):
        if not 0 <= magnitude <= 10:
            raise ValueError(f"RandAugment magnitude must be in 0..10, got {magnitude}")
        super().__init__(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=11)

    def _augmentation_space(self, num_bins, image_size):
        space = super()._augmentation_space(num_bins, image_size)
        return {name: space[name] for name in self.OPS}


def train_transform(image_size: int, crop_scale=(0.2, 1.0), hflip=True, randaug_n=2, randaug_m=7) -> T.Compose:
    ops = [T.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=InterpolationMode.BICUBIC)]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    if randaug_n > 0:
        ops.append(AlbefRandAugment(randaug_n, randaug_m))
    ops += [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    return T.Compose(ops)


def eval_transform(image_size: int) -> T.Compose:
    return T.Compose(
        [
            T.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
