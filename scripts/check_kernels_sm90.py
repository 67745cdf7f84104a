#!/usr/bin/env python3
"""Compile every autotune configuration of the Triton kernels for the H100 (sm_90), with no GPU.

A kernel that runs under the CPU interpreter can still fail to launch on an H100: too much shared memory
for one block, or register spills that make it slow. This compiles each (kernel, case, config) with Triton's
own compiler and bundled ptxas and reports shared memory, registers per thread and spills.

Kernel modules take part by exposing ``sm90_cases() -> list[dict]``, each dict:
  name        str, e.g. "itc_stats bf16 D=256"
  kernel      a triton Autotuner (its .configs are compiled) or a plain JITFunction
  signature   {arg: triton type, e.g. "*bf16", "*fp32", "*i64", "i32", "fp32"} for the non-constexpr args
  constexprs  {arg: value} for the constexpr args that the autotune config does not set
  configs     optional list of triton.Config replacing the kernel's own (num_warps of plain JIT kernels)
  divisible_by_16  optional list of integer args to specialise as multiples of 16, as a launch would

Pointers are specialised as 16-byte aligned, as a launch with torch tensors is.

Usage: python scripts/check_kernels_sm90.py [--module M ...] [--match REGEX] [--json PATH] [--jobs N] [--allow-spills]
Exit status: 0 when every compile passes, 1 otherwise.
"""

from __future__ import annotations

import os

# Kernels imported under the interpreter cannot be compiled; the modules also pick their configs at import.
os.environ["TRITON_INTERPRET"] = "0"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor, as_completed  # noqa: E402
from pathlib import Path  # noqa: E402

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

DEFAULT_MODULES = ["gritvlp.kernels.itc", "gritvlp.kernels.lm_loss"]
DEFAULT_JSON = "benchmarks/kernels_sm90_compile.json"
TARGET = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 232448  # bytes of shared memory one block may use on an H100 (227 KiB opt-in)
CONFIG_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
ALIGNED = [["tt.divisibility", 16]]


class NoCases(Exception):
    """The module does not take part: it has no sm90_cases()."""


def import_module(name: str):
    """The module as named, or a bare name such as "itc" taken as gritvlp.kernels.<name>."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if "." in name or err.name != name:
            raise
        return importlib.import_module(f"gritvlp.kernels.{name}")


@functools.cache
def load_cases(module_name: str) -> list[dict]:
    module = import_module(module_name)
    if not hasattr(module, "sm90_cases"):
        raise NoCases(f"module {module_name} has no sm90_cases()")
    return module.sm90_cases()


def jit_function(kernel) -> JITFunction:
    """The JITFunction under any autotune/heuristics wrappers."""
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def case_configs(case: dict) -> list[triton.Config]:
    configs = case.get("configs") or getattr(case["kernel"], "configs", None)
    return list(configs) if configs else [triton.Config({})]


def compile_options(config: triton.Config) -> dict:
    return {k: getattr(config, k) for k in CONFIG_OPTIONS if getattr(config, k, None) is not None}


def describe_config(config: triton.Config) -> dict:
    return {**config.kwargs, **compile_options(config)}


def kernel_constexprs(fn: JITFunction, case: dict, config: triton.Config) -> dict:
    """Values of all constexpr args: the kernel's defaults, then the case's, then the config's."""
    defaults = {
        name: param.default
        for name, param in inspect.signature(fn.fn).parameters.items()
        if param.default is not inspect.Parameter.empty
    }
    names = [p.name for p in fn.params if p.is_constexpr]
    values = {**defaults, **case.get("constexprs", {}), **config.kwargs}
    missing = [n for n in names if n not in values]
    unknown = sorted(set(case.get("constexprs", {})) - set(names))
    if missing or unknown:
        raise ValueError(f"constexpr args without a value: {missing}; not constexpr args of the kernel: {unknown}")
    return {n: values[n] for n in names}


def build_source(fn: JITFunction, case: dict, config: triton.Config) -> ASTSource:
    """Triton 3.8 convention: the signature names every arg, constexprs typed "constexpr"; constexpr values and
    specialisation attributes are keyed by the arg's index path, e.g. (3,)."""
    types = case["signature"]
    runtime_args = [p.name for p in fn.params if not p.is_constexpr]
    missing = [n for n in runtime_args if n not in types]
    unknown = sorted(set(types) - set(runtime_args))
    if missing or unknown:
        raise ValueError(f"signature lacks args {missing}; names args that are constexpr or absent: {unknown}")
    constexprs = kernel_constexprs(fn, case, config)
    signature = {p.name: "constexpr" if p.is_constexpr else types[p.name] for p in fn.params}
    divisible = set(case.get("divisible_by_16", ()))
    attrs = {}
    for i, p in enumerate(fn.params):
        is_pointer = not p.is_constexpr and types[p.name].startswith("*")
        if (is_pointer or p.name in divisible) and not p.do_not_specialize and not p.do_not_specialize_on_alignment:
            attrs[(i,)] = ALIGNED
    return ASTSource(fn, signature, {(fn.arg_names.index(k),): v for k, v in constexprs.items()}, attrs)


