"""Bytes a training step spends on dtype casts: fp32 parameters under bf16 autocast (a PyTorch AMP step, and
scripts/bench_step.py's harness) against bf16 parameters with fp32 master weights (DeepSpeed's bf16 engine: what
`deepspeed scripts/pretrain.py` runs with "bf16": {"enabled": true}).

Forward and backward of the GRIT objective run under a dispatch-level census that records every cast
(aten._to_copy and aten.copy_ between dtypes) with the bytes it reads and writes, split into parameter-shaped
tensors (weights and their gradients) and the rest (activations). The optimizer's casts are added by count, not
measured: autocast's fused AdamW updates the fp32 parameters in place (none); DeepSpeed's bf16 engine casts each
gradient into its fp32 partition and copies the updated fp32 master back into the bf16 parameters (two per
parameter, 6 bytes each per element).

The step runs as on a GPU where the CPU would take another path: the loss kernels are the fused Triton ones
(through the interpreter; the PyTorch reference's fp32 logits are not what a GPU runs), and attention dropout is
0, because CPU SDPA with dropout falls back to an fp32 math path, while CUDA's flash and memory-efficient kernels
run bf16 with dropout.

Activation bytes grow with the batch, parameter bytes do not: the census runs at two batch sizes and extrapolates
linearly to --target-batch. The time those bytes take at a GPU's memory bandwidth is a lower bound on what the casts
cost there (every cast is a memory-bound kernel; launch overheads come on top).

    python scripts/bench_precision.py                       # vitb16_bert, batches 3 and 5 -> 128; CPU, minutes
    python scripts/bench_precision.py --config demo --batches 4 8 --out /tmp/precision.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import platform
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
aten = torch.ops.aten
MEMORY_BANDWIDTH_TBPS = {"H100 SXM": 3.35, "H200": 4.8}  # HBM3 / HBM3e, the vendors' figures


@functools.cache
def _bench_step():
    """scripts/bench_step.py as a module: its synthetic batches are the step's input here too."""
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "scripts" / "bench_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class CastCensus(TorchDispatchMode):
    """Counts dtype casts and the bytes they move (read + write), by kind: 'parameter' for tensors shaped like one
    of the model's parameters (the weights and their gradients), 'activation' for the rest."""

    def __init__(self, parameter_shapes: set[tuple[int, ...]]):
        super().__init__()
        self.parameter_shapes = parameter_shapes
        self.casts = defaultdict(lambda: {"count": 0, "bytes": 0})

    def _record(self, source: torch.Tensor, target_dtype: torch.dtype) -> None:
        if source.dtype == target_dtype or not source.is_floating_point():
            return
        kind = "parameter" if tuple(source.shape) in self.parameter_shapes else "activation"
        entry = self.casts[kind]
        entry["count"] += 1
        entry["bytes"] += source.numel() * (source.element_size() + torch.empty((), dtype=target_dtype).element_size())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._to_copy.default and kwargs.get("dtype") is not None:
            self._record(args[0], kwargs["dtype"])
        elif func in (aten.copy_.default,) and isinstance(args[1], torch.Tensor):
            self._record(args[1], args[0].dtype)
        return func(*args, **kwargs)


def census(cfg, batch: int, mode: str) -> dict:
    """Casts of one forward + backward of the GRIT objective at `batch`, in `mode` (autocast | bf16_params)."""
    bench = _bench_step()
    torch.manual_seed(0)
    objective = bench.PretrainingObjective(bench.GritVLP(cfg.model), cfg.objectives).train()
    if mode == "bf16_params":
        objective = objective.bfloat16()  # as DeepSpeed's bf16 engine converts the module
    batches = bench.SyntheticBatches(objective, batch, cfg.data.max_tokens, torch.device("cpu"), torch.bfloat16)
    step = batches(0)
    shapes = {tuple(p.shape) for p in objective.parameters()}
    with CastCensus(shapes) as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            out = objective(step)
        out["loss"].backward()
    return {kind: dict(entry) for kind, entry in counter.casts.items()}


def optimizer_casts(mode: str, parameters: int) -> dict:
    """The optimizer step's casts, by count (see the module docstring)."""
    if mode == "autocast":
        return {"count": 0, "bytes": 0}
    return {"count": 2, "bytes": 2 * parameters * (2 + 4), "note": "grad bf16 -> fp32 partition, fp32 master -> bf16"}


@contextlib.contextmanager
def production_lm_block():
    """The fused LM loss's production vocabulary block under the Triton interpreter too (its small default there
    serves the tests, which must cross blocks), for the duration of the block."""
    import gritvlp.kernels  # noqa: F401 - binds the fused module (its name is taken by the function)

    module = sys.modules["gritvlp.kernels.lm_loss"]
    previous, module._MAX_BLOCK_V = module._MAX_BLOCK_V, 8192
    try:
        yield
    finally:
        module._MAX_BLOCK_V = previous


def extrapolate(small: int, large: int, batches: tuple[int, int], target: int) -> int:
    """Linear in the batch through the two measured points."""
    (b0, b1), (y0, y1) = batches, (small, large)
    slope = (y1 - y0) / (b1 - b0)
    return int(round(y0 + slope * (target - b0)))


def git_commit() -> str | None:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return head.stdout.strip() or None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="vitb16_bert")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    parser.add_argument("--batches", type=int, nargs=2, default=[3, 5],
                        help="the two measured batch sizes (not 2: the ITM head's weight is [2, H])")  # fmt: skip
    parser.add_argument("--target-batch", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "precision_casts_cpu.json")
    args = parser.parse_args(argv)

    os.environ.setdefault("TRITON_INTERPRET", "1")  # before gritvlp.kernels is imported; see the docstring
    from gritvlp.config import load_config
    from gritvlp.train.flops import kernels_backend

    cfg = load_config(args.config, args.overrides)
    text = {**cfg.model.text_config, "attention_probs_dropout_prob": 0.0}
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, text_config=text))
    parameters = sum(p.numel() for p in _bench_step().GritVLP(cfg.model).parameters())
    report = {
        "config": args.config,
        "overrides": args.overrides,
        "parameters": parameters,
        "measured_batches": args.batches,
        "target_batch": args.target_batch,
        "device": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "modes": {},
    }
    for mode in ("autocast", "bf16_params"):
        with kernels_backend("triton"), production_lm_block():  # the fused kernels, as on a GPU (see the docstring)
            measured = [census(cfg, batch, mode) for batch in args.batches]
        row = {"measured": dict(zip(map(str, args.batches), measured)), "at_target_batch": {}}
        for kind in ("parameter", "activation"):
            points = [m.get(kind, {"bytes": 0})["bytes"] for m in measured]
            row["at_target_batch"][f"{kind}_bytes"] = extrapolate(*points, tuple(args.batches), args.target_batch)
        row["optimizer"] = optimizer_casts(mode, parameters)
        total = sum(row["at_target_batch"].values()) + row["optimizer"]["bytes"]
        row["total_bytes_per_step"] = total
        row["lower_bound_ms"] = {gpu: total / (tbps * 1e12) * 1e3 for gpu, tbps in MEMORY_BANDWIDTH_TBPS.items()}
        report["modes"][mode] = row
        print(mode, json.dumps(row), flush=True)
    auto, bf16 = (report["modes"][m]["total_bytes_per_step"] for m in ("autocast", "bf16_params"))
    report["bf16_params_over_autocast_bytes"] = bf16 / auto if auto else None
    report["saved_ms_lower_bound"] = {
        gpu: (auto - bf16) / (tbps * 1e12) * 1e3 for gpu, tbps in MEMORY_BANDWIDTH_TBPS.items()
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
