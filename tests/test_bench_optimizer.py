"""scripts/bench_optimizer.py: one AdamW step over flat fp32 partitions, torch's fused against foreach and single
tensor (and DeepSpeed's FusedAdam on CUDA), with the same update."""

import json
from pathlib import Path

import torch
from script_loader import load_script as load_script_named

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    return load_script_named("bench_optimizer")


def test_writes_every_implementation_with_its_ratio(tmp_path):
    bench = load_script()
    out = tmp_path / "optimizer.json"
    report = bench.main(["--params", "2e5", "--reps", "2", "--warmup", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert set(report["results"]) == {"torch_fused", "torch_foreach", "torch_single_tensor"}
    assert all(r["step_ms"] > 0 for r in report["results"].values())
    assert report["speedup_vs_torch_foreach"]["torch_foreach"] == 1.0


def test_the_implementations_make_the_same_update():
    """What is timed is the same AdamW: after three steps every implementation holds the same weights."""
    bench = load_script()
    settings = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}
    weights = {}
    for name, make in bench.optimizers(torch.device("cpu")).items():
        groups = bench.flat_groups(1000, torch.device("cpu"), {"weight_decay": 0.02})
        optimizer = make(groups, **settings)
        for _ in range(3):
            optimizer.step()
        weights[name] = torch.cat([g["params"][0].detach() for g in groups])
    for name, w in weights.items():
        torch.testing.assert_close(w, weights["torch_foreach"], rtol=1e-6, atol=1e-7, msg=name)