def ptxas_usage(ptx: str, fp_fusion: bool) -> dict:
    """Registers and spills, from ptxas -v on the PTX with the flags Triton's own ptxas step uses
    (Triton discards that log, and the compiled kernel only reports registers once loaded on a GPU)."""
    ptxas = knobs.nvidia.ptxas.path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "kernel.ptx")
        src.write_text(ptx)
        cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(TARGET.arch)}"]
        cmd += [] if fp_fusion else ["--fmad=false"]
        log = subprocess.run(
            [*cmd, str(src), "-o", str(Path(tmp, "kernel.o"))], capture_output=True, text=True, check=True
        ).stderr
    return parse_ptxas_log(log)


def parse_ptxas_log(log: str) -> dict:
    def number(pattern: str) -> int:
        match = re.search(pattern, log)
        if match is None:
            raise ValueError(f"ptxas -v output lacks {pattern!r}:\n{log}")
        return int(match.group(1))

    return {
        "registers": number(r"Used (\d+) registers"),
        "stack_frame_bytes": number(r"(\d+) bytes stack frame"),
        "spill_store_bytes": number(r"(\d+) bytes spill stores"),
        "spill_load_bytes": number(r"(\d+) bytes spill loads"),
    }


def compile_one(job: tuple[str, int, int]) -> dict:
    """Compile one (module, case, config); runs in a worker process."""
    module_name, case_index, config_index = job
    case = load_cases(module_name)[case_index]
    config = case_configs(case)[config_index]
    fn = jit_function(case["kernel"])
    row = {"module": module_name, "kernel": fn.__name__, "case": case["name"], "config": describe_config(config)}
    start = time.perf_counter()
    try:
        # Triton prints the whole PTX when ptxas fails; the error message below keeps what matters.
        with contextlib.redirect_stdout(io.StringIO()):
            compiled = triton.compile(build_source(fn, case, config), target=TARGET, options=compile_options(config))
        row["shared_bytes"] = compiled.metadata.shared
        row.update(ptxas_usage(compiled.asm["ptx"], compiled.metadata.enable_fp_fusion))
        row["error"] = None
    except Exception as err:  # noqa: BLE001 -- any failure to compile is a result to report
        row["error"] = describe_error(err)
    row["compile_s"] = round(time.perf_counter() - start, 2)
    return row


def describe_error(err: BaseException) -> str:
    """The error and its causes, innermost last: Triton's compile errors keep the actual reason in __cause__."""
    parts, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        parts.append(f"{type(err).__name__}: {str(err).strip()}")
        err = err.__cause__ or err.__context__
    return "\n-- caused by --\n".join(parts)[-3000:]


def problems(row: dict, allow_spills: bool) -> list[str]:
    if row["error"]:
        return ["compile failed"]
    found = []
    if row["shared_bytes"] > SHARED_LIMIT:
        found.append(f"shared {row['shared_bytes']} > {SHARED_LIMIT}")
    if not allow_spills and (row["spill_store_bytes"] or row["spill_load_bytes"]):
        found.append("register spills")
    return found


def collect_jobs(module_names: list[str], match: str | None = None) -> tuple[list[tuple[str, int, int]], list[dict]]:
    """Jobs of the modules that take part (only cases whose name matches the regular expression `match`, when
    given), and the modules skipped (with why)."""
    jobs, skipped = [], []
    for name in module_names:
        try:
            cases = load_cases(name)
        except NoCases as why:
            print(f"skipping: {why}")
            skipped.append({"module": name, "reason": str(why)})
            continue
        chosen = [(c, case) for c, case in enumerate(cases) if match is None or re.search(match, case["name"])]
        jobs += [(name, c, k) for c, case in chosen for k in range(len(case_configs(case)))]
    return jobs, skipped


