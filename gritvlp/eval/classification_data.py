"""Image classification sets for zero-shot evaluation and probing: images, one label each, and the class names.

Three sources: an image folder with one sub-folder per class (torchvision's ImageFolder layout), img2dataset-style
shards whose KEY.json holds a label (a class index, or a class name), and the demo set's single-object test images
classified by shape, colour or size.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from itertools import product

import torch
from PIL import Image
from torch.utils.data import Dataset

from gritvlp.data.transforms import eval_transform

log = logging.getLogger("gritvlp.eval")


@dataclass
class ClassificationSet:
    """images[i] is a tensor [3, S, S] of class labels[i]; classnames[c] names class c; templates turn a class name
    into prompts ("a photo of a {c}."), or map each class name to its own prompts (CLIP_benchmark's layout)."""

    name: str
    images: Dataset
    labels: torch.Tensor
    classnames: list[str]
    templates: list[str] | dict[str, list[str]]

    def __post_init__(self):
        self.labels = torch.as_tensor(self.labels, dtype=torch.long)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < len(self.classnames):
            raise ValueError(f"{self.name}: labels must lie in [0, {len(self.classnames)})")

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


class TensorImages(Dataset):
    def __init__(self, images: list[torch.Tensor]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


class FolderImages(Dataset):
    """torchvision's ImageFolder, yielding the image tensor only (labels are held by the ClassificationSet)."""

    def __init__(self, root: str, image_size: int):
        from torchvision.datasets import ImageFolder

        self.folder = ImageFolder(root, transform=eval_transform(image_size), loader=Image.open)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.folder[index][0]


def from_image_folder(root: str, image_size: int, classnames: list[str] | None, templates, name: str = "folder"):
    """root/<class>/<image>: classes in sorted folder order, as ImageFolder sorts them. classnames (same order)
    replace the folder names in the prompts; without them a folder name is used with '_' read as a space."""
    images = FolderImages(root, image_size)
    folders = images.folder.classes
    if classnames is not None and len(classnames) != len(folders):
        raise ValueError(f"{len(classnames)} class names for {len(folders)} class folders in {root}")
    names = classnames if classnames is not None else [folder.replace("_", " ") for folder in folders]
    return ClassificationSet(name, images, images.folder.targets, names, templates)


class ShardImages(Dataset):
    """The images of chosen samples of a ShardDataset."""

    def __init__(self, samples, indices: list[int]):
        self.samples, self.indices = samples, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> torch.Tensor:
        sample = self.samples[self.indices[index]]
        if sample is None:
            raise RuntimeError(f"sample {self.indices[index]} became unreadable during evaluation")
        return sample["image"]


def label_of(meta: dict, label_key: str, classnames: list[str]) -> int:
    """KEY.json's label: a class index, or a class name (one of classnames)."""
    value = meta.get(label_key) if isinstance(meta, dict) else None
    if isinstance(value, bool) or value is None:
        raise KeyError(f"no {label_key!r} in KEY.json")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value in classnames:
        return classnames.index(value)
    raise KeyError(f"{label_key!r} is {value!r}: neither a class index nor one of the class names")


def from_labelled_shards(pattern: str, image_size: int, label_key: str, classnames: list[str], templates,
                         name: str = "shards", index_dir: str | None = None) -> ClassificationSet:  # fmt: skip
    """Every sample of the shards whose KEY.json holds `label_key`; samples without a readable label are counted
    and left out (an error when none has one)."""
    from gritvlp.data.shards import ShardDataset

    samples = ShardDataset(pattern, eval_transform(image_size), index_dir=index_dir)
    indices, labels, unlabelled = [], [], 0
    for index in range(len(samples)):
        span = samples.index.json_member(index)
        if span[1] < 0:
            unlabelled += 1
            continue
        shard_id = samples.index.sample(index)[0]
        (data,) = samples._reader.read_ranges(shard_id, [span])
        try:
            labels.append(label_of(json.loads(data), label_key, classnames))
        except (KeyError, ValueError):
            unlabelled += 1
            continue
        indices.append(index)
    if not indices:
        raise ValueError(f"no sample of {pattern!r} has a usable {label_key!r} in its KEY.json")
    if unlabelled:
        log.warning("%d sample(s) without a usable %r left out", unlabelled, label_key)
    return ClassificationSet(name, ShardImages(samples, indices), labels, classnames, templates)


# ---------------------------------------------------------------- the demo set's attributes

DEMO_ATTRIBUTES = ("shape", "colour", "size")


def demo_templates(attribute: str) -> list[str]:
    """The demo grammar's description "a <size> <colour> <shape>" with the classified attribute as {c} and every
    combination of the other two: the class embedding averages over what the prompt does not know."""
    from gritvlp.data.demo import COLOURS, SHAPES, SIZES

    values = {"size": SIZES, "colour": tuple(COLOURS), "shape": SHAPES}
    others = [a for a in ("size", "colour", "shape") if a != attribute]
    templates = []
    for combo in product(*(values[a] for a in others)):
        words = dict(zip(others, combo), **{attribute: "{c}"})
        templates.append(f"a {words['size']} {words['colour']} {words['shape']}")
    return templates


def demo_classnames(attribute: str) -> list[str]:
    from gritvlp.data.demo import COLOURS, SHAPES, SIZES

    return list({"size": SIZES, "colour": tuple(COLOURS), "shape": SHAPES}[attribute])


def demo_attribute_sets(pattern: str, image_size: int) -> list[ClassificationSet]:
    """One set per attribute over the demo shards' single-object images (each image once), labelled from the
    scene's object. In the test split these objects are all (shape, colour) pairs never seen in training."""
    from gritvlp.eval.hard_negatives import demo_scenes

    transform = eval_transform(image_size)
    images, objects, seen = [], [], set()
    for scene in demo_scenes(pattern):
        if scene["image_id"] in seen or len(scene["objects"]) != 1:
            continue
        seen.add(scene["image_id"])
        with Image.open(io.BytesIO(scene["jpg"])) as image:
            images.append(transform(image))
        objects.append(scene["objects"][0])
    if not images:
        raise ValueError(f"no single-object demo image in {pattern!r}")
    pixels = TensorImages(images)
    sets = []
    for attribute in DEMO_ATTRIBUTES:
        names = demo_classnames(attribute)
        labels = [names.index(obj[attribute]) for obj in objects]
        sets.append(ClassificationSet(attribute, pixels, labels, names, demo_templates(attribute)))
    return sets
