"""Times one AdamW step over ZeRO-style flat fp32 partitions: torch's fused AdamW (what the trainer uses where
DeepSpeed's FusedAdam cannot be built, and on CPU) against torch's foreach and single-tensor AdamW, and DeepSpeed's
FusedAdam where it builds (CUDA). Same parameters, gradients and settings (ds_configs/zero2.json) for all.

Under ZeRO-2 the optimizer sees one flat fp32 tensor per parameter group (decay / no decay), so the work is a few
large tensors: the figure is memory bandwidth, 16 bytes read and 12 written per parameter and step.

    python scripts/bench_optimizer.py                      # CUDA: 210M parameters (vitb16_bert); CPU: 20M
    python scripts/bench_optimizer.py --params 5e6 --reps 3 --out /tmp/optimizer.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DECAY_SHARE = 0.99  # weight matrices: almost every parameter; biases and norms are the no-decay group


def flat_groups(count: int, device: torch.device, settings: dict) -> list[dict]:
    """Two flat fp32 parameters (decay, no decay) with gradients, as ZeRO-2's partitions are."""
    g = torch.Generator(device="cpu").manual_seed(0)
    sizes = (int(count * DECAY_SHARE), count - int(count * DECAY_SHARE))
    groups = []
    for size, decay in zip(sizes, (settings["weight_decay"], 0.0)):
        param = torch.nn.Parameter((torch.randn(size, generator=g) * 0.02).to(device))
        param.grad = (torch.randn(size, generator=g) * 1e-3).to(device)
        groups.append({"params": [param], "weight_decay": decay})
    return groups


def optimizers(device: torch.device) -> dict:
    """name -> constructor(groups, **settings)."""

    def torch_adamw(**mode):
        return lambda groups, **kw: torch.optim.AdamW(groups, **kw, **mode)

    impls = {
        "torch_fused": torch_adamw(fused=True),
        "torch_foreach": torch_adamw(foreach=True),
        "torch_single_tensor": torch_adamw(foreach=False),
    }
    if device.type == "cuda":
        from gritvlp.train.engine import deepspeed_fused_adam_available

        if deepspeed_fused_adam_available():
            from deepspeed.ops.adam import FusedAdam

            impls["deepspeed_fused_adam"] = lambda groups, **kw: FusedAdam(groups, adam_w_mode=True, **kw)
    return impls


def time_steps(optimizer, device: torch.device, reps: int, warmup: int) -> float:
    """Median seconds of one optimizer.step()."""
    times = []
    for i in range(warmup + reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=float, default=None, help="parameters (CUDA 210e6, CPU 20e6)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/optimizer_<device>.json")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    count = int(args.params or (210e6 if device.type == "cuda" else 20e6))
    config = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())["optimizer"]["params"]
    settings = {"lr": config["lr"], "betas": tuple(config["betas"]), "eps": config["eps"]}
    config_decay = {"weight_decay": config["weight_decay"]}
    report = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "parameters": count,
        "reps": args.reps,
        "results": {},
    }
    for name, make in optimizers(device).items():
        optimizer = make(flat_groups(count, device, config_decay), **settings)
        seconds = time_steps(optimizer, device, args.reps, args.warmup)
        report["results"][name] = {"step_ms": seconds * 1e3, "gb_per_s": count * 28 / seconds / 1e9}
        print(f"{name:22s} {seconds * 1e3:9.2f} ms  {count * 28 / seconds / 1e9:7.1f} GB/s", flush=True)
        del optimizer
    base = report["results"]["torch_foreach"]["step_ms"]
    report["speedup_vs_torch_foreach"] = {name: base / r["step_ms"] for name, r in report["results"].items()}
    out = args.out or ROOT / "benchmarks" / f"optimizer_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
