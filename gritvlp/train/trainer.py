"""The pre-training loop, as a Trainer in torchtitan's style: set up once, `train_step` per micro-batch, `end_epoch`
per epoch (the next epoch's order from the GRIT schedule), `state_dict` / `load_state_dict` for checkpoints.

The pieces live in their own modules: the data (train/data.py), one micro-step (train/step.py), the DeepSpeed
engine (train/engine.py), checkpoints (train/checkpoint.py) and what is logged under which name (train/monitor.py).
The losses are the objective's (gritvlp.objectives.pretraining), which the engine wraps.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import record_function

from gritvlp.config import Config, save_config
from gritvlp.data.collate import Collator
from gritvlp.model.gritvlp import GritVLP
from gritvlp.objectives.pretraining import TERMS, PretrainingObjective
from gritvlp.sampling.order import EpochBatchSampler, epoch_key, random_rank_batches
from gritvlp.sampling.schedule import GritSchedule
from gritvlp.train import checkpoint
from gritvlp.train.data import barrier, epoch_loader, is_main, tokenizer_and_special_tokens, training_dataset
from gritvlp.train.distributed import any_rank, init_distributed, reduce_mean, release_shared_memory
from gritvlp.train.engine import LR_SCHEDULES, build_engine, load_ds_config, precision_dtype, zero_stage
from gritvlp.train.evaluation import EpochEvaluation
from gritvlp.train.faults import kill_point
from gritvlp.train.flops import counting_flops, peak_tflops
from gritvlp.train.monitor import Monitor
from gritvlp.train.step import (
    NonFiniteGuard,
    bank_features,
    batch_or_fallback,
    forward_backward,
    optimizer_step,
    step_seed,
    to_device,
)

log = logging.getLogger("gritvlp.train")


@dataclass
class RunState:
    epoch: int = 0
    global_step: int = 0  # optimiser steps
    micro_step: int = 0
    skipped_samples: int = 0
    nonfinite_steps: int = 0


@dataclass
class Window:
    """Throughput since the last logged step."""

    samples: int = 0
    steps: int = 0
    data_wait: float = 0.0  # seconds blocked in the loader


def random_weights_warning(model_cfg, vision_width: int) -> str | None:
    """A loud warning when a base-size model (the paper's) starts without the DeiT / BERT weights it is meant to
    start from; None for small models (the demo) or when both weight files are set."""
    missing = [key for key in ("vision_weights", "text_weights") if not getattr(model_cfg, key)]
    if vision_width < 768 or not missing:
        return None
    banner = "!" * 100
    return (
        f"\n{banner}\nTRAINING A BASE-SIZE MODEL FROM RANDOM WEIGHTS: model.{' and model.'.join(missing)} not set.\n"
        "GRIT-VLP and ALBEF start from DeiT-base and bert-base-uncased: set model.vision_weights and "
        f"model.text_weights to local files.\n{banner}"
    )


class Trainer:
    def __init__(self, cfg: Config, ds_config_path: str):
        self.cfg = cfg
        self.use_cuda = torch.cuda.is_available()
        self.ds_config = load_ds_config(ds_config_path, self.use_cuda, lr=cfg.train.lr)
        self.device, self.rank, self.world = init_distributed(self.use_cuda)
        self.output_dir = Path(cfg.train.output_dir)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.dataset = training_dataset(cfg)
        self.tokenizer, special_tokens = tokenizer_and_special_tokens(cfg)
        self.objective = PretrainingObjective(GritVLP(cfg.model, special_tokens), cfg.objectives)
        self._check_model()
        self.micro_batch = self.ds_config["train_micro_batch_size_per_gpu"]
        self.grad_accum = self.ds_config.get("gradient_accumulation_steps", 1)
        self.sampler = EpochBatchSampler(len(self.dataset), self.micro_batch, self.rank, self.world, cfg.train.seed)
        self.schedule = self._grit_schedule() if cfg.sampling.grit else None
        self.total_steps = self._total_steps()
        schedule = LR_SCHEDULES[cfg.train.lr_schedule](
            self.total_steps, cfg.train.warmup_steps, cfg.train.warmup_start_ratio, cfg.train.min_lr_ratio
        )
        if cfg.train.compile:
            self._compile()
        self.engine = build_engine(self.objective, self.ds_config, schedule, cfg.train.lr_multipliers)
        if zero_stage(self.ds_config) == 3:
            self.objective.register_zero3_external_parameters()
        self.dtype = precision_dtype(self.ds_config)
        self.collator = Collator(self.tokenizer, cfg.data.max_tokens, num_attributes=cfg.model.num_attributes)
        self.evaluation = EpochEvaluation(cfg, self.tokenizer, self.device)
        self.last_eval_step = self.last_saved_step = -1
        self.state = RunState()
        self.guard = NonFiniteGuard(self.device)
        self.window = Window()
        # FLOPs of one optimiser step on this rank, counted on the first micro-step (see train_step)
        self.step_flops: int | None = None
        self.peak_tflops = peak_tflops(self.device, cfg.train.peak_tflops)
        self.monitor: Monitor | None = None
        self.fallback_batch = None  # last good batch: stands in (with zero loss) when skips empty a batch
        self.epoch_start = self.grouping_seconds = 0.0

    # -- set-up ---------------------------------------------------------------------------------------------------
    def _compile(self) -> None:
        if zero_stage(self.ds_config) == 3:
            raise ValueError("train.compile=true needs ZeRO stage 0, 1 or 2: ZeRO-3 gathers parameters in hooks "
                             "that a compiled block would not run")  # fmt: skip
        self.objective.model.compile_blocks()
        log.info("transformer blocks compiled with torch.compile: the first steps of each shape are slow")

    def _check_model(self) -> None:
        model = self.objective.model
        if len(self.tokenizer) > model.text.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(self.tokenizer)} tokens but the BERT config only {model.text.config.vocab_size}"
            )
        warning = random_weights_warning(self.cfg.model, model.vision.width)
        if warning and is_main():
            log.warning(warning)

    def _grit_schedule(self) -> GritSchedule:
        sampling = self.cfg.sampling
        caption_ids = self.dataset.caption_ids if self.cfg.objectives.caption_positives else None
        return GritSchedule(
            len(self.dataset), self.micro_batch, self.world, sampling.bank_size, sampling.search_space,
            sampling.shuffle_batches, group_ids=self.dataset.group_ids, seed=self.cfg.train.seed, rank=self.rank,
            caption_ids=caption_ids,
        )  # fmt: skip

    def _total_steps(self) -> int:
        steps_per_epoch = len(self.sampler) // self.grad_accum
        if steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.dataset)} samples make no full optimiser step of "
                f"{self.micro_batch} x {self.grad_accum} x {self.world}"
            )
        total = steps_per_epoch * self.cfg.train.epochs
        if self.cfg.train.max_steps > 0:
            total = min(total, self.cfg.train.max_steps)
        if is_main():
            log.info(
                "%d samples, %d ranks x %d per rank x %d accumulation, %d steps per epoch, %d steps in all",
                len(self.dataset), self.world, self.micro_batch, self.grad_accum, steps_per_epoch, total,
            )  # fmt: skip
        return total

    # -- the loop -------------------------------------------------------------------------------------------------
    def fit(self, resume: str | None = None, overwrite: bool = False) -> RunState:
        self.prepare_output(resume, overwrite)
        self.resume(resume)
        self.monitor = Monitor(self.output_dir, self.total_steps, self.state.global_step, enabled=is_main())
        while not self.done() and self.state.epoch < self.cfg.train.epochs:
            self.run_epoch()
        self.finish()
        return self.state

    def prepare_output(self, resume: str | None, overwrite: bool) -> None:
        """A fresh run never writes over an earlier run's checkpoints by accident: it needs --resume or --overwrite
        (which removes that run's checkpoints, metrics.jsonl and TensorBoard events first). Then writes config.yaml."""
        if resume and overwrite:
            raise ValueError("--resume and --overwrite exclude each other: continue the run, or start it again")
        # decided together (before rank 0 removes anything), so every rank takes the same branch
        if resume is None and any_rank(checkpoint.has_checkpoints(self.output_dir), self.device):
            folder = checkpoint.checkpoint_dir(self.output_dir)
            if not overwrite:
                raise FileExistsError(
                    f"{self.output_dir} holds checkpoints of an earlier run (latest: "
                    f"{checkpoint.latest_tag(folder) or 'none complete'}): pass --resume latest to continue it, or "
                    "--overwrite to start again and replace them"
                )
            if is_main():
                log.warning("--overwrite: removing the earlier run's checkpoints, metrics.jsonl and TensorBoard events "
                            "in %s", self.output_dir)  # fmt: skip
                shutil.rmtree(folder)
                shutil.rmtree(self.output_dir / "tensorboard", ignore_errors=True)
                (self.output_dir / "metrics.jsonl").unlink(missing_ok=True)
            barrier()
        if is_main():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.output_dir / "config.yaml")

    def done(self) -> bool:
        return self.state.global_step >= self.total_steps

    def run_epoch(self) -> None:
        """The rest of the current epoch (all of it, or what a resumed checkpoint left), then end_epoch."""
        self.dataset.set_epoch(self.state.epoch)
        self.epoch_start, self.grouping_seconds = self.monitor.clock(), 0.0
        # The data wait: host time blocked in the loader (its workers' start-up, then each batch not yet collated
        # and pinned); the MLM inputs and the host-to-device copy come after, in the step.
        waiting_since = self.monitor.clock()
        for host_batch in epoch_loader(self.dataset, self.sampler, self.collator, self.cfg, self.use_cuda):
            self.window.data_wait += self.monitor.clock() - waiting_since
            self.train_step(host_batch)
            if self.done():
                return
            waiting_since = self.monitor.clock()
        self.end_epoch()

    def train_step(self, host_batch: dict) -> None:
        """One micro-step: forward, backward, the bank add, DeepSpeed's step; on an optimiser-step boundary the
        logging and checkpoint of that step."""
        self.sampler.advance()
        with record_function("gritvlp.data"):
            batch, usable = self._device_batch(host_batch)
        torch.manual_seed(step_seed(self.cfg.train.seed, self.state.micro_step, self.rank))
        self.objective.set_step(self.state.global_step, self.state.epoch)
        counting = self.step_flops is None
        with counting_flops() if counting else nullcontext() as counter:
            out, finite = forward_backward(self.engine, batch, usable, self.guard)
        if counting:
            self._set_step_flops(counter.get_total_flops(), batch["input_ids"].shape[1])
        if self.schedule is not None:
            if usable:
                self.schedule.add(*bank_features(out, finite), batch["index"])
            self.grouping_seconds += self.schedule.tick(self.state.epoch)  # every rank, every micro-step
        lr = self.engine.get_lr()[0]  # the rate this step uses; step() advances the schedule
        with record_function("gritvlp.optimizer"):
            optimizer_step(self.engine, self.objective.model)
        self.state.micro_step += 1
        self.window.samples += host_batch["input_ids"].shape[0] if usable else 0
        if self.state.micro_step % self.grad_accum:
            return
        self.state.global_step += 1
        self.window.steps += 1
        self.monitor.step()
        if self.state.global_step % self.cfg.train.log_every == 0 or self.done():
            self.log_step(out, lr)
        if self.state.global_step % self.cfg.train.save_every == 0:
            self.save()

    def _set_step_flops(self, micro_step_flops: int, caption_width: int) -> None:
        """Counted once per run (and process), on its first micro-step: later batches are charged the same work,
        though their captions, padded to the longest in the batch, may be a few tokens longer or shorter."""
        self.step_flops = micro_step_flops * self.grad_accum
        if is_main():
            log.info("one optimiser step is %.4g TFLOP per rank (forward + backward, counted on the first micro-step, "
                     "captions padded to %d tokens): perf/tflops and perf/mfu use this count",
                     self.step_flops / 1e12, caption_width)  # fmt: skip

    def _device_batch(self, host_batch: dict) -> tuple[dict, bool]:
        """The step's batch on the device with its MLM inputs, drawn on the host from the step's seed (see
        batch_or_fallback for a batch that skips left too small)."""
        self.state.skipped_samples += host_batch["num_skipped"]
        self.fallback_batch, usable = batch_or_fallback(host_batch, self.fallback_batch)
        seed = step_seed(self.cfg.train.seed, self.state.micro_step, self.rank, "mlm")
        batch = self.objective.prepare_batch(self.fallback_batch, torch.Generator().manual_seed(seed))
        return to_device(batch, self.device, self.dtype), usable

    def end_epoch(self) -> None:
        """Groups what is left in the bank and deals every rank its batches of the next epoch (a collective), then
        evaluates when an evaluation is due."""
        batches = None
        if self.schedule is not None:
            batches = self.schedule.next_epoch_batches(self.state.epoch + 1, self.sampler.own_samples())
            self.grouping_seconds += self.schedule.last_seconds
            epoch_seconds = self.monitor.clock() - self.epoch_start
            similarity = {k: torch.tensor(v) for k, v in self.schedule.last_similarity.items()}
            similarity = reduce_mean(similarity, self.device)  # a collective: every rank ends the epoch here
            self.monitor.log_grouping(self.state.global_step, self.grouping_seconds, epoch_seconds, similarity)
            self.log_grouping_picture(batches[0])
        self.state.epoch += 1
        self.sampler.set_epoch(self.state.epoch, batches)
        if self.evaluation.due(self.state.epoch):
            self.evaluate()

    def finish(self) -> None:
        if self.evaluation.enabled and self.last_eval_step != self.state.global_step:
            self.evaluate()  # the final model, when the run ended within an epoch
        if self.last_saved_step != self.state.global_step and self.save() is None:  # save() checks the losses first
            self.monitor.close()
            raise RuntimeError(f"the final checkpoint (step {self.state.global_step}) could not be written (see the "
                               "error above); the last complete checkpoint is kept")  # fmt: skip
        self.check_finite()
        self.monitor.close()
        if is_main():
            log.info("finished at step %d; checkpoints in %s", self.state.global_step, checkpoint.checkpoint_dir(self.output_dir))
            if self.cfg.train.export_fp16:
                export_final(self.output_dir)
        barrier()
        if not self.use_cuda:
            release_shared_memory()

    def evaluate(self) -> None:
        """Zero-shot retrieval (and the demo's hard negatives) on every rank; rank 0 logs eval/*."""
        kill_point("evaluation", self.state.global_step)
        metrics = self.evaluation(self.engine.module.model)
        self.last_eval_step = self.state.global_step
        self.monitor.log_eval(self.state.global_step, metrics)
        if is_main():
            log.info(
                "epoch %d, step %d: zero-shot retrieval r_mean %.2f (best %.2f), TR@1 %.2f, IR@1 %.2f",
                self.state.epoch, self.state.global_step, metrics["r_mean"], metrics["best_r_mean"],
                metrics["txt_r1"], metrics["img_r1"],
            )  # fmt: skip

    def log_grouping_picture(self, grouped: torch.Tensor) -> None:
        """A grouped mini-batch of the next epoch beside a random one, with their false negatives marked, in
        TensorBoard (rank 0; every rank runs the mining of its own batch, as ZeRO-3's gathers need)."""
        from gritvlp.train.pictures import grouped_vs_random

        converted = self._converted_positions(grouped.tolist())
        if not is_main():
            return
        random = random_order_sample(len(self.dataset), self.micro_batch, self.cfg.train.seed, self.state.epoch)
        picture = grouped_vs_random(self.dataset, grouped.tolist(), random, converted=converted)
        self.monitor.log_images(self.state.global_step, "grit/grouped_vs_random_batch", picture)

    def _converted_positions(self, indices: list[int]) -> list[tuple[int, int]]:
        """The pairs (positions in `indices`) that connection mining would turn into positives now; [] when off."""
        if self.objective.miner is None:
            return []
        host = self.collator([self.dataset[i] for i in indices])
        if host["input_ids"].shape[0] < 2:
            return []
        position = {index: p for p, index in enumerate(indices)}
        rows = [position[i] for i in host["index"].tolist()]
        pairs = self.objective.converted_pairs(to_device(host, self.device, self.dtype))
        return [(rows[a], rows[b]) for a, b in pairs]

    # -- logging --------------------------------------------------------------------------------------------------
    def log_step(self, out: dict, lr: float) -> None:
        """Averages the step's terms over ranks (the one place, with check_finite, where the host waits).

        Per optimiser step of the window since the last log: step_time_s (rank 0's wall time, evaluation and
        checkpoints in it included), data_wait_s (time blocked in the loader, mean over ranks), tflops (the counted
        step FLOPs per step time, per rank) and mfu (tflops / the device's peak, when one is known)."""
        self.check_finite()
        terms = reduce_mean({k: out[k] for k in TERMS if k in out}, self.device)
        seconds = self.monitor.elapsed()
        window = {"samples": float(self.window.samples), "data_wait": self.window.data_wait}
        window = reduce_mean({k: torch.tensor(v) for k, v in window.items()}, self.device)
        step_time = max(seconds, 1e-9) / self.window.steps
        tflops = self.step_flops / step_time / 1e12
        grad_norm = self.engine.get_global_grad_norm()
        self.monitor.log_train(
            self.state.global_step, terms, lr=lr, grad_norm=None if grad_norm is None else float(grad_norm),
            samples_per_s=window["samples"] * self.world / max(seconds, 1e-9), step_time_s=step_time,
            data_wait_s=window["data_wait"] / self.window.steps, tflops=tflops,
            mfu=None if self.peak_tflops is None else tflops / self.peak_tflops,
            skipped_samples=float(self.state.skipped_samples),
        )  # fmt: skip
        self.window = Window()

    def check_finite(self) -> None:
        self.state.nonfinite_steps = self.guard.check(self.state.global_step)

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """gritvlp's part of a checkpoint shared by all ranks (DeepSpeed's engine holds the weights and the
        optimizer); rank_state_dict() holds what is each rank's own."""
        return {
            "run_state": vars(self.state).copy(),
            "config": self.cfg.to_dict(),
            "model_config": self.objective.model.config_dict(),
            "evaluation": self.evaluation.state_dict(),
        }

    def rank_state_dict(self) -> dict:
        """This rank's batches of the epoch and position in it, its GRIT bank and grouped samples."""
        return {
            "sampler": self.sampler.state_dict(),
            "grit": self.schedule.state_dict() if self.schedule is not None else None,
        }

    def load_state_dict(self, state: dict, rank_state: dict | None) -> None:
        if rank_state is None:
            raise ValueError("the checkpoint has no state file for this rank: resume with the world size it was saved with")
        self.state = RunState(**state["run_state"])
        self.guard = NonFiniteGuard(self.device, self.state.nonfinite_steps, self.state.global_step)
        self.evaluation.load_state_dict(state.get("evaluation", {}))
        self.sampler.load_state_dict(rank_state["sampler"])
        if self.schedule is None:
            return
        if rank_state.get("grit") is not None:
            self.schedule.load_state_dict(rank_state["grit"])
        elif is_main():
            log.warning("the checkpoint holds no GRIT state: this epoch's features start from empty banks")

    def save(self) -> Path | None:
        """The step's checkpoint; None when it could not be written (reported; the previous one is kept)."""
        self.check_finite()  # raises before weights of a diverged run can replace the last good checkpoint
        tag_dir = checkpoint.save(
            self.engine, self.output_dir, self.state.global_step, self.state_dict(), self.cfg.train.keep_checkpoints,
            self.rank_state_dict(),
        )  # fmt: skip
        if tag_dir is not None:
            self.last_saved_step = self.state.global_step
        return tag_dir

    def resume(self, resume: str | None) -> None:
        target = checkpoint.resolve_resume(resume, self.output_dir)
        if target is None:
            self.sampler.set_epoch(0)
            return
        state, rank_state = checkpoint.load(self.engine, *target)
        self.load_state_dict(state, rank_state)
        self.last_saved_step = self.state.global_step
        if is_main() and target[0] == checkpoint.checkpoint_dir(self.output_dir):
            trim_metrics(self.output_dir / "metrics.jsonl", self.state.global_step)


def trim_metrics(path: Path, step: int) -> None:
    """Drops the rows an interrupted run logged after the checkpoint it resumes from (they are logged again), and a
    torn last line."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if (row_step := _row_step(line)) is not None and row_step <= step]
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
        log.info("metrics.jsonl: %d rows after step %d dropped (they are logged again)", len(lines) - len(kept), step)


def _row_step(line: str) -> int | None:
    """The row's step; None for a line that is no row (the torn last line of a killed run)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def random_order_sample(num_samples: int, batch_size: int, seed: int, epoch: int) -> list[int]:
    """One batch of a random order (for the picture beside a grouped batch)."""
    return random_rank_batches(num_samples, batch_size, 0, 1, epoch_key(seed, -1 - epoch))[0].tolist()


def export_final(output_dir: Path) -> None:
    """fp16 weights for fine-tuning; a failure here is reported, the checkpoint stays the source of truth."""
    from gritvlp.export import export_fp16

    try:
        export_fp16(checkpoint.checkpoint_dir(output_dir), output_dir / "export_fp16")
    except (ValueError, OSError) as err:
        log.error("fp16 export failed (%s); the checkpoint is intact: export it with scripts/export_fp16.py", err)


def train(cfg: Config, ds_config_path: str, resume: str | None = None, overwrite: bool = False) -> RunState:
    """Builds a Trainer and runs it to the end (scripts/pretrain.py's entry point)."""
    return Trainer(cfg, ds_config_path).fit(resume, overwrite)
