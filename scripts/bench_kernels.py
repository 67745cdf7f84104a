"""Benchmark the gritvlp loss kernels: fused Triton vs the PyTorch reference (eager and torch.compile).

    python scripts/bench_kernels.py                      # CUDA: full shapes, bf16, writes benchmarks/kernels_cuda.json
    python scripts/bench_kernels.py --quick --skip-compile

Measures forward and forward+backward time (median over --reps) and the peak memory of forward+backward, for
  ITC: (local B, gathered N) in {(512, 512), (4096, 4096), (4096, 32768)}, D = 256, the objectives' defaults
       (consistency 0.2, hardest negatives, stop-gradient keys); N > B is a batch gathered from N / B ranks; at
       B = N = 4096 also HN-NCE (beta 0.5), sampled negatives, and gradients into the keys;
  LM loss: V = 30522, H = 768, on 1920 and 7680 labelled rows (128 x 30 and 512 x 30 tokens, half of them masked),
       compacted as the training step hands them over (ignore_index=None); also Liger-Kernel's
       LigerFusedLinearCrossEntropyLoss and Cut Cross-Entropy's linear_cross_entropy on the same rows when they
       import.
The baseline, `eager`, is the reference as a PyTorch user would run it: on CUDA under bf16 autocast (matrix
products in bf16 through cuBLAS, softmax and losses in fp32); `eager_fp32` is the same code without autocast (the
test oracle). Ratios are against `eager`: speedup = t_eager / t, memory = peak / peak_eager. The JSON is written
after every shape, so a run cut short keeps what it measured.

On a CPU machine the reference runs (eager, and compiled unless --skip-compile) in fp32; --quick shrinks the
shapes. The fused kernels run there only through the Triton interpreter (TRITON_INTERPRET=1, set unless the
environment says otherwise), which takes minutes per call at those shapes, so only on tiny extra shapes first
(D = 32, V = 64): a check that the whole benchmark runs, whose fused times measure the interpreter. The output
and the JSON ("fused_ran": false, "fused_interpreted") say so. Peak memory is
torch.cuda.max_memory_allocated on CUDA; on CPU it is the peak of live tensor storage seen at dispatch, which
compiled code bypasses, so torch.compile gets no CPU memory figure (tensors created before the measured
call, i.e. the inputs, are not counted on either device). CPU timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
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
DIM, HIDDEN, VOCAB = 256, 768, 30522


def itc_case(b, n, d=DIM, **kwargs):
    """An ITC shape as the JSON records it: local B, gathered N, D, and keyword arguments of itc_terms."""
    return {"B": b, "N": n, "D": d, **kwargs}


def lm_case(rows, vocab=VOCAB, hidden=HIDDEN):
    return {"labelled_rows": rows, "V": vocab, "H": hidden}


FULL_ITC = [itc_case(512, 512), itc_case(4096, 4096), itc_case(4096, 32768), itc_case(4096, 4096, hn_beta=0.5),
            itc_case(4096, 4096, negatives="sample"), itc_case(4096, 4096, stop_grad_keys=False)]  # fmt: skip
QUICK_ITC = [itc_case(128, 128), itc_case(256, 1024), itc_case(256, 256, hn_beta=0.5),
             itc_case(256, 256, stop_grad_keys=False)]  # fmt: skip
FULL_LM = [lm_case(1920), lm_case(7680)]
QUICK_LM = [lm_case(200), lm_case(800)]
# CPU: the only shapes where the fused kernels run, interpreted (a second or so per call; B = N = 128 at D = 256
# takes minutes, and so does the interpreted cross-entropy over V = 30522 for a few rows)
INTERPRETED_ITC = [itc_case(16, 16, 32), itc_case(16, 64, 32, hn_beta=0.5, stop_grad_keys=False)]
INTERPRETED_LM = [lm_case(16, 64, 32)]


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


def measure(forward, params, device, reps, warmup, memory=True) -> dict:
    """Times forward() (a scalar loss) without and with its backward; peak memory of forward + backward."""

    def fwd():
        with torch.no_grad():
            forward()

    def fwd_bwd():
        for p in params:
            p.grad = None
        forward().backward()

    t0 = time.perf_counter()
    fwd_bwd()  # first call: autotuning / compilation
    if device.type == "cuda":
        torch.cuda.synchronize()
    res = {"first_call_s": round(time.perf_counter() - t0, 3)}
    res["fwd_ms"] = median_ms(fwd, device, reps, warmup)
    res["fwd_bwd_ms"] = median_ms(fwd_bwd, device, reps, warmup)
    for p in params:
        p.grad = None
    res["peak_mib"] = peak_bytes(fwd_bwd, device) / 2**20 if memory else None
    return res


# -- inputs -----------------------------------------------------------------------------------------------------------
def itc_inputs(case, dtype, device):
    """Local features [B, D] (leaves), the gathered ones [N, D] holding them at rows [offset, offset + B); with
    stop_grad_keys=False the gathered features are the leaves (the local ones are views of them)."""
    b, n, d = case["B"], case["N"], case["D"]
    kwargs = {k: v for k, v in case.items() if k not in ("B", "N", "D")}
    g = torch.Generator(device="cpu").manual_seed(0)
    image_all = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(device, dtype)
    text_all = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(device, dtype)
    temp = torch.tensor(0.07, device=device, requires_grad=True)
    offset = (n - b) // 2
    if not kwargs.get("stop_grad_keys", True):
        image_all.requires_grad_()
        text_all.requires_grad_()
        return {"params": [image_all, text_all, temp], "feats": (image_all, text_all, temp, offset, b, kwargs)}
    img = image_all[offset : offset + b].clone().requires_grad_()
    txt = text_all[offset : offset + b].clone().requires_grad_()
    return {"params": [img, txt, temp], "feats": (img, txt, temp, image_all, text_all, offset, kwargs)}


def itc_call(fn, inputs):
    feats = inputs["feats"]
    if len(feats) == 6:  # keys with gradient: the local batch is a slice of the gathered leaves
        image_all, text_all, temp, offset, b, kwargs = feats
        img, txt = image_all[offset : offset + b], text_all[offset : offset + b]
    else:
        img, txt, temp, image_all, text_all, offset, kwargs = feats
    gathered = dict(image_all=image_all, text_all=text_all, offset=offset) if image_all.shape[0] > img.shape[0] else {}
    return fn(img, txt, temp, **gathered, **kwargs)


def lm_inputs(case, dtype, device):
    rows, vocab, hidden_size = case["labelled_rows"], case["V"], case["H"]
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(rows, hidden_size, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.02).to(device, dtype).requires_grad_()
    bias = torch.zeros(vocab, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,), generator=g).to(device)
    return {"params": [hidden, weight, bias], "feats": (hidden, weight, bias, labels)}


def lm_call(fn, inputs):
    return fn(*inputs["feats"])


# -- implementations --------------------------------------------------------------------------------------------------
def autocast_bf16(fn, device):
    """fn as a PyTorch user runs it under bf16 autocast (CUDA): matrix products in bf16, softmax/losses in fp32."""

    def run(*args, **kwargs):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return fn(*args, **kwargs)

    return run


def itc_loss(backend):
    """The scalar a training step backpropagates: the kernel's ITC terms weighted by the objective's ITA
    (gritvlp.objectives.itc.ita) at the default consistency weight, so the backward of every term is timed."""
    from gritvlp import kernels
    from gritvlp.config import ObjectivesConfig
    from gritvlp.objectives.itc import ita

    cfg = ObjectivesConfig()

    def loss(image_feat, text_feat, temp, **kwargs):
        terms = kernels.itc_terms(image_feat, text_feat, temp, backend=backend, **kwargs)
        return ita(terms, cfg.consistency_weight, cfg.itc_smoothing)

    return loss


def lm_loss(backend, weight_grad_accumulation="fp32"):
    """The masked-LM loss on rows that are all labelled, as the training step hands them over (ignore_index=None);
    weight_grad_accumulation as objectives.lm_weight_grad_accumulation."""
    from gritvlp import kernels

    def loss(hidden, weight, bias, labels):
        return kernels.lm_loss(hidden, weight, bias, labels, backend=backend, ignore_index=None,
                               weight_grad_accumulation=weight_grad_accumulation)  # fmt: skip

    return loss


def itc_impls(args, device, fused):
    impls = {"eager": autocast_bf16(itc_loss("reference"), device)}
    if device.type == "cuda":
        impls["eager_fp32"] = itc_loss("reference")
    if fused:
        impls["fused"] = itc_loss("triton")
    if not args.skip_compile:
        impls["compile"] = autocast_bf16(torch.compile(itc_loss("reference")), device)
    return impls


def lm_impls(args, device, fused):
    impls = {"eager": autocast_bf16(lm_loss("reference"), device)}
    if fused:
        impls["fused"] = lm_loss("triton")
        impls["fused_bf16_sum"] = lm_loss("triton", "bf16")  # d W summed in bf16 (with bf16 weights; else fp32)
    if not args.skip_compile:
        impls["compile"] = autocast_bf16(torch.compile(lm_loss("reference")), device)
    if device.type == "cuda" and not args.no_liger:
        impls.update(_peer_lm_losses())
    return impls


def _peer_lm_losses() -> dict:
    """Liger-Kernel's and Cut Cross-Entropy's fused linear cross-entropy, where they import (CUDA + Triton)."""
    peers = {}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        peers["liger"] = lambda hidden, weight, bias, labels: liger(weight, hidden, labels, bias)
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        print(f"  (Liger-Kernel not available: {type(e).__name__}: {e})")
    try:
        from cut_cross_entropy import linear_cross_entropy

        peers["cut_cross_entropy"] = lambda hidden, weight, bias, labels: linear_cross_entropy(
            hidden, weight, labels, bias=bias
        )
    except Exception as e:  # noqa: BLE001
        print(f"  (Cut Cross-Entropy not available: {type(e).__name__}: {e})")
    return peers


# -- running and reporting --------------------------------------------------------------------------------------------
def suite_plan(cases, impls, interpreted_cases, interpreted):
    """(case, implementations) pairs: under the CPU interpreter the fused kernel runs on the tiny shapes only."""
    if not interpreted:
        return [(case, impls) for case in cases]
    unfused = {name: fn for name, fn in impls.items() if not name.startswith("fused")}
    return [(case, impls) for case in interpreted_cases] + [(case, unfused) for case in cases]


def run_suite(name, plan, make_inputs, call, args, device, dtype, on_row):
    rows = []
    for case, impls in plan:
        # compiled code per shape, as a training run has: the guards of earlier shapes would otherwise reach the
        # recompile limit, after which torch.compile runs the function eagerly
        torch.compiler.reset()
        inputs = make_inputs(case, dtype, device)
        results = {}
        for impl_name, fn in impls.items():
            try:
                # on CPU, compiled code allocates its buffers outside the dispatcher: no peak figure for it
                memory = device.type == "cuda" or impl_name != "compile"
                results[impl_name] = measure(
                    lambda fn=fn, inputs=inputs: call(fn, inputs),
                    inputs["params"],
                    device,
                    args.reps,
                    args.warmup,
                    memory,
                )
            except Exception as e:  # noqa: BLE001 - one failing implementation must not stop the others
                results[impl_name] = {"error": f"{type(e).__name__}: {e}"}
                if args.verbose:
                    traceback.print_exc()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append({"shape": dict(case), "results": results, "ratios": _ratios(results)})
        _print_row(name, rows[-1])
        on_row(rows)
    return rows


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
            print(f"  {impl:17s} error: {r['error'][:200]}")
            continue
        peak = "      n/a" if r["peak_mib"] is None else f"{r['peak_mib']:9.1f}"
        line = f"  {impl:17s} fwd {r['fwd_ms']:9.3f} ms  fwd+bwd {r['fwd_bwd_ms']:9.3f} ms  peak {peak} MiB"
        ratio = row["ratios"].get(impl)
        if ratio:
            mem = ratio["peak_memory_ratio"]
            line += f"  | vs eager: fwd x{ratio['fwd_speedup']:.2f}  fwd+bwd x{ratio['fwd_bwd_speedup']:.2f}"
            line += f"  memory {mem:.3f}" if mem is not None else ""
        print(line, flush=True)


def environment(device) -> dict:
    """What the figures depend on: device, clocks, versions, matmul precision flags, the commit."""
    env = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "liger_kernel": _version("liger-kernel"),
        "cut_cross_entropy": _version("cut-cross-entropy"),
        "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "git_commit": _command(["git", "-C", str(ROOT), "rev-parse", "HEAD"]),
    }
    if device.type == "cuda":
        query = "clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu"
        env["nvidia_smi"] = _command(["nvidia-smi", f"--query-gpu={query}", "--format=csv"])
    return env


def autotuned_configs() -> dict:
    """The config each fused ITC kernel's autotuner picked, per key it saw (under the CPU interpreter its one
    config: read there too, so that a renamed kernel fails on CPU rather than on the GPU)."""
    try:
        from gritvlp.kernels import itc
    except ImportError:
        return {}
    kernels = {"fwd": itc._itc_fwd, "merge": itc._itc_merge, "dq": itc._itc_dq, "dk": itc._itc_dk}
    return {name: {str(key): str(cfg) for key, cfg in k.cache.items()} for name, k in kernels.items()}


def _command(argv) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip() or None
    return None


def _version(distribution):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (the CPU default run)")
    parser.add_argument("--skip-compile", action="store_true", help="leave out torch.compile(reference)")
    parser.add_argument("--no-liger", action="store_true", help="leave out Liger-Kernel and Cut Cross-Entropy")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="CUDA: bf16, CPU: fp32")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (CUDA 20, CPU 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed repetitions (CUDA 3, CPU 1)")
    parser.add_argument("--only", choices=["itc", "lm"], default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/kernels_<device>.json)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    if not cuda:  # Triton decides at kernel definition: before gritvlp.kernels is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    interpreted = not cuda and os.environ["TRITON_INTERPRET"] == "1"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if cuda else "fp32")
    ]
    args.reps = args.reps or (20 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    out_path = args.out or ROOT / "benchmarks" / f"kernels_{device.type}.json"

    reference = "eager" + ("" if args.skip_compile else " and torch.compile")
    if cuda:
        note = "CUDA: fused Triton kernels vs the PyTorch reference under bf16 autocast"
    elif interpreted:
        note = (
            f"CPU machine: the PyTorch reference ({reference}) at every shape; the fused Triton kernels only through "
            "the Triton interpreter, at the tiny shapes (D = 32, V = 64), where their times measure the interpreter"
        )
    else:
        note = f"CPU machine without TRITON_INTERPRET=1: only the PyTorch reference ran ({reference}); no fused figures"
    report = {
        **environment(device),
        "dtype": str(dtype).replace("torch.", ""),
        "quick": args.quick,
        "reps": args.reps,
        "fused_ran": cuda,
        "fused_interpreted": interpreted,
        "note": note,
        "metrics": "median ms over reps; peak_mib of one forward+backward beyond the inputs; ratios vs eager",
        "itc": [],
        "lm": [],
    }
    print(f"device: {report['device_name']} ({device.type}), dtype {dtype}, torch {torch.__version__}")
    print(f"NOTE: {note}" + (" [--quick shapes]" if args.quick else ""))

    def write(suite):
        def on_row(rows):
            report[suite] = rows
            report["autotuned"] = autotuned_configs() if cuda or interpreted else {}
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(report, indent=2) + "\n")

        return on_row

    fused = cuda or interpreted
    if args.only in (None, "itc"):
        impls = itc_impls(args, device, fused)
        plan = suite_plan(QUICK_ITC if args.quick else FULL_ITC, impls, INTERPRETED_ITC, interpreted)
        run_suite("itc", plan, itc_inputs, itc_call, args, device, dtype, write("itc"))
    if args.only in (None, "lm"):
        impls = lm_impls(args, device, fused)
        plan = suite_plan(QUICK_LM if args.quick else FULL_LM, impls, INTERPRETED_LM, interpreted)
        run_suite("lm", plan, lm_inputs, lm_call, args, device, dtype, write("lm"))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    sys.exit(main())