def run_jobs(jobs: list[tuple[str, int, int]], workers: int) -> list[dict]:
    if workers <= 1 or len(jobs) <= 1:
        return [log_progress(compile_one(job), i + 1, len(jobs)) for i, job in enumerate(jobs)]
    # spawn: each worker imports the modules afresh, with the interpreter off, and shares no compiler state
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        futures = {pool.submit(compile_one, job): job for job in jobs}
        for done, future in enumerate(as_completed(futures), 1):
            log_progress(job_result(future, futures[future]), done, len(jobs))
        return [job_result(future, job) for future, job in futures.items()]


def job_result(future, job: tuple[str, int, int]) -> dict:
    """The worker's row, or an error row when the worker itself died (a crash in the compiler)."""
    try:
        return future.result()
    except Exception as err:  # noqa: BLE001
        module_name, case_index, config_index = job
        case = load_cases(module_name)[case_index]
        config = describe_config(case_configs(case)[config_index])
        return {
            "module": module_name,
            "kernel": jit_function(case["kernel"]).__name__,
            "case": case["name"],
            "config": config,
            "error": describe_error(err),
            "compile_s": None,
        }


def log_progress(row: dict, done: int, total: int) -> dict:
    outcome = "error" if row["error"] else f"shared {row['shared_bytes']} regs {row['registers']}"
    print(f"[{done}/{total}] {row['case']} [{format_config(row['config'])}]: {outcome}", file=sys.stderr, flush=True)
    return row


def format_config(config: dict) -> str:
    short = {"num_warps": "w", "num_stages": "s", "num_ctas": "ctas", "maxnreg": "maxnreg"}
    shown = {k: v for k, v in config.items() if not (k == "num_ctas" and v == 1)}
    return " ".join(f"{short.get(k, k + '=')}{v}" for k, v in shown.items())


def print_table(rows: list[dict]) -> None:
    header = f"{'case':<34} {'config':<36} {'shared B':>9} {'regs':>5} {'spill st/ld':>12}  result"
    print(header)
    print("-" * len(header))
    for row in rows:
        usage = (
            ("-", "-", "-")
            if row["error"]
            else (row["shared_bytes"], row["registers"], f"{row['spill_store_bytes']}/{row['spill_load_bytes']}")
        )
        result = "ok" if row["ok"] else "FAIL: " + "; ".join(row["problems"])
        print(
            f"{row['case'][:34]:<34} {format_config(row['config'])[:36]:<36} {usage[0]:>9} {usage[1]:>5} "
            f"{usage[2]:>12}  {result}"
        )
    print_errors(rows)


def print_errors(rows: list[dict]) -> None:
    """Each distinct error once, after the configs that hit it."""
    configs_by_error: dict[str, list[str]] = {}
    for row in rows:
        if row["error"]:
            configs_by_error.setdefault(row["error"], []).append(f"{row['case']} [{format_config(row['config'])}]")
    for error, configs in configs_by_error.items():
        print("\n" + "\n".join(configs) + ":\n" + error)


def report(rows: list[dict], skipped: list[dict], allow_spills: bool) -> dict:
    return {
        "triton_version": triton.__version__,
        "target": {
            "backend": TARGET.backend,
            "arch": TARGET.arch,
            "warp_size": TARGET.warp_size,
            "gpu_name": sm_arch_from_capability(TARGET.arch),
        },
        "ptxas": {"path": knobs.nvidia.ptxas.path, "version": knobs.nvidia.ptxas.version},
        "limits": {"shared_bytes_per_block": SHARED_LIMIT, "spills_fail": not allow_spills},
        "skipped": skipped,
        "ok": all(row["ok"] for row in rows),
        "rows": rows,
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--module",
        action="append",
        dest="modules",
        help="importable module exposing sm90_cases() (a bare name means gritvlp.kernels.<name>); "
        f"repeatable; default {' '.join(DEFAULT_MODULES)}",
    )
    parser.add_argument("--json", default=DEFAULT_JSON, help=f"where to write the results (default {DEFAULT_JSON})")
    parser.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--allow-spills", action="store_true", help="report register spills without failing")
    parser.add_argument("--match", default=None, help="only the cases whose name matches this regular expression")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    jobs, skipped = collect_jobs(args.modules or DEFAULT_MODULES, args.match)
    rows = run_jobs(jobs, args.jobs)
    for row in rows:
        row["problems"] = problems(row, args.allow_spills)
        row["ok"] = not row["problems"]
    if rows:
        print_table(rows)
    else:
        print("nothing to compile")
    result = report(rows, skipped, args.allow_spills)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{sum(r['ok'] for r in rows)}/{len(rows)} compiles pass; results in {args.json}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
