"""Benchmark a whole GRIT-VLP training step: plain ITC/ITM vs GRIT vs GRIT on the reference loss kernels.

    python scripts/bench_step.py                                          # CUDA: vitb16_bert, B = 128, bf16
    python scripts/bench_step.py --config demo --batch 16 --steps 3 --warmup 1   # CPU smoke run
    python scripts/bench_step.py --variants grit --trainer                # + the trainer itself, side by side

One step is what the trainer does on one GPU, minus DeepSpeed: the host batch gets its MLM inputs (drawn on the
CPU, as in training) and is copied to the device, forward under autocast (fp32 parameters), backward of the
finite-guarded loss, gradient clipping and torch's fused AdamW with the optimizer block of the DeepSpeed config
(default ds_configs/zero2.json), and for GRIT the add to the feature bank. Images are random normalised tensors
made on the device; captions are random token ids of random lengths up to data.max_tokens, padded to the longest.

Variants, on the same model:
  plain                    ITC without consistency, ITM negatives sampled, 15% MLM, no feature bank (ALBEF);
  grit                     consistency 0.2, hardest negatives, 50% MLM, the bank add each step (GRIT-VLP);
  grit_reference_kernels   grit with GRITVLP_KERNELS=reference: the plain PyTorch loss kernels;
  grit_smoothed            grit with MAFA's smoothed ITC (0.5 uniform target): the kernel's uniform terms;
  grit_mafa                grit_smoothed + connection mining, a filter model of the same size (random weights,
                           thresholds 0.5 / 0.8) scoring the 2B chosen negatives, and the MLM of mined pairs.
Every batch carries caption ids with pairs of identical captions (positives of each other, as in web data).
Grouping (gritvlp.sampling.schedule.GritSchedule building the next order from a full bank) runs once per L = sampling.bank_size samples; it is timed once on
L random features in search spaces of M = sampling.search_space and charged to each step as t * B / L.

With --compile every transformer block is compiled (GritVLP.compile_blocks, as train.compile=true does) once its
FLOPs are counted; the compilation happens in the --warmup steps (captions of random lengths: give it 3 or more).

Per variant: median step time over --steps after --warmup, samples/s, peak memory (CUDA), model FLOPs of one
forward + backward (counted once by torch.utils.flop_counter on the reference kernels, so both GRIT variants are
charged the same work), achieved TFLOP/s and MFU against the device's dense bf16 peak. On CUDA a few more steps run
under torch.cuda.set_sync_debug_mode("warn"): every host synchronisation inside a step is recorded with its source
line. Ratios: grit / plain step time (with and without grouping), grit_reference_kernels / grit.

With --trainer the trainer itself runs too (gritvlp.train.trainer.Trainer in this process: the DeepSpeed engine of
--ds-config with --batch per rank, the data loader and augmentations of the config, the monitor), --warmup + --steps
optimiser steps with the config and its overrides, without evaluation or checkpoints; its figures (mean step time
and samples/s of the windows after the warm-up, the FLOPs it counted, TFLOP/s, MFU, data wait and its share of the
step) go under "trainer" in the same JSON. Its precision is ds_config's (bf16 off on a CPU), not --dtype. Give it a
--warmup of 1 or more: its first step runs under the FLOP counter (and compiles, with --compile). --variants ""
runs the trainer alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import platform
import statistics
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from gritvlp.config import load_config
from gritvlp.model.gritvlp import GritVLP
from gritvlp.objectives.mining import ConnectionMiner
from gritvlp.objectives.pretraining import PretrainingObjective
from gritvlp.sampling.bank import FeatureBank
from gritvlp.sampling.schedule import GritSchedule
from gritvlp.train.engine import parameter_groups
from gritvlp.train.flops import counting_flops, kernels_backend, peak_tflops
from gritvlp.train.step import NonFiniteGuard, bank_features, forward_backward, step_seed, to_device

ROOT = Path(__file__).resolve().parents[1]

GRIT_OBJECTIVES = dict(consistency_weight=0.2, itm_negatives="hardest", mask_prob=0.5)
SMOOTHED = dict(GRIT_OBJECTIVES, itc_smoothing=0.5, itc_smoothing_start_epoch=0)
VARIANTS = {
    "plain": dict(
        objectives=dict(consistency_weight=0.0, itm_negatives="sample", mask_prob=0.15), bank=False, kernels="auto"
    ),
    "grit": dict(objectives=GRIT_OBJECTIVES, bank=True, kernels="auto"),
    "grit_reference_kernels": dict(objectives=GRIT_OBJECTIVES, bank=True, kernels="reference"),
    "grit_smoothed": dict(objectives=SMOOTHED, bank=True, kernels="auto"),
    "grit_mafa": dict(objectives=SMOOTHED, bank=True, kernels="auto", mining=True),
}
HOST_BATCHES = 4  # distinct captions cycled through (tokenisation happens in the loader, not in the step)
FIRST_WORD_ID = 1000  # BERT-uncased ids below this are special or [unused] tokens


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="vitb16_bert", help="gritvlp preset or YAML (default vitb16_bert)")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    parser.add_argument("--batch", type=int, default=128, help="micro-batch size (default 128)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first (default 5)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="autocast dtype; CUDA bf16, CPU fp32")
    parser.add_argument("--params", choices=["fp32", "bf16"], default="fp32",
                        help="fp32: fp32 parameters under autocast (a PyTorch AMP step); bf16: bf16 parameters and "
                             "fp32 master weights, no autocast (DeepSpeed's bf16 engine, as the trainer runs)")  # fmt: skip
    parser.add_argument("--ds-config", type=Path, default=ROOT / "ds_configs" / "zero2.json")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by name)")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS) + ' ("": none)'
    )
    parser.add_argument("--trainer", action="store_true",
                        help="also run the trainer itself (DeepSpeed, loader, monitor) and record its figures")  # fmt: skip
    parser.add_argument("--sync-check-steps", type=int, default=3, help="CUDA steps under sync debug mode")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/step_<device>.json)")
    parser.add_argument("--breakdown-steps", type=int, default=3, help="steps profiled for the per-phase breakdown")
    parser.add_argument("--profile", type=Path, default=None, help="write each variant's profiler table beside PATH")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every transformer block (train.compile); compiles during --warmup")  # fmt: skip
    args = parser.parse_args(argv)
    args.variants = [name for name in args.variants.split(",") if name]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}")
    if not args.variants and not args.trainer:
        parser.error("nothing to run: name variants, or pass --trainer")
    if args.trainer and args.steps < 1:
        parser.error("--trainer needs --steps >= 1")
    return args


# -- set-up ------------------------------------------------------------------------------------------------------------
def optimizer_settings(ds_config: Path) -> dict:
    """The DeepSpeed config's AdamW, clipping and precision, which the benchmark applies without DeepSpeed."""
    config = json.loads(ds_config.read_text())
    params = config.get("optimizer", {}).get("params", {})
    return {
        "lr": params.get("lr", 1e-4),
        "betas": tuple(params.get("betas", (0.9, 0.999))),
        "eps": params.get("eps", 1e-8),
        "weight_decay": params.get("weight_decay", 0.0),
        "gradient_clipping": config.get("gradient_clipping", 0.0),
        "bf16": config.get("bf16", {}).get("enabled", False),
    }


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())


