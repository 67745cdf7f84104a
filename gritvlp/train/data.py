"""Training data: the shard pattern (the demo set on first run), the augmented dataset, the tokenizer, the loader."""

from __future__ import annotations

import logging

import torch.distributed as dist
from torch.utils.data import DataLoader

from gritvlp.config import Config
from gritvlp.data.collate import Collator
from gritvlp.data.demo import ensure_demo_shards
from gritvlp.data.encoded_images import HostDrawTransform
from gritvlp.data.shards import ShardDataset
from gritvlp.data.text import load_tokenizer
from gritvlp.data.transforms import train_transform

log = logging.getLogger("gritvlp.train")


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def demo_shards(cfg: Config) -> tuple[str, str]:
    """(train, test) patterns of the demo set, made on first use (by rank 0; the others wait, then find it)."""
    demo = (cfg.data.demo_dir, cfg.data.demo_train_samples, cfg.data.demo_test_samples)
    if is_main():
        ensure_demo_shards(*demo, seed=cfg.train.seed)
    barrier()
    return ensure_demo_shards(*demo, seed=cfg.train.seed)


def training_shards(cfg: Config) -> str:
    """The training shard pattern: data.train_shards, or the demo set when none are configured."""
    return cfg.data.train_shards or demo_shards(cfg)[0]


def demo_test_shards(cfg: Config) -> str:
    """The demo set's held-out split (its (shape, colour) pairs never occur in training)."""
    return demo_shards(cfg)[1]


def training_dataset(cfg: Config) -> ShardDataset:
    transform = train_transform(
        cfg.model.image_size, tuple(cfg.data.crop_scale), cfg.data.hflip, cfg.data.randaug_n, cfg.data.randaug_m,
        normalize=False,  # uint8 pixels to the device, normalised there (train/step.py)
    )  # fmt: skip
    if cfg.data.image_decode == "device":  # workers draw and pass the bytes on; the step decodes (train/step.py)
        transform = HostDrawTransform(transform)
    pattern = training_shards(cfg)
    options = {
        "seed": cfg.train.seed,
        "index_dir": cfg.data.index_dir,
        # precomputed teacher targets (scripts/precompute_concepts.py) live in KEY.json: read it only to distil
        "read_concepts": cfg.model.teacher_name is not None,
    }
    # Rank 0 builds (and caches) the shard index first, so ranks do not race writing it.
    if is_main():
        dataset = ShardDataset(pattern, transform, cfg.data.max_words, **options)
    barrier()
    if not is_main():
        dataset = ShardDataset(pattern, transform, cfg.data.max_words, **options)
    if dataset.num_truncated and is_main():
        log.warning("%d samples lost to truncated shards (see warnings above)", dataset.num_truncated)
    return dataset


def tokenizer_and_special_tokens(cfg: Config):
    tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.text_format)
    special = {
        "pad": tokenizer.pad_token_id,
        "cls": tokenizer.cls_token_id,
        "sep": tokenizer.sep_token_id,
        "mask": tokenizer.mask_token_id,
    }
    return tokenizer, special


def epoch_loader(dataset: ShardDataset, sampler, collator: Collator, cfg: Config, pin_memory: bool) -> DataLoader:
    """A loader over the sampler's current position; built per epoch (the sampler's order changes)."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=cfg.data.num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
