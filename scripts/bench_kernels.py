"""Benchmark the gritvlp loss kernels: fused Triton vs the PyTorch reference (eager and torch.compile).

    python scripts/bench_kernels.py                      # CUDA: full shapes, bf16, writes benchmarks/kernels_cuda.json
    python scripts/bench_kernels.py --quick --skip-compile

Measures forward and forward+backward time (median over --reps) and the peak memory of forward+backward, for
  ITC: B in {512, 4096, 16384} local = gathered samples, D = 256 (defaults of the objectives: consistency 0.2,
       hardest negatives, stop-gradient keys);
  LM loss: V = 30522, H = 768, batch x tokens in {128 x 25, 1024 x 30}, 50% of the tokens labelled;
       also Liger-Kernel's LigerFusedLinearCrossEntropyLoss when it imports (on all rows, as it is used, and on
       the labelled rows only).
Ratios are against the eager reference: speedup = t_eager / t, memory = peak / peak_eager.

The fused kernels need CUDA. On a CPU machine only the reference runs (eager, and compiled unless
--skip-compile), in fp32; --quick shrinks the shapes. The output and the JSON say so. Peak memory is
torch.cuda.max_memory_allocated on CUDA; on CPU it is the peak of live tensor storage seen at dispatch, which
compiled code bypasses, so torch.compile gets no CPU memory figure (tensors created before the measured
call, i.e. the inputs, are not counted on either device). CPU timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
FULL_ITC = [512, 4096, 16384]
FULL_LM = [(128, 25), (1024, 30)]
QUICK_ITC = [128, 512, 1024]
QUICK_LM = [(16, 25), (64, 25)]
DIM, HIDDEN, VOCAB = 256, 768, 30522


class _LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage created under the mode and still alive (CPU peak-memory stand-in)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def peak_bytes(run, device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with _LiveTensorBytes() as tracker:
        run()
    return tracker.peak


def median_ms(run, device, reps, warmup) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(make_call, params, device, reps, warmup, memory=True) -> dict:
    """make_call() -> (forward, forward_backward); times both, peak memory of forward + backward."""

    forward, forward_backward = make_call()

    def fwd():
        with torch.no_grad():
            forward()

    def fwd_bwd():
        for p in params:
            p.grad = None
        forward_backward()

    t0 = time.perf_counter()
    fwd_bwd()  # first call: autotuning / compilation
    if device.type == "cuda":
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    res = {
        "fwd_ms": median_ms(fwd, device, reps, warmup),
        "fwd_bwd_ms": median_ms(fwd_bwd, device, reps, warmup),
        "first_call_s": round(first_s, 3),
    }
    for p in params:
        p.grad = None
    res["peak_mib"] = peak_bytes(fwd_bwd, device) / 2**20 if memory else None
    return res


def itc_inputs(b, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    img = F.normalize(torch.randn(b, DIM, generator=g), dim=-1).to(device, dtype).requires_grad_()
    txt = F.normalize(torch.randn(b, DIM, generator=g), dim=-1).to(device, dtype).requires_grad_()
    temp = torch.tensor(0.07, device=device, requires_grad=True)
    return img, txt, temp, torch.arange(b, device=device)


def lm_inputs(batch, tokens, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(batch, tokens, HIDDEN, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.02).to(device, dtype).requires_grad_()
    bias = torch.zeros(VOCAB, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, VOCAB, (batch, tokens), generator=g)
    labels[torch.rand(batch, tokens, generator=g) >= 0.5] = -100
    return hidden, weight, bias, labels.to(device)


def itc_impls(args, device):
    from gritvlp.kernels import reference

    impls = {"eager": reference.itc_loss}
    if device.type == "cuda":
        from gritvlp.kernels import itc

        impls["fused"] = itc.itc_loss
    if not args.skip_compile:
        impls["compile"] = torch.compile(reference.itc_loss)
    return impls


def lm_impls(args, device):
    from gritvlp.kernels import reference

    impls = {"eager": reference.lm_loss}
    if device.type == "cuda":
        from gritvlp.kernels import lm_loss

        impls["fused"] = lm_loss.lm_loss
    if not args.skip_compile:
        impls["compile"] = torch.compile(reference.lm_loss)
    liger = _liger_loss() if device.type == "cuda" and not args.no_liger else None
    if liger is not None:

        def liger_all_rows(hidden, weight, bias, labels):
            return liger(weight, hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), bias)

        def liger_labelled_rows(hidden, weight, bias, labels):
            keep = labels != -100
            return liger(weight, hidden[keep], labels[keep], bias)

        impls["liger"] = liger_all_rows
        impls["liger_labelled"] = liger_labelled_rows
    return impls


def _liger_loss():
    """Liger-Kernel's fused linear cross-entropy, or None where it does not import (it needs CUDA + Triton)."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        print(f"  (Liger-Kernel not available: {type(e).__name__}: {e})")
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=-100)


