"""scripts/bench_precision.py: the casts of a step with fp32 parameters under bf16 autocast against bf16 parameters
(DeepSpeed's bf16 engine), counted at the dispatcher on the demo model."""

import json
import os
import sys
from pathlib import Path

import gritvlp.kernels  # noqa: F401 - loads gritvlp.kernels.lm_loss
import torch.nn as nn
from script_loader import load_script as load_script_named

from gritvlp.config import load_config
from gritvlp.model.gritvlp import GritVLP

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    return load_script_named("bench_precision")


def test_bf16_parameters_leave_no_per_step_weight_casts(tmp_path):
    bench = load_script()
    kernels_before = os.environ.get("GRITVLP_KERNELS")
    block_before = sys.modules["gritvlp.kernels.lm_loss"]._MAX_BLOCK_V
    out = tmp_path / "precision.json"
    report = bench.main(["--config", "demo", "--batches", "3", "5", "--target-batch", "8", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    model = GritVLP(load_config("demo").model)
    linear_weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    autocast, bf16 = report["modes"]["autocast"], report["modes"]["bf16_params"]
    # autocast casts every linear weight to bf16 in forward and its gradient back to fp32 in backward
    weight_casts = autocast["measured"]["3"]["parameter"]
    assert weight_casts["count"] >= 2 * len(linear_weights)
    assert weight_casts["bytes"] >= sum(w.numel() for w in linear_weights) * (4 + 2) * 2
    # bf16 parameters: at most the fused LM loss's bias gradient and the temperature, nothing weight-sized
    assert bf16["measured"]["3"].get("parameter", {"bytes": 0})["bytes"] < 0.01 * weight_casts["bytes"]
    # activation casts grow with the batch under autocast; with bf16 parameters they are a small remainder
    assert autocast["measured"]["5"]["activation"]["bytes"] > autocast["measured"]["3"]["activation"]["bytes"]
    assert bf16["at_target_batch"]["activation_bytes"] < 0.05 * autocast["at_target_batch"]["activation_bytes"]
    # the bf16 engine's optimizer casts (gradient in, master out) are charged, and the total is still lower
    assert bf16["optimizer"]["bytes"] == 2 * report["parameters"] * 6
    assert report["bf16_params_over_autocast_bytes"] < 1
    # nothing of the run stays behind in this process: the kernel dispatch and the LM loss's block are as before
    lm = sys.modules["gritvlp.kernels.lm_loss"]
    assert os.environ.get("GRITVLP_KERNELS") == kernels_before and lm._MAX_BLOCK_V == block_before


def test_extrapolation_is_linear_in_the_batch():
    bench = load_script()
    assert bench.extrapolate(10, 30, (2, 4), 128) == 10 + 10 * 126
    assert bench.extrapolate(5, 5, (2, 4), 128) == 5