# -- synthetic data ----------------------------------------------------------------------------------------------------
def host_captions(batch: int, max_tokens: int, vocab: int, special: dict, generator) -> dict:
    """[CLS] words [SEP] of 6..max_tokens tokens, padded to the longest, as the collator returns them."""
    lengths = torch.randint(min(6, max_tokens), max_tokens + 1, (batch,), generator=generator)
    width = int(lengths.max())
    ids = torch.randint(FIRST_WORD_ID, vocab, (batch, width), generator=generator)
    ids[:, 0] = special["cls"]
    ids[torch.arange(batch), lengths - 1] = special["sep"]
    attention_mask = (torch.arange(width)[None] < lengths[:, None]).long()
    return {"input_ids": ids * attention_mask + special["pad"] * (1 - attention_mask), "attention_mask": attention_mask}


class SyntheticBatches:
    """Device images (random normalised pixels) and host captions; each step draws its MLM inputs on the host from
    the step's seed and copies the text to the device, as the trainer does."""

    def __init__(self, objective: PretrainingObjective, batch: int, max_tokens: int, device, dtype):
        model = objective.model
        g = torch.Generator().manual_seed(0)
        size = model.config.image_size
        self.images = [torch.randn(batch, 3, size, size, device=device).to(dtype) for _ in range(2)]
        vocab = model.text.config.vocab_size
        self.captions = [host_captions(batch, max_tokens, vocab, model.special_tokens, g) for _ in range(HOST_BATCHES)]
        ids = torch.arange(batch)
        self.host_extra = {"index": ids, "group_id": ids, "caption_id": ids // 2}
        if device.type == "cuda":  # the loader pins what it returns
            self.captions = [{k: v.pin_memory() for k, v in c.items()} for c in self.captions]
            self.host_extra = {k: v.pin_memory() for k, v in self.host_extra.items()}
        self.objective, self.device, self.dtype = objective, device, dtype

    def __call__(self, step: int) -> dict:
        host = {**self.captions[step % HOST_BATCHES], **self.host_extra, "image": self.images[step % 2]}
        mlm_seed = step_seed(0, step, rank=0, stream="mlm")
        host = self.objective.prepare_batch(host, torch.Generator().manual_seed(mlm_seed))
        return to_device(host, self.device, self.dtype)


# -- one training step -------------------------------------------------------------------------------------------------
class AutocastEngine:
    """The two calls of a DeepSpeed engine that the trainer's micro-step makes: forward (under autocast when the
    parameters are fp32 and the step's dtype is not), backward."""

    def __init__(self, objective: PretrainingObjective, dtype: torch.dtype, device: torch.device):
        self.objective, self.dtype, self.device = objective, dtype, device
        fp32_params = next(objective.parameters()).dtype == torch.float32
        self.autocast = fp32_params and dtype != torch.float32

    def __call__(self, batch: dict) -> dict:
        with record_function("gritvlp.forward"):
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
                return self.objective(batch)

    def backward(self, loss: torch.Tensor) -> None:
        with record_function("gritvlp.backward"):
            loss.backward()


class MasterWeights:
    """fp32 master copies of bf16 parameters, as DeepSpeed's bf16 engine keeps them: each step casts the gradients
    into the masters' .grad, the optimizer updates the masters, and they are copied (cast) back into the parameters."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.masters = [p.detach().float().clone().requires_grad_() for p in params]
        self.of = {id(p): m for p, m in zip(params, self.masters)}

    def groups(self, groups: list[dict]) -> list[dict]:
        """The optimizer's parameter groups over the masters."""
        return [{**g, "params": [self.of[id(p)] for p in g["params"]]} for g in groups]

    def gradients_in(self) -> None:
        for p, m in zip(self.params, self.masters):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def weights_out(self) -> None:
        torch._foreach_copy_([p.data for p in self.params], self.masters)


@dataclasses.dataclass
class StepRunner:
    engine: AutocastEngine
    optimizer: torch.optim.Optimizer
    params: list  # what the optimizer updates: the parameters, or their fp32 masters
    clip: float
    bank: FeatureBank | None
    batches: SyntheticBatches
    guard: NonFiniteGuard
    masters: MasterWeights | None = None

    def __call__(self, step: int) -> None:
        with record_function("gritvlp.data"):
            batch = self.batches(step)
        out, finite = forward_backward(self.engine, batch, True, self.guard)
        with record_function("gritvlp.optimizer"):
            if self.masters is not None:
                self.masters.gradients_in()
            if self.clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.masters is not None:
                self.masters.weights_out()
        if self.bank is not None:
            with record_function("gritvlp.bank"):
                if len(self.bank) + batch["index"].numel() > self.bank.capacity:
                    self.bank.reset()  # training groups and empties it here; grouping is charged separately
                self.bank.add(*bank_features(out, finite), batch["index"])


def build_runner(cfg, variant: dict, args, device, dtype, settings) -> StepRunner:
    torch.manual_seed(0)
    objectives = dataclasses.replace(cfg.objectives, **variant["objectives"])
    miner = ConnectionMiner(GritVLP(cfg.model).to(device), low=0.5, high=0.8) if variant.get("mining") else None
    objective = PretrainingObjective(GritVLP(cfg.model), objectives, miner=miner).to(device).train()
    groups = parameter_groups(objective, settings["weight_decay"])
    masters = None
    if args.params == "bf16":  # as DeepSpeed's bf16 engine converts the module, with fp32 masters for the optimizer
        objective = objective.bfloat16()
        masters = MasterWeights([p for g in groups for p in g["params"]])
        groups = masters.groups(groups)
    optimizer = torch.optim.AdamW(
        groups, lr=settings["lr"], betas=settings["betas"], eps=settings["eps"], fused=True
    )  # fmt: skip
    bank = FeatureBank(cfg.sampling.bank_size) if variant["bank"] else None
    batches = SyntheticBatches(objective, args.batch, cfg.data.max_tokens, device, dtype)
    params = [p for g in groups for p in g["params"]]
    engine = AutocastEngine(objective, dtype, device)
    return StepRunner(engine, optimizer, params, settings["gradient_clipping"], bank, batches, NonFiniteGuard(device),
                      masters)  # fmt: skip


# -- measurements ------------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times(run: StepRunner, first_step: int, steps: int, device: torch.device) -> tuple[list[float], float]:
    """Seconds per step (CUDA events, so the host runs ahead as in training) and the wall time of all of them."""
    synchronize(device)
    start_wall = time.perf_counter()
    if device.type != "cuda":
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            run(first_step + i)
            times.append(time.perf_counter() - t0)
        return times, time.perf_counter() - start_wall
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for i, (start, end) in enumerate(events):
        start.record()
        run(first_step + i)
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events], time.perf_counter() - start_wall


