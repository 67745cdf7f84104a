"""scripts/check_kernels_sm90.py: offline sm_90 compiles of small kernel modules with known outcomes.

The tool runs in a subprocess: this suite imports Triton under the interpreter, and interpreted kernels
cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_kernels_sm90.py"
SHARED_LIMIT = 232448

# Passes: an autotuned vector add (two configs) and a small matmul given as a plain JIT kernel.
GOOD_MODULE = """
import triton
import triton.language as tl


@triton.autotune([triton.Config({"BLOCK": 256}, num_warps=4), triton.Config({"BLOCK": 1024}, num_warps=8)],
                 key=["n"])
@triton.jit
def add_kernel(x, y, out, n, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out + offs, (tl.load(x + offs, mask=mask) + tl.load(y + offs, mask=mask)) * SCALE, mask=mask)


@triton.jit
def matmul_kernel(a, b, c, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, K, BK):
        x = tl.load(a + rm[:, None] * K + (k + rk)[None, :])
        y = tl.load(b + (k + rk)[:, None] * BN + rn[None, :])
        acc += tl.dot(x, y)
    tl.store(c + rm[:, None] * BN + rn[None, :], acc)


MATMUL_SIGNATURE = {"a": "*fp16", "b": "*fp16", "c": "*fp32", "K": "i32"}


def sm90_cases():
    return [
        {"name": "add fp32", "kernel": add_kernel, "constexprs": {"SCALE": 2.0},
         "signature": {"x": "*fp32", "y": "*fp32", "out": "*fp32", "n": "i32"}},
        {"name": "matmul small", "kernel": matmul_kernel, "signature": MATMUL_SIGNATURE, "constexprs": {"BK": 32},
         "configs": [triton.Config({"BM": 64, "BN": 64}, num_warps=4, num_stages=3)]},
    ]
"""

# Fails in three ways: tiles too big for shared memory, an accumulator too big for the registers, a signature
# missing an argument.
BAD_MODULE = """
import triton

from sm90_good import MATMUL_SIGNATURE, matmul_kernel


def sm90_cases():
    return [
        {"name": "matmul huge tiles", "kernel": matmul_kernel, "signature": MATMUL_SIGNATURE, "constexprs": {},
         "configs": [triton.Config({"BM": 256, "BN": 256, "BK": 128}, num_warps=8, num_stages=4)]},
        {"name": "matmul spills", "kernel": matmul_kernel, "signature": MATMUL_SIGNATURE, "constexprs": {},
         "configs": [triton.Config({"BM": 128, "BN": 256, "BK": 32}, num_warps=4, num_stages=2)]},
        {"name": "matmul no K", "kernel": matmul_kernel, "signature": {"a": "*fp16", "b": "*fp16", "c": "*fp32"},
         "constexprs": {}, "configs": [triton.Config({"BM": 64, "BN": 64, "BK": 32})]},
    ]
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sm90")
    (folder / "sm90_good.py").write_text(textwrap.dedent(GOOD_MODULE))
    (folder / "sm90_bad.py").write_text(textwrap.dedent(BAD_MODULE))
    (folder / "sm90_none.py").write_text("VALUE = 1\n")
    return folder


def run_tool(folder: Path, *args: str, timeout: int = 300) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH")]))
    env["TRITON_CACHE_DIR"] = str(folder / "triton_cache")
    out = folder / f"result_{uuid.uuid4().hex}.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, json.loads(out.read_text()) if out.exists() else {}


def by_case(result: dict) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for row in result["rows"]:
        rows.setdefault(row["case"], []).append(row)
    return rows


def test_passing_kernels_and_a_module_without_cases(workspace):
    proc, result = run_tool(workspace, "--module", "sm90_good", "--module", "sm90_none", "--jobs", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "module sm90_none has no sm90_cases()" in proc.stdout
    assert result["skipped"] == [{"module": "sm90_none", "reason": "module sm90_none has no sm90_cases()"}]
    assert result["target"]["arch"] == 90 and result["limits"]["shared_bytes_per_block"] == SHARED_LIMIT
    rows = by_case(result)
    assert [row["config"]["BLOCK"] for row in rows["add fp32"]] == [256, 1024]
    assert [row["config"]["num_warps"] for row in rows["add fp32"]] == [4, 8]
    for row in result["rows"]:
        assert row["ok"] and row["error"] is None and row["problems"] == []
        assert 0 < row["registers"] <= 255
        assert row["spill_store_bytes"] == row["spill_load_bytes"] == 0
    (matmul,) = rows["matmul small"]
    assert matmul["kernel"] == "matmul_kernel"
    assert 0 < matmul["shared_bytes"] <= SHARED_LIMIT  # the pipelined operand tiles live in shared memory


def test_oversized_spilling_and_broken_cases_fail(workspace):
    proc, result = run_tool(workspace, "--module", "sm90_bad", "--jobs", "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert not result["ok"] and result["limits"]["spills_fail"]
    rows = {case: found for case, (found,) in by_case(result).items()}

    huge = rows["matmul huge tiles"]
    assert huge["error"] is None and not huge["ok"]
    assert huge["shared_bytes"] > SHARED_LIMIT
    assert any(p.startswith("shared ") for p in huge["problems"])

    spills = rows["matmul spills"]
    assert spills["error"] is None and not spills["ok"]
    assert spills["shared_bytes"] <= SHARED_LIMIT and spills["spill_store_bytes"] > 0
    assert spills["problems"] == ["register spills"]

    broken = rows["matmul no K"]
    assert not broken["ok"] and "K" in broken["error"]
    assert broken["problems"] == ["compile failed"]


def test_allow_spills_passes_spilling_kernels(workspace):
    proc, result = run_tool(workspace, "--module", "sm90_bad", "--allow-spills", "--jobs", "1")
    assert proc.returncode == 1  # the shared-memory and compile failures remain
    rows = {case: found for case, (found,) in by_case(result).items()}
    assert rows["matmul spills"]["ok"] and rows["matmul spills"]["spill_store_bytes"] > 0
    assert not rows["matmul huge tiles"]["ok"] and not rows["matmul no K"]["ok"]
    assert result["limits"]["spills_fail"] is False


@pytest.mark.slow
def test_real_kernels_fit_the_h100(tmp_path):
    """The project's own kernels, 16-bit features (what bf16 / fp16 training hands them) at D = 256, every flag
    combination, the configs the autotuner keeps, and the cross-entropy kernel: shared memory within the H100's
    limit and no register spills. (fp32 and other widths: scripts/check_kernels_sm90.py without --match.)"""
    proc, result = run_tool(tmp_path, "--match", r"(bfloat16|float16) D=256|ce_chunk bf16", "--jobs", "2", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kernels = {row["kernel"] for row in result["rows"]}
    assert {"_itc_fwd_kernel", "_itc_merge_kernel", "_itc_dq_kernel", "_itc_dk_kernel", "_ce_chunk_kernel"} <= kernels
    assert all(row["shared_bytes"] <= SHARED_LIMIT and not row["spill_store_bytes"] for row in result["rows"])
