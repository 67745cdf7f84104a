"""What each part of GRIT-VLP buys, on the demo data at equal steps: four pre-training runs, evaluated every epoch.

    python scripts/ablate.py                      # writes benchmarks/ablation.json and benchmarks/ablation.png

  (a) random batches, no consistency, mask 0.15 (ALBEF's objectives, without its momentum model)
  (b) (a) + GRIT grouping
  (c) (b) + the ITC consistency term
  (d) (c) + mask 0.5 = full GRIT-VLP
Each run is the demo (scripts/pretrain.py with the demo preset, one process, the same seed and steps) with its
overrides; after every epoch it logs zero-shot retrieval on the held-out split and the hard-negative accuracy.
The table gives them per epoch, and the step at which each run first reaches run (a)'s final mean R@1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "a_random_batches": ["sampling.grit=false", "objectives.consistency_weight=0", "objectives.mask_prob=0.15"],
    "b_grit": ["objectives.consistency_weight=0", "objectives.mask_prob=0.15"],
    "c_grit_consistency": ["objectives.mask_prob=0.15"],
    "d_grit_vlp": [],
}
METRICS = ("r1_mean", "itc_r1_mean", "r_mean", "hard_itm_all", "hard_itc_all")


def run(name: str, overrides: list[str], out: Path, extra: list[str]) -> tuple[list[dict], float]:
    """Trains one variant; returns its evaluation rows (step, epoch metrics) and its wall time."""
    run_dir = out / name
    cmd = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--deepspeed_config",
           str(ROOT / "ds_configs" / "zero2.json"), "--output_dir", str(run_dir), "train.export_fp16=false",
           *overrides, *extra]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return evaluations(run_dir / "metrics.jsonl"), time.perf_counter() - start


def evaluations(metrics_file: Path) -> list[dict]:
    rows = []
    for line in metrics_file.read_text().splitlines():
        row = json.loads(line)
        if "eval/r_mean" in row:
            metrics = {k[len("eval/") :]: v for k, v in row.items() if k.startswith("eval/")}
            metrics["r1_mean"] = (metrics["txt_r1"] + metrics["img_r1"]) / 2
            if "itc_txt_r1" in metrics:
                metrics["itc_r1_mean"] = (metrics["itc_txt_r1"] + metrics["itc_img_r1"]) / 2
            rows.append({"step": row["step"], **{k: metrics.get(k) for k in METRICS}})
    return rows


def first_step_reaching(rows: list[dict], target: float) -> int | None:
    return next((r["step"] for r in rows if r["r1_mean"] >= target), None)


def table(results: dict) -> str:
    """Markdown: mean R@1 and hard-negative ITM accuracy after each epoch, the final ITC-only mean R@1, and the
    first evaluated step at which each run reaches run (a)'s final mean R@1."""
    target = results["a_random_batches"]["evaluations"][-1]["r1_mean"]

    def per_epoch(rows: list[dict], metric: str) -> str:
        return " / ".join("-" if r[metric] is None else f"{r[metric]:.1f}" for r in rows)

    lines = [
        f"| run | mean R@1 per epoch | hard-negative ITM acc. per epoch | final ITC-only mean R@1 | "
        f"first step at (a)'s final R@1 ({target:.1f}) | minutes |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        rows = r["evaluations"]
        itc = rows[-1].get("itc_r1_mean")
        reach = first_step_reaching(rows, target)
        lines.append(
            f"| {name} | {per_epoch(rows, 'r1_mean')} | {per_epoch(rows, 'hard_itm_all')} | "
            f"{'-' if itc is None else f'{itc:.1f}'} | {reach if reach is not None else 'never'} | "
            f"{r['seconds'] / 60:.1f} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results.items():
        steps = [e["step"] for e in r["evaluations"]]
        (line,) = axes[0].plot(steps, [e["r1_mean"] for e in r["evaluations"]], marker="o", label=name)
        if all(e.get("itc_r1_mean") is not None for e in r["evaluations"]):
            axes[0].plot(steps, [e["itc_r1_mean"] for e in r["evaluations"]], linestyle="--", color=line.get_color())
        axes[1].plot(steps, [e["hard_itm_all"] for e in r["evaluations"]], marker="o", label=name)
    axes[0].set(title="zero-shot retrieval, held-out split (dashed: ITC only)", xlabel="step",
                ylabel="mean R@1 (%)")
    axes[1].set(title="hard negatives (one attribute changed)", xlabel="step", ylabel="ITM accuracy (%)")
    axes[1].axhline(50, color="grey", linestyle=":", label="chance")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/ablation"), help="run folders")
    p.add_argument("--only", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS))
    p.add_argument("overrides", nargs="*", help="config overrides applied to every run (e.g. train.epochs=2)")
    args = p.parse_args(argv)
    results = {}
    for name in args.only.split(","):
        rows, seconds = run(name, RUNS[name], args.out, args.overrides)
        results[name] = {"overrides": RUNS[name], "evaluations": rows, "seconds": seconds}
    bench = ROOT / "benchmarks"
    (bench / "ablation.json").write_text(json.dumps({"common_overrides": args.overrides, "runs": results}, indent=2) + "\n")
    if "a_random_batches" in results:
        text = table(results)
        (bench / "ablation.md").write_text(text + "\n")
        print(text)
    plot(results, bench / "ablation.png")
    print(f"wrote {bench / 'ablation.json'} and {bench / 'ablation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
