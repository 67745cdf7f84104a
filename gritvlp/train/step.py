"""One micro-step of training, as the trainer and scripts/bench_step.py run it: seeds, the host-to-device copy,
forward and backward with a device-side finite check, and the features handed to the GRIT bank.

Nothing here makes the host wait for the device: the finite flag stays a device tensor and NonFiniteGuard reads
its counters only when asked (on logging steps and before checkpoints).
"""

from __future__ import annotations

import hashlib
import logging

import torch
import torch.distributed as dist

from gritvlp.data.device_images import decode_batch, normalize_pixels

log = logging.getLogger("gritvlp.train")
MAX_CONSECUTIVE_BAD_STEPS = 20


def step_seed(seed: int, micro_step: int, rank: int, stream: str = "") -> int:
    """Model-side randomness (masking, dropout, sampled negatives) is a pure function of the step, so a
    resumed run draws exactly what an uninterrupted one would. Each `stream` gets its own seed, so that
    generators seeded for one step draw independent numbers."""
    tag = f"{seed}:{micro_step}:{rank}" + (f":{stream}" if stream else "")
    digest = hashlib.sha256(tag.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def batch_or_fallback(host_batch: dict, fallback: dict | None) -> tuple[dict, bool]:
    """The batch to run and whether it is usable. One that skips left with fewer than 2 samples is replaced by the
    last good one (`fallback`), whose loss the caller then zeroes: every rank must run the same forward and
    backward."""
    if host_batch["input_ids"].shape[0] >= 2:
        return host_batch, True
    if fallback is None:
        raise RuntimeError("the first batch of the run has fewer than 2 readable samples: check the data")
    return fallback, False


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Asynchronous copies: tensors the loader did not pin (the MLM inputs) are pinned first, because a copy
    from pageable memory may make the host wait for the device. An EncodedBatch image is decoded and augmented on
    the device (gritvlp.data.device_images)."""

    def pinned(t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory() if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned() else t

    out = {k: pinned(v).to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
    if "image" not in out:  # data.image_decode=device: JPEG bytes and drawn parameters, decoded here
        out["image"] = decode_batch(batch["image"], device)
    elif out["image"].dtype == torch.uint8:  # the training loader's pixels: normalised here, a quarter of the bytes
        out["image"] = normalize_pixels(out["image"])
    out["image"] = out["image"].to(dtype)
    return out


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
        if in_window and (not dist.is_initialized() or dist.get_rank() == 0):
            log.warning(
                "%d non-finite losses in steps %d-%d: each was replaced by zero before backward",
                in_window, self.checked_step + 1, global_step,
            )  # fmt: skip
        self.checked_step = global_step
        if consecutive >= MAX_CONSECUTIVE_BAD_STEPS:
            raise FloatingPointError(f"{consecutive} consecutive non-finite losses; the last checkpoint is kept intact")
        return consecutive


def forward_backward(engine, batch: dict, usable: bool, guard: NonFiniteGuard, *inputs) -> tuple[dict, torch.Tensor]:
    """One micro-step's forward and backward; a non-finite loss (or a stand-in batch) backpropagates zero. `inputs`
    follow the batch into the objective's forward. Returns the objective's outputs and the device flag of a finite
    loss."""
    out = engine(batch, *inputs)
    finite = torch.isfinite(out["loss"])
    guard.update(finite)
    engine.backward(torch.where(finite, out["loss"], 0.0) * (1.0 if usable else 0.0))
    return out, finite


def bank_features(out: dict, finite: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's features for the GRIT bank, zeroed where the step or the value is not finite (a zero feature
    is equally similar to every sample; a NaN would poison the grouping)."""
    return tuple(torch.where(finite & torch.isfinite(f), f, 0.0) for f in (out["image_feat"], out["text_feat"]))


def optimizer_step(engine, model) -> None:
    """DeepSpeed's step; on an optimiser-step boundary, the model's stored temperature is then clamped into its
    bounds (see clamp_stored). Every rank calls it."""
    boundary = engine.is_gradient_accumulation_boundary()
    engine.step()
    if boundary:
        clamp_stored(model.temp, model.config.temp_min, model.config.temp_max, engine.optimizer)


@torch.no_grad()
def clamp_stored(param: torch.nn.Parameter, low: float, high: float, optimizer) -> None:
    """Clamps a parameter into [low, high] in place, as ALBEF clamps its temperature at every forward, wherever the
    engine stores it: the module's copy and the optimizer's fp32 master copy (kept apart under ZeRO and mixed
    precision; each step updates it and copies it over the module's, so clamping the module's alone would not last).

    Adam's momentum carries a parameter on past a bound its gradient no longer crosses (see bounded_temperature), so
    without this the stored temperature drifts out of range, and code that reads it unclamped (ALBEF's retrieval
    model, of an exported checkpoint) would use that value."""
    if hasattr(param, "ds_id"):  # ZeRO-3: this rank's partition (padding past the tensor's end is never read)
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        master = safe_get_local_fp32_param(param)
        if master is not None:
            safe_set_local_fp32_param(param, master.clamp(low, high))
        param.ds_tensor.clamp_(low, high)
    elif hasattr(param, "_hp_mapping"):  # ZeRO 1-2 and DeepSpeed's bf16 optimizer: fragments across ranks
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        safe_set_full_fp32_param(param, safe_get_full_fp32_param(param).clamp(low, high))
    else:
        master = _fp16_optimizer_master(optimizer, param)
        if master is not None:
            master.clamp_(low, high)
    param.data.clamp_(low, high)  # under ZeRO-3 empty unless the parameter is small enough to stay gathered


def _fp16_optimizer_master(optimizer, param: torch.nn.Parameter) -> torch.Tensor | None:
    """The fp32 master copy of param in DeepSpeed's FP16_Optimizer (fp16 or bf16 without ZeRO: flat per group) or
    FP16_UnfusedOptimizer (one tensor per parameter); None when the parameter is its own master (fp32)."""
    for i, group in enumerate(getattr(optimizer, "fp16_groups", ())):
        offset = 0
        for j, p in enumerate(group):
            if p is param:
                if hasattr(optimizer, "fp32_groups_flat"):
                    return optimizer.fp32_groups_flat[i].narrow(0, offset, p.numel())
                return optimizer.fp32_groups[i][j]
            offset += p.numel()
    return None
