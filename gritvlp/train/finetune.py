"""Image-text retrieval fine-tuning from an fp16 export, as ALBEF and GRIT-VLP fine-tune on COCO and Flickr30k.

The exported model is rebuilt at the fine-tuning resolution (position embeddings resampled), trained with ITC + ITM
(captions of one image are positives: gritvlp.objectives.retrieval) under DeepSpeed by one of RECIPES, and evaluated
on the test set after every epoch with ALBEF's protocol (gritvlp.eval.retrieval), the ITC ranking alone beside the
re-ranked one. Every epoch ends with a checkpoint (with the momentum encoder and the queue, when the recipe has them);
the epoch with the best selection metric (`select`) is exported as an fp16 folder (`best_fp16`) that
GritVLP.from_pretrained loads. A resumed run continues at the epoch after its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from gritvlp.albef import resample_pos_embed
from gritvlp.data.collate import Collator
from gritvlp.eval.hard_negatives import evaluate_hard_negatives, hard_negative_set
from gritvlp.eval.loading import load_model_tokenizer
from gritvlp.eval.retrieval import RERANK_SCORES, default_k_test, evaluate_retrieval
from gritvlp.export import fp32_state_dict, load_exported_state, to_fp16
from gritvlp.model.gritvlp import WEIGHTS_NAME, GritVLP
from gritvlp.objectives.momentum import FeatureQueue, MomentumEncoder
from gritvlp.objectives.retrieval import (
    TERMS,
    MomentumInputs,
    QueueRetrievalObjective,
    RetrievalObjective,
    freeze_mlm_head,
    retrieval_objectives,
)
from gritvlp.sampling.order import EpochBatchSampler
from gritvlp.train import checkpoint
from gritvlp.train.data import barrier, is_main
from gritvlp.train.distributed import init_distributed, reduce_mean, release_shared_memory
from gritvlp.train.engine import (
    build_engine,
    cosine_with_warmup,
    epoch_cosine,
    load_ds_config,
    precision_dtype,
    zero_stage,
)
from gritvlp.train.finetune_data import retrieval_test_set, training_dataset
from gritvlp.train.monitor import Monitor
from gritvlp.train.step import NonFiniteGuard, batch_or_fallback, forward_backward, optimizer_step, step_seed, to_device

log = logging.getLogger("gritvlp.train")

ALBEF_EPOCHS = {"coco": 5, "flickr30k": 10}
BEST_EXPORT = "best_fp16"
POS_EMBED = "vision.vit.pos_embed"
RECALL_KEYS = ("txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean")
SELECT_KEYS = {"rerank": "eval/r_mean", "itc": "eval/itc_r_mean"}  # what --select picks the best epoch by


@dataclass(frozen=True)
class Recipe:
    momentum: float  # EMA rate of the momentum encoder; 0: none (and no queue)
    queue_size: int  # momentum features (with image ids) kept as extra ITC candidates
    alpha: float  # momentum distillation weight, warmed up over the first epoch; 0: off
    lr_per_epoch: bool  # cosine stepped once per epoch (else per optimiser step, with warm-up)


RECIPES = {
    # ALBEF (configs/Retrieval_coco.yaml, Retrieval_flickr.yaml): momentum encoder, queue, distillation.
    "albef": Recipe(momentum=0.995, queue_size=65536, alpha=0.4, lr_per_epoch=True),
    # GRIT-VLP (configs/Retrieval_*.yaml): ALBEF's model and loop with distill false and a queue of 65,280.
    "grit": Recipe(momentum=0.995, queue_size=65280, alpha=0.0, lr_per_epoch=True),
    # No momentum encoder or queue: ITC over the local batch, each positive scored against the negatives only,
    # per-step cosine. Cheaper (no second encoder pass, no queue), and it offers GRIT's consistency term.
    "in-batch": Recipe(momentum=0.0, queue_size=0, alpha=0.0, lr_per_epoch=False),
}


@dataclass
class FinetuneConfig:
    """Defaults are ALBEF's retrieval recipe (configs/Retrieval_coco.yaml, Retrieval_flickr.yaml); momentum,
    queue_size and alpha default to the recipe's."""

    pretrained: str  # an export folder (config.json + model.safetensors)
    output_dir: str = "runs/finetune"
    train_shards: str | None = None  # img2dataset shards; samples of one image share a group id
    train_ann: str | None = None  # or ALBEF's training JSON, images under image_root
    image_root: str | None = None
    test_shards: str | None = None
    test_ann: str | None = None  # ALBEF's coco_test.json / flickr30k_test.json
    test_image_root: str | None = None  # default: image_root
    dataset: str = "coco"  # picks the defaults of epochs and k_test
    recipe: str = "albef"  # one of RECIPES
    momentum: float | None = None
    queue_size: int | None = None
    alpha: float | None = None
    epochs: int | None = None  # 5 COCO, 10 Flickr30k
    k_test: int | None = None  # None: 256 COCO, 128 Flickr30k, at most 12.8% of the test images (default_k_test)
    rerank_score: str = "itm"  # "itm" (ALBEF) or "itm+itc" (BLIP): see gritvlp.eval.retrieval
    select: str = "rerank"  # the best epoch by the re-ranked r_mean ("rerank") or the ITC ranking's ("itc")
    image_size: int = 384
    lr: float = 1e-5  # replaces the ds_config optimizer's lr
    min_lr_ratio: float = 0.1  # cosine from lr to 1e-6
    warmup_steps: int = 0
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = True  # off for the demo set, whose captions say left and right
    randaug_n: int = 2
    randaug_m: int = 7
    max_words: int = 30
    max_tokens: int = 30
    itm_negatives: str = "sample"  # sampled from the in-batch similarities (ALBEF and GRIT-VLP), or "hardest"
    consistency_weight: float = 0.0  # GRIT's consistency term (in-batch recipe only)
    hard_negative_shards: str | None = None  # demo test shards: the hard-negative benchmark after each epoch
    eval_batch_size: int = 64
    itm_batch_size: int = 256
    num_workers: int = 4
    seed: int = 42
    log_every: int = 10
    max_steps: int = 0  # > 0 stops early (tests, demos); the epoch it stops in counts as done
    keep_checkpoints: int = 1

    def __post_init__(self) -> None:
        if self.dataset not in ALBEF_EPOCHS:
            raise ValueError(f"dataset must be one of {sorted(ALBEF_EPOCHS)}, got {self.dataset!r}")
        if self.rerank_score not in RERANK_SCORES:
            raise ValueError(f"rerank_score must be one of {RERANK_SCORES}, got {self.rerank_score!r}")
        if bool(self.train_shards) == bool(self.train_ann):
            raise ValueError("give exactly one of train_shards and train_ann")
        if bool(self.test_shards) == bool(self.test_ann):
            raise ValueError("give exactly one of test_shards and test_ann")
        if self.train_ann and not self.image_root:
            raise ValueError("train_ann needs image_root")
        if self.test_ann and not (self.test_image_root or self.image_root):
            raise ValueError("test_ann needs test_image_root or image_root")
        if self.select not in SELECT_KEYS:
            raise ValueError(f"select must be one of {sorted(SELECT_KEYS)}, got {self.select!r}")
        if self.itm_negatives not in ("sample", "hardest"):
            raise ValueError(f"itm_negatives must be 'sample' or 'hardest', got {self.itm_negatives!r}")
        if self.k_test is not None and self.k_test <= 0:
            raise ValueError(f"k_test must be > 0, got {self.k_test}")
        self.epochs = self.epochs or ALBEF_EPOCHS[self.dataset]
        self._resolve_recipe()

    def _resolve_recipe(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {self.recipe!r}")
        recipe = RECIPES[self.recipe]
        if not recipe.queue_size:
            given = [k for k in ("momentum", "queue_size", "alpha") if getattr(self, k)]
            if given:
                raise ValueError(f"{', '.join(given)} need a recipe with a momentum encoder (albef, grit)")
        elif self.consistency_weight or self.warmup_steps:
            raise ValueError(f"consistency_weight and warmup_steps belong to the in-batch recipe, not {self.recipe}")
        for key in ("momentum", "queue_size", "alpha"):
            if getattr(self, key) is None:
                setattr(self, key, getattr(recipe, key))
        if recipe.queue_size and not (0 <= self.momentum < 1 and self.queue_size > 0 and 0 <= self.alpha < 1):
            raise ValueError(f"need 0 <= momentum < 1, queue_size > 0 and 0 <= alpha < 1, got {self.momentum}, "
                             f"{self.queue_size}, {self.alpha}")  # fmt: skip

    @property
    def has_momentum(self) -> bool:
        return RECIPES[self.recipe].queue_size > 0


@dataclass
class FinetuneState:
    epoch: int = 0  # epochs finished
    global_step: int = 0  # optimiser steps
    micro_step: int = 0
    skipped_samples: int = 0
    nonfinite_steps: int = 0
    best_score: float = -1.0  # of the selection metric
    best_epoch: int = 0  # 1-based; 0 before the first evaluation


# ---------------------------------------------------------------- model in, model out


def load_pretrained_at_size(folder: str | Path, image_size: int) -> GritVLP:
    """An export rebuilt for image_size (fp32): the position embeddings resampled bicubically to the new patch grid,
    as ALBEF's interpolate_pos_embed does; every other weight as exported."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: is it a folder written by export_fp16?")
    config = json.loads((folder / "config.json").read_text())
    config["model"] = {**config["model"], "image_size": image_size}
    model = GritVLP.from_config_dict(config)
    state = load_exported_state(folder)
    state[POS_EMBED] = resample_pos_embed(state[POS_EMBED].float(), model.vision.vit)  # fp32: no second rounding
    model.load_state_dict(state, strict=True)
    return model.float()


def export_checkpoint(tag_dir: Path, out_dir: Path, tokenizer) -> Path:
    """A checkpoint's fp32 master weights as an fp16 export folder, replacing out_dir only once fully written."""
    weights, model_config = fp32_state_dict(tag_dir)
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(to_fp16(weights), str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
    (staging / "config.json").write_text(json.dumps(model_config, indent=2))
    tokenizer.save_pretrained(str(staging))
    replace_folder(staging, out_dir)
    return out_dir


def replace_folder(new: Path, target: Path) -> None:
    old = target.with_name(target.name + ".old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- the loop


class FineTuner:
    def __init__(self, cfg: FinetuneConfig, ds_config_path: str):
        self.cfg = cfg
        self.use_cuda = torch.cuda.is_available()
        self.ds_config = load_ds_config(ds_config_path, self.use_cuda, lr=cfg.lr)
        if cfg.has_momentum and zero_stage(self.ds_config) == 3:
            raise ValueError(f"--recipe {cfg.recipe} updates its momentum encoder from the full parameters after every "
                             "step, which ZeRO-3 partitions: use ZeRO stage 0-2 (ds_configs/finetune_zero2.json) or "
                             "--recipe in-batch")  # fmt: skip
        self.device, self.rank, self.world = init_distributed(self.use_cuda)
        self.output_dir = Path(cfg.output_dir)
        if is_main():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "finetune_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        torch.manual_seed(cfg.seed)
        model = load_pretrained_at_size(cfg.pretrained, cfg.image_size)
        freeze_mlm_head(model)
        self.tokenizer = load_model_tokenizer(cfg.pretrained, model)
        self.momentum = self.queue = None
        if cfg.has_momentum:  # copied before DeepSpeed casts the model; fp32 (see gritvlp.objectives.momentum)
            self.momentum = MomentumEncoder(model, cfg.momentum).to(self.device)
            self.queue = FeatureQueue(cfg.queue_size, model.config.embed_dim, cfg.seed).to(self.device)
            self.objective = QueueRetrievalObjective(model, cfg.itm_negatives)
        else:
            self.objective = RetrievalObjective(model, retrieval_objectives(cfg.itm_negatives, cfg.consistency_weight))
        self._load_data()
        self.k_test = cfg.k_test or default_k_test(cfg.dataset, self.test_set.num_images)
        self.micro_batch = self.ds_config["train_micro_batch_size_per_gpu"]
        self.grad_accum = self.ds_config.get("gradient_accumulation_steps", 1)
        self.sampler = EpochBatchSampler(len(self.dataset), self.micro_batch, self.rank, self.world, cfg.seed)
        self.schedule_steps = self._schedule_steps()
        self.total_steps = min(self.schedule_steps, cfg.max_steps) if cfg.max_steps > 0 else self.schedule_steps
        self.engine = build_engine(self.objective, self.ds_config, self._lr_schedule())
        self.dtype = precision_dtype(self.ds_config)
        self._log_settings()
        self.collator = Collator(self.tokenizer, cfg.max_tokens)
        self.state = FinetuneState()
        self.guard = NonFiniteGuard(self.device)
        self.monitor: Monitor | None = None
        self.fallback_batch = None  # last good batch: stands in (with zero loss) when skips empty a batch

    def _load_data(self) -> None:
        """Rank 0 first, so that one process builds (and caches) the shard indexes."""
        for turn in (True, False):
            if is_main() == turn:
                self.dataset = training_dataset(self.cfg)
                self.test_set = retrieval_test_set(self.cfg, progress=is_main())
                shards = self.cfg.hard_negative_shards
                self.hard_negatives = hard_negative_set(shards, self.cfg.image_size) if shards else None
            barrier()

    def _lr_schedule(self):
        """ALBEF's and GRIT-VLP's cosine stepped per epoch, or (in-batch) per optimiser step after a warm-up."""
        cfg = self.cfg
        if RECIPES[cfg.recipe].lr_per_epoch:
            return epoch_cosine(self.schedule_steps // cfg.epochs, cfg.epochs, cfg.min_lr_ratio)
        return cosine_with_warmup(self.schedule_steps, cfg.warmup_steps, 1.0, cfg.min_lr_ratio)

    def _log_settings(self) -> None:
        if not is_main():
            return
        cfg = self.cfg
        if cfg.has_momentum:
            log.info("recipe %s: momentum encoder (EMA %g), queue of %d, distillation alpha %g, lr stepped per epoch",
                     cfg.recipe, cfg.momentum, cfg.queue_size, cfg.alpha)  # fmt: skip
        else:
            log.info("recipe in-batch: ITC over the local batch, lr stepped per optimiser step")
        source = "--k-test" if cfg.k_test else f"{cfg.dataset}'s value, at most 12.8% of the test images"
        log.info("evaluation: %d test images, top %d re-ranked by %s (%s); the best epoch is selected by %s",
                 self.test_set.num_images, self.k_test, cfg.rerank_score, source, SELECT_KEYS[cfg.select])  # fmt: skip

    def _schedule_steps(self) -> int:
        """Optimiser steps of all epochs: the learning-rate schedule spans them even when max_steps stops early, so
        a run stopped there and resumed follows the uninterrupted run exactly."""
        steps_per_epoch = len(self.sampler) // self.grad_accum
        if steps_per_epoch == 0:
            raise ValueError(f"{len(self.dataset)} samples make no optimiser step of {self.micro_batch} x {self.grad_accum}")  # fmt: skip
        if is_main():
            log.info("%d training captions, %d steps per epoch, %d epochs", len(self.dataset), steps_per_epoch, self.cfg.epochs)  # fmt: skip
        return steps_per_epoch * self.cfg.epochs

    def done(self) -> bool:
        return self.state.global_step >= self.total_steps

    def fit(self, resume: str | None = None) -> FinetuneState:
        self.resume(resume)
        self.monitor = Monitor(self.output_dir, self.total_steps, self.state.global_step, enabled=is_main())
        if self.monitor.bar is not None:
            self.monitor.bar.set_description("fine-tuning")
        while self.state.epoch < self.cfg.epochs and not self.done():
            self.train_epoch()
            self.end_epoch()
        self.monitor.close()
        if is_main():
            log.info("best %s %.2f after epoch %d: %s", SELECT_KEYS[self.cfg.select], self.state.best_score,
                     self.state.best_epoch, self.output_dir / BEST_EXPORT)  # fmt: skip
        barrier()
        if not self.use_cuda:
            release_shared_memory()
        return self.state

    def train_epoch(self) -> None:
        self.dataset.set_epoch(self.state.epoch)
        self.sampler.set_epoch(self.state.epoch)
        loader = DataLoader(
            self.dataset, batch_sampler=self.sampler, collate_fn=self.collator, num_workers=self.cfg.num_workers,
            pin_memory=self.use_cuda,
        )  # fmt: skip
        for host_batch in loader:
            self.train_step(host_batch)
            if self.done():
                return

    def train_step(self, host_batch: dict) -> None:
        batch, usable = self._device_batch(host_batch)
        torch.manual_seed(step_seed(self.cfg.seed, self.state.micro_step, self.rank))  # sampled ITM negatives
        momentum = self._momentum_inputs(batch) if self.momentum is not None else None
        out, _ = forward_backward(self.engine, batch, usable, self.guard, *([momentum] if momentum else []))
        if momentum is not None:  # after the loss has read the queue; a stand-in batch adds nothing (but gathers)
            rows = slice(None) if usable else slice(0, 0)
            self.queue.enqueue(momentum.image_feat[rows], momentum.text_feat[rows], batch["group_id"][rows])
            out["alpha"] = momentum.alpha
        lr = self.engine.get_lr()[0]  # the rate this step uses; step() advances the schedule
        optimizer_step(self.engine, self.objective.model)
        self.state.micro_step += 1
        if self.state.micro_step % self.grad_accum:
            return
        if self.momentum is not None:
            self.momentum.update(self.objective.model)  # the full parameters after the optimiser step
        self.state.global_step += 1
        self.monitor.step()
        if self.state.global_step % self.cfg.log_every == 0 or self.done():
            self.log_step(out, lr)

    def _momentum_inputs(self, batch: dict) -> MomentumInputs:
        """The momentum encoder's features of the batch (in the training precision), the queue as it stands, and
        the step's distillation weight: ALBEF's alpha x min(1, i / iterations) in the first epoch, alpha after."""
        low_precision = self.dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=low_precision):
            image_feat, text_feat = self.momentum.features(batch["image"], batch["input_ids"], batch["attention_mask"])
        alpha = self.cfg.alpha
        if self.state.epoch == 0:
            alpha *= min(1.0, self.state.micro_step / len(self.sampler))
        q = self.queue
        return MomentumInputs(image_feat.float(), text_feat.float(), q.image_feat, q.text_feat, q.ids, alpha)

    def _device_batch(self, host_batch: dict) -> tuple[dict, bool]:
        """The step's batch on the device (see batch_or_fallback)."""
        self.state.skipped_samples += host_batch["num_skipped"]
        self.fallback_batch, usable = batch_or_fallback(host_batch, self.fallback_batch)
        return to_device(self.fallback_batch, self.device, self.dtype), usable

    def log_step(self, out: dict, lr: float) -> None:
        self.check_finite()
        terms = reduce_mean({k: out[k] for k in TERMS}, self.device)
        row = {
            "loss/total": terms["loss"], "loss/itc": terms["itc"], "loss/itm": terms["itm"],
            "train/itm_acc": terms["itm_acc"], "train/temp": terms["temp"], "train/lr": lr,
            "data/skipped_samples": float(self.state.skipped_samples),
        }  # fmt: skip
        if "alpha" in out:
            row["train/alpha"] = out["alpha"]
        self.monitor.log(self.state.global_step, row)

    def check_finite(self) -> None:
        self.state.nonfinite_steps = self.guard.check(self.state.global_step)

    # -- evaluation and checkpoints -------------------------------------------------------------------------------
    def end_epoch(self) -> None:
        """Evaluates, checkpoints, and exports the model when its selection metric is the best so far."""
        scalars = self.evaluate()
        self.monitor.log(self.state.global_step, scalars)
        selected = SELECT_KEYS[self.cfg.select]
        improved = scalars[selected] > self.state.best_score
        if improved:
            self.state.best_score, self.state.best_epoch = scalars[selected], self.state.epoch + 1
        self.state.epoch += 1
        tag_dir = self.save()  # None when the save failed (reported; the previous checkpoint is kept)
        if improved and is_main() and tag_dir is not None:
            export_checkpoint(tag_dir, self.output_dir / BEST_EXPORT, self.tokenizer)
            best = {"epoch": self.state.best_epoch, "global_step": self.state.global_step, "selected_by": selected,
                    **scalars}  # fmt: skip
            (self.output_dir / "best.json").write_text(json.dumps(best, indent=2) + "\n")
        barrier()

    def evaluate(self) -> dict[str, float]:
        """eval/<recall> of the test set (re-ranked, and eval/itc_<recall> of the ITC ranking alone; mean_r1 is the
        mean of TR@1 and IR@1), and eval/hard_<itm|itc>_<kind> of the hard-negative benchmark when set."""
        cfg, model = self.cfg, self.engine.module.model
        result = evaluate_retrieval(
            model, self.test_set, self.k_test, self.device, self.tokenizer, batch_size=cfg.eval_batch_size,
            itm_batch_size=cfg.itm_batch_size, max_tokens=cfg.max_tokens, num_workers=cfg.num_workers,
            progress=is_main(), rerank_score=cfg.rerank_score,
        )  # fmt: skip
        scalars = {}
        for prefix in ("", "itc_"):
            scalars.update({f"eval/{prefix}{key}": result[prefix + key] for key in RECALL_KEYS})
            scalars[f"eval/{prefix}mean_r1"] = (result[f"{prefix}txt_r1"] + result[f"{prefix}img_r1"]) / 2
        if self.hard_negatives is not None:
            hard = evaluate_hard_negatives(model, self.hard_negatives, self.device, self.tokenizer,
                                           batch_size=cfg.eval_batch_size, max_tokens=cfg.max_tokens)  # fmt: skip
            for method in ("itm", "itc"):
                scalars.update({f"eval/hard_{method}_{kind}": acc for kind, acc in hard[method].items()})
        if is_main():
            log.info("epoch %d: r_mean %.2f (top %d re-ranked by %s), ITC alone %.2f; mean R@1 %.2f, ITC alone %.2f",
                     self.state.epoch + 1, result["r_mean"], self.k_test, cfg.rerank_score, result["itc_r_mean"],
                     scalars["eval/mean_r1"], scalars["eval/itc_mean_r1"])  # fmt: skip
        return scalars

    def client_state(self) -> dict:
        state = {
            "finetune_state": dataclasses.asdict(self.state),
            "finetune_config": dataclasses.asdict(self.cfg),
            "model_config": self.objective.model.config_dict(),  # what gritvlp.export reads
        }
        if self.momentum is not None:  # identical on every rank; written once, beside the engine's states
            state["momentum_encoder"] = {k: v.cpu() for k, v in self.momentum.state_dict().items()}
            state["queue"] = {k: v.cpu() for k, v in self.queue.state_dict().items()}
        return state

    def save(self) -> Path | None:
        self.check_finite()  # raises before weights of a diverged run can replace the last good checkpoint
        return checkpoint.save(self.engine, self.output_dir, self.state.global_step, self.client_state(), self.cfg.keep_checkpoints)  # fmt: skip

    def resume(self, resume: str | None) -> None:
        target = checkpoint.resolve_resume(resume, self.output_dir)
        if target is None:
            return
        client_state, _ = checkpoint.load(self.engine, *target)
        saved = {"recipe": "in-batch", "select": "rerank", **client_state["finetune_config"]}  # older: no such keys
        for key in ("recipe", "select"):
            if saved[key] != getattr(self.cfg, key):
                raise ValueError(f"the checkpoint was trained with --{key} {saved[key]}: resume it with that setting")
        state = dict(client_state["finetune_state"])
        if "best_r_mean" in state:  # checkpoints of before --select: selected by the re-ranked r_mean
            state["best_score"] = state.pop("best_r_mean")
        self.state = FinetuneState(**state)
        self.guard = NonFiniteGuard(self.device, self.state.nonfinite_steps, self.state.global_step)
        if self.momentum is not None:
            self.momentum.load_state_dict(client_state["momentum_encoder"])
            self.queue.load_state_dict(client_state["queue"])


def finetune(cfg: FinetuneConfig, ds_config_path: str, resume: str | None = None) -> FinetuneState:
    """Builds a FineTuner and runs it to the end (scripts/finetune_retrieval.py's entry point)."""
    return FineTuner(cfg, ds_config_path).fit(resume)
