"""Training data: the shard pattern (the demo set on first run), the augmented dataset, the tokenizer, the loader."""

from __future__ import annotations

import logging

import torch.distributed as dist
from torch.utils.data import DataLoader

from gritvlp.config import Config
from gritvlp.data.collate import Collator
from gritvlp.data.demo import ensure_demo_shards
from gritvlp.data.shards import ShardDataset
from gritvlp.data.text import load_tokenizer
from gritvlp.data.transforms import train_transform

log = logging.getLogger("gritvlp.train")


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def training_shards(cfg: Config) -> str:
    """The training shard pattern; makes the demo set on first run when no shards are configured."""
    if cfg.data.train_shards:
        return cfg.data.train_shards
    demo = (cfg.data.demo_dir, cfg.data.demo_train_samples, cfg.data.demo_test_samples)
    if is_main():  # rank 0 writes the demo set; the others wait, then find it made
        ensure_demo_shards(*demo, seed=cfg.train.seed)
    barrier()
    train, _ = ensure_demo_shards(*demo, seed=cfg.train.seed)
    return train


def training_dataset(cfg: Config) -> ShardDataset:
    transform = train_transform(
        cfg.model.image_size, tuple(cfg.data.crop_scale), cfg.data.hflip, cfg.data.randaug_n, cfg.data.randaug_m
    )
    pattern = training_shards(cfg)
    # Rank 0 builds (and caches) the shard index first, so ranks do not race writing it.
    if is_main():
        dataset = ShardDataset(pattern, transform, cfg.data.max_words, seed=cfg.train.seed)
    barrier()
    if not is_main():
        dataset = ShardDataset(pattern, transform, cfg.data.max_words, seed=cfg.train.seed)
    if dataset.num_truncated and is_main():
        log.warning("%d samples lost to truncated shards (see warnings above)", dataset.num_truncated)
    return dataset


def tokenizer_and_special_tokens(cfg: Config):
    tokenizer = load_tokenizer(cfg.model.tokenizer)
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
