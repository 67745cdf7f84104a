"""Accuracy of the fused LM loss's gradients in bf16: the vocabulary weight's gradient summed over chunks in fp32
(the default) or in bf16 (objectives.lm_weight_grad_accumulation=bf16), against eager bf16 autocast, all measured
against the exact gradient (float64 from the same bf16 inputs).

Errors: relative Frobenius norm ||g - g_exact|| / ||g_exact|| and the largest entry error over the largest exact
entry, for d weight and d hidden. At the default 7,680 labelled rows (BERT's vocabulary, H = 768) the fused loss
runs 8 chunks, so the bf16 sum rounds 8 times; eager rounds its single product once.

On CPU the fused kernel runs through the Triton interpreter (minutes per variant at the default shape), with the
production vocabulary block rather than the interpreter's small test block; the GEMMs are torch's in both cases.

    python scripts/lm_grad_accuracy.py                     # JSON to benchmarks/lm_grad_accuracy_<device>.json
    python scripts/lm_grad_accuracy.py --rows 1920 --out /tmp/acc.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def exact_grads(hidden, weight, labels):
    """d hidden, d weight of the mean cross-entropy in float64, from the (bf16) inputs as given."""
    import torch

    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    torch.nn.functional.cross_entropy(h @ w.t(), labels).backward()
    return h.grad, w.grad


def errors(grad, exact) -> dict:
    diff = grad.double() - exact
    return {
        "relative_frobenius": (diff.norm() / exact.norm()).item(),
        "max_entry_over_max": (diff.abs().max() / exact.abs().max()).item(),
    }


def variants(device):
    """name -> loss(hidden, weight, labels) as the training step would run it, on bf16 tensors."""
    import torch

    from gritvlp import kernels

    def eager(h, w, labels):  # fp32 parameters under bf16 autocast are cast first: bf16 inputs are the same GEMMs
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return kernels.lm_loss(h, w, None, labels, backend="reference", ignore_index=None)

    def fused(accumulation):
        return lambda h, w, labels: kernels.lm_loss(
            h, w, None, labels, backend="triton", ignore_index=None, weight_grad_accumulation=accumulation
        )

    return {"eager_bf16": eager, "fused_fp32_sum": fused("fp32"), "fused_bf16_sum": fused("bf16")}


def git_commit() -> str | None:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return head.stdout.strip() or None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=7680, help="labelled rows (default 7680: 256 x 30 x 50%%)")
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda:  # Triton decides at kernel definition: before gritvlp.kernels is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cuda" if cuda else "cpu")
    import gritvlp.kernels  # noqa: F401 - binds the fused module below (its name is taken by the function)

    fused_module = sys.modules["gritvlp.kernels.lm_loss"]
    if not cuda:
        fused_module._MAX_BLOCK_V = 8192  # the production block: the interpreter's small one only serves tests

    g = torch.Generator().manual_seed(args.seed)
    hidden = torch.randn(args.rows, args.hidden, generator=g).to(device, torch.bfloat16)
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.02).to(device, torch.bfloat16)
    labels = torch.randint(0, args.vocab, (args.rows,), generator=g).to(device)
    exact_h, exact_w = (t.to(device) for t in exact_grads(hidden.cpu(), weight.cpu(), labels.cpu()))
    chunk = fused_module._chunk_rows(args.rows, fused_module._pad_vocab(args.vocab), 2)
    report = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "shape": {"labelled_rows": args.rows, "V": args.vocab, "H": args.hidden, "dtype": "bf16"},
        "chunks": -(-args.rows // chunk),
        "reference": "float64 gradients of the same bf16 inputs",
        "results": {},
    }
    out = args.out or ROOT / "benchmarks" / f"lm_grad_accuracy_{device.type}.json"
    for name, loss_fn in variants(device).items():
        start = time.perf_counter()
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss_fn(h, w, labels).backward()
        report["results"][name] = {
            "grad_weight_dtype": str(w.grad.dtype).replace("torch.", ""),
            "grad_weight": errors(w.grad, exact_w),
            "grad_hidden": errors(h.grad, exact_h),
            "seconds": round(time.perf_counter() - start, 2),
        }
        print(name, json.dumps(report["results"][name]), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    eager = report["results"]["eager_bf16"]["grad_weight"]["relative_frobenius"]
    for name in ("fused_fp32_sum", "fused_bf16_sum"):
        report["results"][name]["grad_weight_error_over_eager"] = (
            report["results"][name]["grad_weight"]["relative_frobenius"] / eager
        )
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
