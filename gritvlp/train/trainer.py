"""The pre-training loop: data, model, DeepSpeed engine, logging, checkpoints. One readable file."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from gritvlp.config import Config, save_config
from gritvlp.data.collate import Collator
from gritvlp.data.demo import ensure_demo_shards
from gritvlp.data.shards import ShardDataset
from gritvlp.data.text import load_tokenizer
from gritvlp.data.transforms import train_transform
from gritvlp.model.gritvlp import GritVLP
from gritvlp.sampling.order import EpochBatchSampler
from gritvlp.sampling.schedule import GritSchedule
from gritvlp.train import checkpoint
from gritvlp.train.engine import build_engine, load_ds_config, precision_dtype
from gritvlp.train.monitor import Monitor

log = logging.getLogger("gritvlp.train")

LOGGED_TERMS = ("loss", "itc", "consistency", "itm", "mlm", "itm_acc", "temp", "sim_pos", "sim_neg", "sim_itm_neg")
MAX_CONSECUTIVE_BAD_STEPS = 20


@dataclass
class RunState:
    epoch: int = 0
    global_step: int = 0  # optimiser steps
    micro_step: int = 0
    skipped_samples: int = 0
    nonfinite_steps: int = 0


def step_seed(seed: int, micro_step: int, rank: int, stream: str = "") -> int:
    """Model-side randomness (masking, dropout, sampled negatives) is a pure function of the step, so a
    resumed run draws exactly what an uninterrupted one would. Each `stream` gets its own seed, so that
    generators seeded for one step draw independent numbers."""
    tag = f"{seed}:{micro_step}:{rank}" + (f":{stream}" if stream else "")
    digest = hashlib.sha256(tag.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def prepare_data(cfg: Config) -> str:
    """The training shard pattern; makes the demo set on first run when no shards are configured."""
    if cfg.data.train_shards:
        return cfg.data.train_shards
    if is_main():
        ensure_demo_shards(
            cfg.data.demo_dir, cfg.data.demo_train_samples, cfg.data.demo_test_samples, seed=cfg.train.seed
        )
    barrier()
    train, _ = ensure_demo_shards(
        cfg.data.demo_dir, cfg.data.demo_train_samples, cfg.data.demo_test_samples, seed=cfg.train.seed
    )
    return train


def build_dataset(cfg: Config, pattern: str) -> ShardDataset:
    transform = train_transform(
        cfg.model.image_size, tuple(cfg.data.crop_scale), cfg.data.hflip, cfg.data.randaug_n, cfg.data.randaug_m
    )
    # Rank 0 builds (and caches) the shard index first, so ranks do not race writing it.
    if is_main():
        dataset = ShardDataset(pattern, transform, cfg.data.max_words, seed=cfg.train.seed)
    barrier()
    if not is_main():
        dataset = ShardDataset(pattern, transform, cfg.data.max_words, seed=cfg.train.seed)
    if dataset.num_truncated and is_main():
        log.warning("%d samples lost to truncated shards (see warnings above)", dataset.num_truncated)
    return dataset


def with_mlm_inputs(batch: dict, model: GritVLP, seed: int) -> dict:
    """The host batch plus its MLM inputs, drawn on the CPU from a generator seeded for this step."""
    if model.objectives.mlm_weight <= 0:
        return batch
    return {**batch, **model.prepare_mlm(batch["input_ids"], torch.Generator().manual_seed(seed))}


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Asynchronous copies: tensors the loader did not pin (the MLM inputs) are pinned first, because a copy
    from pageable memory may make the host wait for the device."""

    def pinned(t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory() if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned() else t

    out = {k: pinned(v).to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
    out["image"] = out["image"].to(dtype)
    return out


def reduce_mean(values: dict[str, torch.Tensor], device) -> dict[str, float]:
    """Averages scalars over ranks in one collective (only on logging steps)."""
    names = sorted(values)
    stacked = torch.stack([values[n].detach().float().reshape(()).to(device) for n in names])
    if dist.is_initialized():
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(names, stacked.tolist()))


class NonFiniteGuard:
    """Counts non-finite losses on the device, so a step never waits to learn whether its loss was finite.

    `consecutive` is the run of non-finite micro-steps ending at the latest one, `in_window` how many there
    were since the last check. check() reads both (max over ranks) where the host synchronises anyway:
    logging steps, checkpoints and the end of the run.
    """

    def __init__(self, device: torch.device, consecutive: int = 0, global_step: int = 0):
        self.consecutive = torch.tensor(consecutive, dtype=torch.long, device=device)
        self.in_window = torch.zeros((), dtype=torch.long, device=device)
        self.checked_step = global_step

    def update(self, finite: torch.Tensor) -> None:
        self.consecutive = torch.where(finite, 0, self.consecutive + 1)
        self.in_window += (~finite).long()

    def check(self, global_step: int) -> int:
        """Warns about non-finite losses since the last check; raises FloatingPointError after
        MAX_CONSECUTIVE_BAD_STEPS in a row (before any checkpoint of their weights is written).
        Returns the consecutive count."""
        counts = torch.stack([self.consecutive, self.in_window])
        if dist.is_initialized():
            dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        consecutive, in_window = counts.tolist()
        self.in_window.zero_()
        if in_window and is_main():
            log.warning(
                "%d non-finite losses in steps %d-%d: each was replaced by zero before backward",
                in_window, self.checked_step + 1, global_step,
            )  # fmt: skip
        self.checked_step = global_step
        if consecutive >= MAX_CONSECUTIVE_BAD_STEPS:
            raise FloatingPointError(f"{consecutive} consecutive non-finite losses; the last checkpoint is kept intact")
        return consecutive


def forward_backward(engine, batch: dict, usable: bool, guard: NonFiniteGuard) -> tuple[dict, torch.Tensor]:
    """One micro-step's forward and backward; a non-finite loss (or a stand-in batch) backpropagates zero.
    Returns the model's outputs and the device flag of a finite loss."""
    out = engine(batch)
    finite = torch.isfinite(out["loss"])
    guard.update(finite)
    engine.backward(torch.where(finite, out["loss"], 0.0) * (1.0 if usable else 0.0))
    return out, finite


def bank_features(out: dict, finite: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's features for the GRIT bank, zeroed where the step or the value is not finite (a zero feature
    is equally similar to every sample; a NaN would poison the grouping)."""
    return tuple(torch.where(finite & torch.isfinite(f), f, 0.0) for f in (out["image_feat"], out["text_feat"]))


def train(cfg: Config, ds_config_path: str, resume: str | None = None) -> RunState:
    use_cuda = torch.cuda.is_available()
    ds_config = load_ds_config(ds_config_path, use_cuda)
    if cfg.train.lr is not None:
        ds_config.setdefault("optimizer", {}).setdefault("params", {})["lr"] = cfg.train.lr
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    elif is_main():
        log.warning("no CUDA device: running on CPU in fp32 with the gloo backend")
    output_dir = Path(cfg.train.output_dir)
    if is_main():
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank

    pattern = prepare_data(cfg)
    dataset = build_dataset(cfg, pattern)
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    special = {
        "pad": tokenizer.pad_token_id,
        "cls": tokenizer.cls_token_id,
        "sep": tokenizer.sep_token_id,
        "mask": tokenizer.mask_token_id,
    }
    model = GritVLP(cfg.model, cfg.objectives, special_tokens=special)
    if len(tokenizer) > model.text.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the BERT config only {model.text.config.vocab_size}"
        )

    micro_batch = ds_config["train_micro_batch_size_per_gpu"]
    grad_accum = ds_config.get("gradient_accumulation_steps", 1)
    sampler = EpochBatchSampler(len(dataset), micro_batch, rank=rank, world_size=world, seed=cfg.train.seed)
    schedule = None
    if cfg.sampling.grit:
        schedule = GritSchedule(
            len(dataset), micro_batch, world, cfg.sampling.bank_size, cfg.sampling.search_space,
            cfg.sampling.shuffle_batches, group_ids=dataset.group_ids, seed=cfg.train.seed,
        )  # fmt: skip
    steps_per_epoch = len(sampler) // grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} samples make no full optimiser step of {micro_batch} x {grad_accum} x {world}")
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps > 0:
        total_steps = min(total_steps, cfg.train.max_steps)
    engine, _, _ = build_engine(model, ds_config, total_steps, cfg.train.warmup_steps, cfg.train.min_lr_ratio)
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        # The MLM decoder reuses the word embeddings outside their module's forward.
        deepspeed.zero.register_external_parameter(engine.module.mlm_head, engine.module.text.embeddings.word_embeddings.weight)
    dtype = precision_dtype(ds_config)

    model = engine.module
    state = RunState()
    target = checkpoint.resolve_resume(resume, output_dir)
    if target is not None:
        client, rank_state = checkpoint.load(engine, *target)
        state = RunState(**client["run_state"])
        sampler.load_state_dict(client["sampler"])
        if schedule is not None and "grit" in client and rank_state is not None:
            schedule.load_state_dict(client["grit"])
            schedule.bank.load_state_dict(rank_state["bank"])
        elif schedule is not None and is_main():
            log.warning("the checkpoint holds no GRIT state: this epoch's features start from empty banks")
    else:
        sampler.set_epoch(0)

    collator = Collator(tokenizer, cfg.data.max_tokens)
    monitor = Monitor(output_dir, total_steps, state.global_step, enabled=is_main())
    if is_main():
        log.info(
            "%d samples, %d ranks x %d per rank x %d accumulation, %d steps per epoch, %d steps in all",
            len(dataset), world, micro_batch, grad_accum, steps_per_epoch, total_steps,
        )  # fmt: skip

    def client_state() -> dict:
        return {
            "run_state": vars(state).copy(),
            "sampler": sampler.state_dict(),
            "config": cfg.to_dict(),
            "model_config": engine.module.config_dict(),
            "grit": schedule.state_dict() if schedule is not None else None,
        }

    guard = NonFiniteGuard(device, state.nonfinite_steps, state.global_step)

    def check_finite() -> None:
        state.nonfinite_steps = guard.check(state.global_step)

    def save() -> None:
        check_finite()  # raises before weights of a diverged run can replace the last good checkpoint
        rank_state = {"bank": schedule.bank.state_dict()} if schedule is not None else None
        checkpoint.save(engine, output_dir, state.global_step, client_state(), cfg.train.keep_checkpoints, rank_state)

    fallback_batch = None  # last good batch: stands in (with zero loss) when skips empty a batch
    window = {"samples": 0, "steps": 0}
    done = state.global_step >= total_steps
    while not done and state.epoch < cfg.train.epochs:
        dataset.set_epoch(state.epoch)
        epoch_start, grouping_seconds = monitor.clock(), 0.0
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collator,
            num_workers=cfg.data.num_workers,
            pin_memory=use_cuda,
            persistent_workers=False,
        )
        for host_batch in loader:
            sampler.advance()
            state.skipped_samples += host_batch["num_skipped"]
            usable = host_batch["input_ids"].shape[0] >= 2
            if usable:
                fallback_batch = host_batch
            elif fallback_batch is None:
                raise RuntimeError("the first batch of the run has fewer than 2 readable samples: check the data")
            mlm_seed = step_seed(cfg.train.seed, state.micro_step, rank, "mlm")
            step_batch = with_mlm_inputs(host_batch if usable else fallback_batch, model, mlm_seed)
            batch = to_device(step_batch, device, dtype)

            torch.manual_seed(step_seed(cfg.train.seed, state.micro_step, rank))
            out, finite = forward_backward(engine, batch, usable, guard)
            if schedule is not None:
                if usable:
                    schedule.add(*bank_features(out, finite), batch["index"])
                grouping_seconds += schedule.tick(state.epoch)  # a collective: every rank, every micro-step
            lr = engine.get_lr()[0]  # the rate this step uses; step() advances the schedule
            engine.step()
            state.micro_step += 1
            window["samples"] += host_batch["input_ids"].shape[0] if usable else 0
            if state.micro_step % grad_accum:
                continue
            state.global_step += 1
            window["steps"] += 1
            monitor.step()

            if state.global_step % cfg.train.log_every == 0 or state.global_step == total_steps:
                check_finite()
                scalars = reduce_mean({k: out[k] for k in LOGGED_TERMS if k in out}, device)
                seconds = monitor.elapsed()
                samples = reduce_mean({"n": torch.tensor(float(window["samples"]))}, device)["n"] * world
                logged = {f"loss/{k}": v for k, v in scalars.items() if k in ("itc", "consistency", "itm", "mlm")}
                logged["loss/total"] = scalars["loss"]
                logged.update({f"train/{k}": v for k, v in scalars.items() if k in ("itm_acc", "temp")})
                logged.update({f"similarity/{k[4:]}": v for k, v in scalars.items() if k.startswith("sim_")})
                logged["train/lr"] = lr
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:
                    logged["train/grad_norm"] = float(grad_norm)
                logged["perf/samples_per_s"] = samples / max(seconds, 1e-9)
                logged["perf/step_time_s"] = seconds / window["steps"]
                logged["data/skipped_samples"] = float(state.skipped_samples)
                monitor.log(state.global_step, logged)
                window.update(samples=0, steps=0)

            if state.global_step % cfg.train.save_every == 0:
                save()
            if state.global_step >= total_steps:
                done = True
                break
        else:
            order = None
            if schedule is not None:
                order = schedule.next_epoch_order(state.epoch + 1)
                grouping_seconds += schedule.last_seconds
                epoch_seconds = monitor.clock() - epoch_start
                monitor.log(
                    state.global_step,
                    {"grit/grouping_time_s": grouping_seconds, "grit/grouping_share": grouping_seconds / epoch_seconds},
                )
            state.epoch += 1
            sampler.set_epoch(state.epoch, order)
    if state.global_step % cfg.train.save_every != 0:
        save()  # checks the loss counters first
    else:
        check_finite()
    monitor.close()
    if is_main():
        log.info("finished at step %d; checkpoints in %s", state.global_step, checkpoint.checkpoint_dir(output_dir))
        if cfg.train.export_fp16:
            export_final(output_dir)
    barrier()
    return state


def export_final(output_dir: Path) -> None:
    """fp16 weights for fine-tuning; a failure here is reported, the checkpoint stays the source of truth."""
    from gritvlp.export import export_fp16

    try:
        export_fp16(checkpoint.checkpoint_dir(output_dir), output_dir / "export_fp16")
    except (ValueError, OSError) as err:
        log.error("fp16 export failed (%s); the checkpoint is intact: export it with scripts/export_fp16.py", err)
