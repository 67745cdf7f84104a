"""Retrieval test sets: the unique images, every caption, and which image each caption describes.

Two sources: img2dataset shards read by ShardDataset (one sample per caption; samples sharing a group id
show the same image) and ALBEF's Karpathy-style annotation files ([{"image": path, "caption": [...]}]).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from gritvlp.data.text import clean_caption
from gritvlp.data.transforms import eval_transform

log = logging.getLogger("gritvlp.eval")


@dataclass
class RetrievalSet:
    """images[i] is image i as a tensor [3, S, S]; caption c describes image txt2img[c]."""

    images: Dataset
    captions: list[str]
    txt2img: torch.Tensor

    def __post_init__(self):
        self.txt2img = torch.as_tensor(self.txt2img, dtype=torch.long)
        if len(self.captions) != len(self.txt2img):
            raise ValueError(f"{len(self.captions)} captions but {len(self.txt2img)} caption-to-image links")
        described = torch.zeros(len(self.images), dtype=torch.bool)
        described[self.txt2img] = True
        if not described.all():
            raise ValueError(f"{int((~described).sum())} image(s) have no caption")

    @property
    def num_images(self) -> int:
        return len(self.images)


class ImageFiles(Dataset):
    def __init__(self, paths: list[Path], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.paths[index]) as image:
            return self.transform(image)


class SampleImages(Dataset):
    """The images of chosen samples of a caption dataset (one sample per unique image)."""

    def __init__(self, samples: Dataset, indices: list[int]):
        self.samples, self.indices = samples, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> torch.Tensor:
        sample = self.samples[self.indices[index]]
        if sample is None:  # it was readable when the captions were collected
            raise RuntimeError(f"sample {self.indices[index]} became unreadable during evaluation")
        return sample["image"]


def from_karpathy(ann_file: str | Path, image_root: str | Path, image_size: int, max_words: int = 30) -> RetrievalSet:
    """ALBEF's coco_test.json / flickr30k_test.json: entries naming one image and its captions; captions are
    cleaned as ALBEF's pre_caption does. Entries naming the same image are merged."""
    entries = json.loads(Path(ann_file).read_text())
    image_of_path: dict[str, int] = {}
    captions, txt2img = [], []
    for entry in entries:
        image_id = image_of_path.setdefault(entry["image"], len(image_of_path))
        texts = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        for text in texts:
            captions.append(clean_caption(text, max_words))
            txt2img.append(image_id)
    paths = [Path(image_root) / path for path in image_of_path]
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"{len(absent)} image(s) of {ann_file} not found, e.g. {absent[:3]}")
    return RetrievalSet(ImageFiles(paths, eval_transform(image_size)), captions, txt2img)


def from_shards(
    pattern: str,
    image_size: int,
    max_words: int = 30,
    num_workers: int = 0,
    progress: bool = True,
    index_dir: str | None = None,
) -> RetrievalSet:
    """The retrieval set of img2dataset shards; index_dir: where their sample index lives (ShardDataset's)."""
    from gritvlp.data.shards import ShardDataset

    dataset = ShardDataset(pattern, eval_transform(image_size), max_words=max_words, index_dir=index_dir)
    return from_samples(dataset, num_workers=num_workers, progress=progress)


def from_samples(dataset: Dataset, num_workers: int = 0, progress: bool = True) -> RetrievalSet:
    """A retrieval set from a caption dataset whose items are {"image", "caption", "index", "group_id"} or None
    (ShardDataset's): one image per group id, the first readable sample's."""
    image_of_group: dict[int, int] = {}
    image_samples, captions, txt2img, skipped = [], [], [], 0
    for sample in _caption_samples(dataset, num_workers, progress):
        if sample is None:
            skipped += 1
            continue
        group = sample.get("group_id", sample["index"])
        if group not in image_of_group:
            image_of_group[group] = len(image_samples)
            image_samples.append(sample["index"])
        captions.append(sample["caption"])
        txt2img.append(image_of_group[group])
    if skipped:
        log.warning("%d unreadable sample(s) left out of the retrieval set", skipped)
    if not captions:
        raise ValueError("the dataset holds no readable sample")
    return RetrievalSet(SampleImages(dataset, image_samples), captions, txt2img)


def _caption_samples(dataset: Dataset, num_workers: int, progress: bool):
    """Every sample, without transforming its image (the captions pass needs only captions and group ids)."""
    view = copy.copy(dataset)
    if hasattr(view, "transform"):
        view.transform = _no_image
    loader = DataLoader(view, batch_size=128, num_workers=num_workers, collate_fn=_as_list)
    for batch in tqdm(loader, desc="reading captions", disable=not progress):
        yield from batch


def _no_image(image) -> torch.Tensor:
    return torch.empty(0)


def _as_list(samples: list) -> list:
    return samples