def count_flops(run: StepRunner, step: int) -> int:
    """FLOPs of one forward + backward on the reference kernels (every matmul a visible torch op)."""
    batch = run.batches(step)
    with counting_flops() as counter:
        out = run.engine(batch)
        out["loss"].backward()
    run.optimizer.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def sync_check(run: StepRunner, first_step: int, steps: int, device: torch.device) -> dict | None:
    """Runs steps under torch.cuda.set_sync_debug_mode("warn"); each warning names a synchronising call and the
    Python line that made it."""
    if device.type != "cuda" or steps <= 0:
        return None
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(steps):
                run(first_step + i)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    synchronize(device)
    syncs = [w for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
    where = sorted({f"{Path(w.filename).name}:{w.lineno}: {str(w.message).splitlines()[0][:160]}" for w in syncs})
    return {"steps": steps, "host_syncs": len(syncs), "sync_free": not syncs, "where": where}


# The profiler ranges of a step: bench_step's own (data, forward, backward, optimizer, bank) and the objective's
# parts inside forward (gritvlp.objectives.pretraining); their backward kernels count under gritvlp.backward.
PHASES = ("data", "forward", "vision", "text", "itc", "mining", "itm", "mlm", "backward", "optimizer", "bank")


def breakdown(run: StepRunner, first_step: int, steps: int, device: torch.device, table: Path | None) -> dict:
    """Milliseconds per step in each phase, from the profiler over `steps` steps: time of the device kernels
    launched inside the range on CUDA, host time on CPU. Also the share of the device time in matrix products
    and attention, and (with `table`) the profiler's kernel table written there."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            run(first_step + i)
        synchronize(device)
    events = prof.key_averages()
    attr = "device_time_total" if cuda else "cpu_time_total"
    phases = {e.key[len("gritvlp.") :]: getattr(e, attr) / steps / 1e3 for e in events if e.key.startswith("gritvlp.")}
    result = {
        "steps": steps,
        "clock": "device" if cuda else "host",
        "ms_per_step": {k: phases.get(k, 0.0) for k in PHASES},
    }
    if cuda:
        kernel_us = {e.key: e.self_device_time_total for e in events if e.device_type.name == "CUDA"}
        total = max(sum(kernel_us.values()), 1)
        matmul = sum(
            t for k, t in kernel_us.items() if any(m in k.lower() for m in ("gemm", "xmma", "cutlass", "nvjet"))
        )
        attention = sum(t for k, t in kernel_us.items() if any(m in k.lower() for m in ("flash", "fmha", "attention")))
        result.update(
            gpu_ms_per_step=total / steps / 1e3, matmul_share=matmul / total, attention_share=attention / total
        )
    if table is not None:
        table.parent.mkdir(parents=True, exist_ok=True)
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        table.write_text(events.table(sort_by=sort, row_limit=40))
    return result


def run_variant(name: str, cfg, args, device, dtype, settings, peak, flops_by_objectives: dict) -> dict:
    variant = VARIANTS[name]
    with kernels_backend(variant["kernels"]):
        run = build_runner(cfg, variant, args, device, dtype, settings)
        # the same objectives are the same work (the filter model's forward counts as work)
        key = json.dumps({**variant["objectives"], "mining": variant.get("mining", False)}, sort_keys=True)
        if key not in flops_by_objectives:
            flops_by_objectives[key] = count_flops(run, step=0)
        flops = flops_by_objectives[key]
        if args.compile:  # after counting: the FLOPs are the eager model's, the same work
            run.engine.objective.model.compile_blocks()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for step in range(args.warmup):
            run(step)
        times, wall = step_times(run, args.warmup, args.steps, device)
        peak_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        syncs = sync_check(run, args.warmup + args.steps, args.sync_check_steps, device)
        profiled = None
        if args.breakdown_steps > 0:
            table = None if args.profile is None else args.profile.with_name(f"{args.profile.stem}_{name}.txt")
            first = args.warmup + args.steps + args.sync_check_steps
            profiled = breakdown(run, first, args.breakdown_steps, device, table)
        run.guard.check(args.warmup + args.steps)  # a diverged benchmark is an error, not a figure
    median = statistics.median(times)
    achieved = flops / median / 1e12
    return {
        "objectives": variant["objectives"],
        "kernels": variant["kernels"],
        "feature_bank": variant["bank"],
        "step_s_median": median,
        "step_s_min": min(times),
        "step_s_mean_wall": wall / len(times),
        "samples_per_s": args.batch / median,
        "peak_memory_gib": None if peak_bytes is None else peak_bytes / 2**30,
        "flops_per_step": flops,
        "achieved_tflops": achieved,
        "mfu": None if peak is None or device.type != "cuda" else achieved / peak,
        "sync_check": syncs,
        "breakdown": profiled,
    }


def time_grouping(cfg, batch: int, device: torch.device) -> dict:
    """The training path (GritSchedule building the next order from a full bank of L random normalised features,
    stored in fp16 on the device as the bank stores them), timed after a warm-up on one search space; per step it
    costs t * B / L."""
    bank, space, dim = cfg.sampling.bank_size, cfg.sampling.search_space, cfg.model.embed_dim
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(bank, dim, generator=g), dim=-1).to(device)
    text = F.normalize(image.cpu() + torch.randn(bank, dim, generator=g), dim=-1).to(device)
    index = torch.arange(bank, device=device)

    def group(n: int) -> float:
        schedule = GritSchedule(n, batch, 1, bank_size=n, search_space=space)
        schedule.bank.add(image[:n], text[:n], index[:n])
        synchronize(device)
        t0 = time.perf_counter()
        schedule.next_epoch_batches(1, torch.arange(n))
        synchronize(device)
        return time.perf_counter() - t0

    group(space)
    seconds = group(bank)
    return {"bank_size": bank, "search_space": space, "seconds": seconds, "per_step_s": seconds * batch / bank}


def ratios(variants: dict, grouping: dict) -> dict:
    def median(name):
        result = variants.get(name, {})
        return result.get("step_s_median")

    plain, grit, reference = median("plain"), median("grit"), median("grit_reference_kernels")
    smoothed, mafa = median("grit_smoothed"), median("grit_mafa")
    per_step = grouping.get("per_step_s")
    out = {}
    if plain and grit:
        out["grit_vs_plain_step_time"] = grit / plain
        if per_step is not None:
            out["grit_with_grouping_vs_plain_step_time"] = (grit + per_step) / plain
    if grit and reference:
        out["grit_reference_kernels_vs_grit_step_time"] = reference / grit
    if grit and smoothed:
        out["grit_smoothed_vs_grit_step_time"] = smoothed / grit
    if grit and mafa:
        out["grit_mafa_vs_grit_step_time"] = mafa / grit
    return out


# -- the trainer itself ------------------------------------------------------------------------------------------------
def trainer_overrides(args, output_dir: Path) -> list[str]:
    """--overrides, then what the trainer mode needs: warmup + steps optimiser steps, logged in windows of
    gcd(warmup, steps) steps (so no window mixes the two; the host waits only at their ends, as in training), epochs
    enough to get there, no evaluation and no checkpoint."""
    forced = [
        f"train.output_dir={output_dir}", f"train.max_steps={args.warmup + args.steps}",
        f"train.log_every={math.gcd(args.warmup, args.steps)}", "train.epochs=1000000", "train.save_every=1000000000",
        "eval.every_epochs=0",
    ]  # fmt: skip
    if args.compile:
        forced.append("train.compile=true")
    if args.peak_tflops is not None:
        forced.append(f"train.peak_tflops={args.peak_tflops}")
    return [*args.overrides, *forced]


def run_trainer(args) -> dict:
    """The trainer's loop (Trainer.fit without its final checkpoint, evaluation and export) in a temporary folder,
    then its figures from the metrics.jsonl it wrote."""
    import torch.distributed as dist

    from gritvlp.train.monitor import Monitor
    from gritvlp.train.trainer import Trainer

    formed_group = not dist.is_initialized()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="bench_step_trainer_") as tmp:
        ds_config = json.loads(args.ds_config.read_text())
        ds_config["train_micro_batch_size_per_gpu"] = args.batch
        ds_path = Path(tmp) / "ds_config.json"
        ds_path.write_text(json.dumps(ds_config))
        cfg = load_config(args.config, trainer_overrides(args, Path(tmp) / "run"))
        try:
            trainer = Trainer(cfg, str(ds_path))
            trainer.prepare_output(resume=None, overwrite=False)
            trainer.resume(None)
            trainer.monitor = Monitor(trainer.output_dir, trainer.total_steps, 0, enabled=True)
            try:
                while not trainer.done():
                    trainer.run_epoch()
            finally:
                trainer.monitor.close()
            rows = [json.loads(line) for line in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
        finally:
            if formed_group and dist.is_initialized():
                dist.destroy_process_group()
    return trainer_figures(trainer, rows, args)


WINDOW_KEYS = ("step", "perf/step_time_s", "perf/data_wait_s", "perf/samples_per_s", "perf/tflops")


def trainer_figures(trainer, rows: list[dict], args) -> dict:
    """The logged windows after the warm-up, summed: every window has log_every steps."""
    every = trainer.cfg.train.log_every
    windows = [r for r in rows if "perf/step_time_s" in r]  # epoch-end rows carry grit/* only
    timed = [r for r in windows if r["step"] > args.warmup]
    steps = every * len(timed)
    seconds = every * sum(r["perf/step_time_s"] for r in timed)
    samples = every * sum(r["perf/samples_per_s"] * r["perf/step_time_s"] for r in timed)
    wait = every * sum(r["perf/data_wait_s"] for r in timed)
    step_s = seconds / steps
    tflops = trainer.step_flops / step_s / 1e12
    return {
        "config": args.config,
        "overrides": args.overrides,
        "ds_config": str(args.ds_config),
        "device": trainer.device.type,
        "dtype": str(trainer.dtype).replace("torch.", ""),
        "world": trainer.world,
        "batch_per_rank": trainer.micro_batch,
        "gradient_accumulation": trainer.grad_accum,
        "warmup": args.warmup,
        "steps": steps,
        "log_every": every,
        "step_s_mean": step_s,
        "samples_per_s": samples / seconds,
        "flops_per_step": trainer.step_flops,
        "achieved_tflops": tflops,
        "peak_tflops": trainer.peak_tflops,
        "mfu": None if trainer.peak_tflops is None else tflops / trainer.peak_tflops,
        "data_wait_s": wait / steps,
        "data_wait_share": wait / seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if trainer.device.type == "cuda" else None,
        "windows": [{k: r[k] for k in WINDOW_KEYS} for r in windows],
    }


def isolated(measure, device: torch.device) -> dict:
    """One measurement; its failure is recorded and the others still run. Frees the device memory after it."""
    try:
        return measure()
    except Exception as err:  # noqa: BLE001 - one failing variant must not stop the others
        return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc().splitlines()[-12:]}
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def print_table(report: dict) -> None:
    print(f"\n{report['device_name']} ({report['dtype']}, batch {report['batch']}, config {report['config']})")
    print(
        f"{'variant':24s} {'step ms':>9s} {'samples/s':>10s} {'peak GiB':>9s} {'TFLOP/s':>8s} {'MFU':>6s}  host syncs"
    )
    for name, r in report["variants"].items():
        if "error" in r:
            print(f"{name:24s} error: {r['error'][:120]}")
            continue
        peak = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        syncs = "-" if r["sync_check"] is None else str(r["sync_check"]["host_syncs"])
        print(
            f"{name:24s} {1e3 * r['step_s_median']:9.2f} {r['samples_per_s']:10.1f} {peak:>9s} "
            f"{r['achieved_tflops']:8.2f} {mfu:>6s}  {syncs}"
        )
    grouping = report["grouping"]
    if "error" in grouping:
        print(f"grouping: error: {grouping['error'][:120]}")
    else:
        print(
            f"grouping: {grouping['seconds']:.3f} s per {grouping['bank_size']} samples = {1e3 * grouping['per_step_s']:.3f} ms per step"
        )
    for key, value in report["ratios"].items():
        print(f"{key}: {value:.3f}")
    print_breakdown(report["variants"])
    trainer = report.get("trainer")
    if trainer is None:
        return
    if "error" in trainer:
        print(f"\ntrainer: error: {trainer['error'][:120]}")
        return
    mfu = "-" if trainer["mfu"] is None else f"{100 * trainer['mfu']:.1f}%"
    print(
        f"\ntrainer ({trainer['dtype']}, {trainer['world']} x {trainer['batch_per_rank']} per rank, mean of "
        f"{trainer['steps']} steps): {1e3 * trainer['step_s_mean']:.2f} ms/step, {trainer['samples_per_s']:.1f} "
        f"samples/s, {trainer['achieved_tflops']:.2f} TFLOP/s, MFU {mfu}, data wait {1e3 * trainer['data_wait_s']:.2f} "
        f"ms/step ({100 * trainer['data_wait_share']:.1f}% of the step)"
    )


def print_breakdown(variants: dict) -> None:
    """Milliseconds per step by phase, one column per variant (device time on CUDA, host time on CPU)."""
    profiled = {name: r["breakdown"] for name, r in variants.items() if r.get("breakdown")}
    if not profiled:
        return
    clock = next(iter(profiled.values()))["clock"]
    print(f"\nper-step breakdown, ms of {clock} time ({', '.join(profiled)}):")
    for phase in PHASES:
        indent = {"vision": 2, "text": 2, "itc": 2, "mining": 4, "itm": 2, "mlm": 2}.get(phase, 0) * " "
        cells = " ".join(f"{b['ms_per_step'][phase]:10.2f}" for b in profiled.values())
        print(f"  {indent + phase:12s} {cells}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.trainer and (device.type == "cuda") != torch.cuda.is_available():
        raise SystemExit("--trainer runs where the trainer does (CUDA when available): drop --device")
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.bfloat16 if (args.dtype or ("bf16" if device.type == "cuda" else "fp32")) == "bf16" else torch.float32
    if args.params == "bf16":
        dtype = torch.bfloat16
    cfg = load_config(args.config, args.overrides)
    settings = optimizer_settings(args.ds_config)
    peak = peak_tflops(device, args.peak_tflops)
    report = {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "config": args.config,
        "overrides": args.overrides,
        "model": dataclasses.asdict(cfg.model),
        "batch": args.batch,
        "dtype": str(dtype).replace("torch.", ""),
        "params": "bf16 parameters, fp32 master weights, no autocast" if args.params == "bf16" else (
            "fp32 parameters" + (" under autocast" if dtype != torch.float32 else "")),
        "optimizer": {**settings, "type": "torch.optim.AdamW(fused=True)", "ds_config": str(args.ds_config)},
        "steps": args.steps,
        "warmup": args.warmup,
        "peak_tflops": peak,
        "compile": args.compile,
        "note": "fused Triton kernels on CUDA" if device.type == "cuda" else (
            "CPU: the loss kernels run their PyTorch reference in every variant, so grit and grit_reference_kernels "
            "run the same code; no MFU, no peak memory, no sync check"
        ),
        "variants": {},
    }  # fmt: skip
    print(f"device: {report['device_name']} ({device.type}), {report['dtype']}, torch {torch.__version__}")
    flops_by_objectives: dict = {}
    for name in args.variants:
        print(f"running {name} ...", flush=True)

        def measure(name=name):
            return run_variant(name, cfg, args, device, dtype, settings, peak, flops_by_objectives)

        report["variants"][name] = result = isolated(measure, device)
        summary = (
            result.get("error") or f"{1e3 * result['step_s_median']:.2f} ms/step, sync check {result['sync_check']}"
        )
        print(f"  {name}: {summary}", flush=True)
    report["grouping"] = isolated(lambda: time_grouping(cfg, args.batch, device), device)
    report["ratios"] = ratios(report["variants"], report["grouping"])
    if args.trainer:
        print("running the trainer ...", flush=True)
        report["trainer"] = isolated(lambda: run_trainer(args), device)
    print_table(report)
    out_path = args.out or ROOT / "benchmarks" / f"step_{device.type}{'_compiled' if args.compile else ''}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_path}")
    return report


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - not installed or broken: no version to report
        return None


if __name__ == "__main__":
    main()
