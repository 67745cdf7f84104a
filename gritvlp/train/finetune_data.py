"""Retrieval fine-tuning data: the training captions (shards or an ALBEF annotation file) and the test set."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from gritvlp.data.shards import ShardDataset, augmentation_seed
from gritvlp.data.text import clean_caption
from gritvlp.data.transforms import UndecodableImage, train_transform
from gritvlp.eval.data import RetrievalSet, from_karpathy, from_shards

log = logging.getLogger("gritvlp.train")


class AnnotationDataset(Dataset):
    """ALBEF's retrieval training file ([{"image": relative path, "caption": str or [str], "image_id": optional}])
    with ShardDataset's items: {"image", "caption", "index", "group_id"} per caption, None for an unreadable image.
    Captions of one image (same image_id, else same path) share a group id."""

    def __init__(self, ann_file: str | Path, image_root: str | Path, transform, max_words: int = 30, seed: int = 0):
        self.image_root, self.transform, self.seed, self.epoch = Path(image_root), transform, seed, 0
        self.paths, self.captions, group_ids, group_of = [], [], [], {}
        for entry in json.loads(Path(ann_file).read_text()):
            group = group_of.setdefault(str(entry.get("image_id", entry["image"])), len(group_of))
            texts = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
            for text in texts:
                self.paths.append(entry["image"])
                self.captions.append(clean_caption(text, max_words))
                group_ids.append(group)
        if not self.paths:
            raise ValueError(f"{ann_file} holds no caption")
        self.group_ids = torch.tensor(group_ids, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict | None:
        path = self.image_root / self.paths[index]
        with torch.random.fork_rng(devices=[]):  # augmentation draws depend on (seed, epoch, index) only
            torch.default_generator.manual_seed(augmentation_seed(self.seed, self.epoch, index))
            try:
                with Image.open(path) as image:
                    pixels = self.transform(image)
            except (OSError, UndecodableImage) as err:
                log.warning("skipping %s: %s", path, err)
                return None
        return {"image": pixels, "caption": self.captions[index], "index": index, "group_id": int(self.group_ids[index])}  # fmt: skip


def training_dataset(cfg) -> Dataset:
    """The augmented training captions of a FinetuneConfig: ALBEF's fine-tuning augmentation by default."""
    transform = train_transform(cfg.image_size, tuple(cfg.crop_scale), cfg.hflip, cfg.randaug_n, cfg.randaug_m)
    if cfg.train_shards:
        return ShardDataset(cfg.train_shards, transform, cfg.max_words, seed=cfg.seed)
    return AnnotationDataset(cfg.train_ann, cfg.image_root, transform, cfg.max_words, seed=cfg.seed)


def retrieval_test_set(cfg, progress: bool) -> RetrievalSet:
    if cfg.test_shards:
        return from_shards(cfg.test_shards, cfg.image_size, cfg.max_words, progress=progress)
    return from_karpathy(cfg.test_ann, cfg.test_image_root or cfg.image_root, cfg.image_size, cfg.max_words)
