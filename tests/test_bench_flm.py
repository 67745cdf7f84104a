"""scripts/bench_flm.py on a tiny demo set: both runs train, the report, table and figure are written."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_flm.py"


def test_bench_flm_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("bench_flm", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "flm_vs_mlm"
    overrides = [f"data.demo_dir={tmp_path / 'demo'}", "data.demo_train_samples=32", "data.demo_test_samples=8"]
    report = bench.main([*overrides, "--budget-s", "0.1", "--batch", "8", "--no-eval", "--out", str(out)])
    assert set(report["runs"]) == {"mlm", "flm"}
    mlm, flm = (report["runs"][name]["records"][-1] for name in ("mlm", "flm"))
    assert mlm["step"] >= 1 and "mlm" in mlm and "flm" not in mlm
    assert flm["step"] >= 1 and {"flm", "flm_reconstruction", "flm_next", "flm_previous"} <= set(flm)
    assert json.loads(out.with_suffix(".json").read_text())["budget_s"] == 0.1
    assert "| flm |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0