def run_suite(name, shapes, impls, make_inputs, call, args, device, dtype):
    rows = []
    for shape in shapes:
        inputs = make_inputs(shape, dtype, device)
        params = [x for x in inputs if torch.is_tensor(x) and x.requires_grad]
        results = {}
        for impl_name, fn in impls.items():

            def make_call(fn=fn, inputs=inputs):
                return (lambda: call(fn, inputs)), (lambda: call(fn, inputs).backward())

            try:
                # on CPU, compiled code allocates its buffers outside the dispatcher: no peak figure for it
                memory = device.type == "cuda" or impl_name != "compile"
                results[impl_name] = measure(make_call, params, device, args.reps, args.warmup, memory)
            except Exception as e:  # noqa: BLE001 - one failing implementation must not stop the others
                results[impl_name] = {"error": f"{type(e).__name__}: {e}"}
                if args.verbose:
                    traceback.print_exc()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append({"shape": _shape_dict(name, shape), "results": results, "ratios": _ratios(results)})
        _print_row(name, rows[-1])
    return rows


def _shape_dict(name, shape):
    if name == "itc":
        return {"B": shape, "N": shape, "D": DIM}
    batch, tokens = shape
    return {"batch": batch, "tokens": tokens, "V": VOCAB, "H": HIDDEN, "labelled": 0.5}


def _ratios(results):
    eager = results.get("eager", {})
    out = {}
    for name, r in results.items():
        if name == "eager" or "error" in r or "error" in eager:
            continue
        out[name] = {
            "fwd_speedup": eager["fwd_ms"] / r["fwd_ms"],
            "fwd_bwd_speedup": eager["fwd_bwd_ms"] / r["fwd_bwd_ms"],
            "peak_memory_ratio": r["peak_mib"] / eager["peak_mib"] if r["peak_mib"] and eager["peak_mib"] else None,
        }
    return out


def _print_row(name, row):
    print(f"{name} {row['shape']}")
    for impl, r in row["results"].items():
        if "error" in r:
            print(f"  {impl:15s} error: {r['error'][:200]}")
            continue
        peak = "      n/a" if r["peak_mib"] is None else f"{r['peak_mib']:9.1f}"
        line = f"  {impl:15s} fwd {r['fwd_ms']:9.3f} ms  fwd+bwd {r['fwd_bwd_ms']:9.3f} ms  peak {peak} MiB"
        ratio = row["ratios"].get(impl)
        if ratio:
            mem = ratio["peak_memory_ratio"]
            line += f"  | vs eager: fwd x{ratio['fwd_speedup']:.2f}  fwd+bwd x{ratio['fwd_bwd_speedup']:.2f}"
            line += f"  memory {mem:.3f}" if mem is not None else ""
        print(line)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (the CPU default run)")
    parser.add_argument("--skip-compile", action="store_true", help="leave out torch.compile(reference)")
    parser.add_argument("--no-liger", action="store_true", help="leave out Liger-Kernel")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="CUDA: bf16, CPU: fp32")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (CUDA 20, CPU 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed repetitions (CUDA 3, CPU 1)")
    parser.add_argument("--only", choices=["itc", "lm"], default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/kernels_<device>.json)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if cuda else "fp32")
    ]
    args.reps = args.reps or (20 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    out_path = args.out or ROOT / "benchmarks" / f"kernels_{device.type}.json"
    itc_shapes = QUICK_ITC if args.quick else FULL_ITC
    lm_shapes = QUICK_LM if args.quick else FULL_LM

    note = (
        "CUDA: fused Triton kernels vs the PyTorch reference"
        if cuda
        else "CPU machine: the fused Triton kernels need CUDA, so only the PyTorch reference ran "
        "(eager" + ("" if args.skip_compile else " and torch.compile") + "); no fused figures here"
    )
    device_name = torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine())
    print(f"device: {device_name} ({device.type}), dtype {dtype}, torch {torch.__version__}")
    print(f"NOTE: {note}" + (" [--quick shapes]" if args.quick else ""))

    report = {
        "device": device.type,
        "device_name": device_name,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "liger_kernel": _version("liger_kernel"),
        "dtype": str(dtype).replace("torch.", ""),
        "quick": args.quick,
        "reps": args.reps,
        "fused_ran": cuda,
        "note": note,
        "metrics": "median ms over reps; peak_mib of one forward+backward beyond the inputs; ratios vs eager",
        "itc": [],
        "lm": [],
    }
    if args.only in (None, "itc"):
        report["itc"] = run_suite(
            "itc",
            itc_shapes,
            itc_impls(args, device),
            lambda b, dt, dev: itc_inputs(b, dt, dev),
            lambda fn, x: fn(x[0], x[1], x[2], group_ids=x[3]).loss,
            args,
            device,
            dtype,
        )
    if args.only in (None, "lm"):
        report["lm"] = run_suite(
            "lm",
            lm_shapes,
            lm_impls(args, device),
            lambda shape, dt, dev: lm_inputs(*shape, dt, dev),
            lambda fn, x: fn(*x),
            args,
            device,
            dtype,
        )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_path}")


def _version(module):
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    sys.exit(main())
