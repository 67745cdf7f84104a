"""The FLOPs of a training step and the device's peak, from which the trainer logs perf/tflops and perf/mfu (and
scripts/bench_step.py its achieved TFLOP/s and MFU)."""

from __future__ import annotations

import os
import re
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, by a model name in torch.cuda.get_device_name() matched as
# whole words (so "L4" is not an "L40S", nor "H200" a "GH200"); the first match wins.
PEAK_BF16_TFLOPS = (
    ("H200 NVL", 835.5),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H100 SXM", 989.4),
    ("H100 80GB HBM3", 989.4),  # how an H100 SXM names itself
    ("H100 PCIe", 756.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The device's dense bf16 peak (TFLOP/s): `override` when set, else by the CUDA device's name; None on a CPU
    or an unknown GPU (then no MFU is reported)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if re.search(rf"\b{re.escape(key)}\b", name)), None)


@contextmanager
def kernels_backend(value: str):
    """gritvlp.kernels.backend_for reads GRITVLP_KERNELS at each call: set it for the block, then restore it."""
    previous = os.environ.get("GRITVLP_KERNELS")
    os.environ["GRITVLP_KERNELS"] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("GRITVLP_KERNELS", None)
        else:
            os.environ["GRITVLP_KERNELS"] = previous


@contextmanager
def counting_flops():
    """Counts the FLOPs of the torch ops run in the block (forward and backward: autograd runs the backward under
    the same mode); yields the FlopCounterMode, whose get_total_flops() holds the count.

    The fused Triton loss kernels are opaque to the counter, so the block runs the loss kernels' PyTorch reference
    (the same math, every matmul a visible op), and compiled blocks run eagerly (a compiled graph is opaque too)."""
    with kernels_backend("reference"), torch.compiler.set_stance("force_eager"):
        with FlopCounterMode(display=False) as counter:
            yield counter
