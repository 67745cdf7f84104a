"""What GRIT-VLP's grouping buys once its false negatives are handled, on the demo data at equal steps: six variants,
three seeds each, evaluated every epoch.

    python scripts/ablate.py                 # writes benchmarks/ablation.{json,md,png}; about 2 hours on 2 CPU cores

  a   random batches, no consistency, mask 0.15 (ALBEF's objectives, without its momentum model)
  b   (a) + GRIT grouping
  b2  (b) + identical-caption positives
  d   GRIT-VLP: grouping, consistency, mask 0.5 (the demo preset as it was, identical captions as negatives)
  d2  (d) + identical-caption positives (the demo preset)
  e   (d2) + MAFA: connection mining with the export of the same seed's finished (a) run as the filter, and ITC
      smoothed 0.5 / 0.5 with a uniform target from epoch 1

Each run is the demo (scripts/pretrain.py with the demo preset, one process) with its overrides and a seed
(train.seed: initial weights, sample order, masking). Per variant and epoch the tables give the mean and the
standard deviation over seeds of mean R@1 (re-ranked and ITC-only), hard-negative ITM accuracy per attribute,
the false-negative shares of the batches, and the first step at which the seed-mean curve reaches (a)'s final
mean R@1. A run whose folder already holds its result is not run again (--fresh runs everything again).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALBEF_OBJECTIVES = ["objectives.consistency_weight=0", "objectives.mask_prob=0.15"]
NO_CAPTIONS = ["objectives.caption_positives=false"]
VARIANTS = {
    "a": ["sampling.grit=false", *ALBEF_OBJECTIVES, *NO_CAPTIONS],
    "b": [*ALBEF_OBJECTIVES, *NO_CAPTIONS],
    "b2": [*ALBEF_OBJECTIVES],
    "d": [*NO_CAPTIONS],
    "d2": [],
    "e": ["objectives.itc_smoothing=0.5", "objectives.itc_smoothing_start_epoch=1"],  # + the filter, see overrides
}
LABELS = {
    "a": "(a) random batches",
    "b": "(b) GRIT grouping",
    "b2": "(b') + caption positives",
    "d": "(d) GRIT-VLP",
    "d2": "(d') GRIT-VLP + caption positives",
    "e": "(e) (d') + mining + smoothed ITC",
}
SEEDS = (0, 1, 2)
KINDS = ("all", "colour", "shape", "size", "relation")
EVAL_METRICS = ("r1_mean", "itc_r1_mean", *(f"hard_itm_{k}" for k in KINDS))
TRAIN_METRICS = {  # metrics.jsonl name -> ablation name, averaged over each epoch's logged steps
    "grit/false_negative_share": "false_negative_share",
    "grit/itm_false_negative_share": "itm_false_negative_share",
    "grit/converted_negatives": "converted_negatives",
    "grit/replaced_negatives": "replaced_negatives",
    "perf/step_time_s": "step_time_s",
}


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / variant / f"seed{seed}"


def overrides(variant: str, seed: int, out: Path) -> list[str]:
    """The run's config overrides; (a) exports its weights, which (e) of the same seed mines with."""
    extra = [f"train.seed={seed}", f"train.export_fp16={'true' if variant == 'a' else 'false'}"]
    if variant == "e":
        extra.append(f"objectives.mining_filter={run_dir(out, 'a', seed) / 'export_fp16'}")
    return [*VARIANTS[variant], *extra]


def run(variant: str, seed: int, out: Path, common: list[str], fresh: bool) -> dict:
    """Trains one (variant, seed) unless its result is already there; returns the result."""
    folder = run_dir(out, variant, seed)
    result_file = folder / "ablation_result.json"
    if result_file.is_file() and not fresh:
        return json.loads(result_file.read_text())
    if folder.exists():  # an earlier, unfinished attempt: start afresh rather than mix its metrics in
        shutil.rmtree(folder)
    cmd = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--deepspeed_config",
           str(ROOT / "ds_configs" / "zero2.json"), "--output_dir", str(folder),
           *overrides(variant, seed, out), *common]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    result = {"variant": variant, "seed": seed, "overrides": cmd[5:], "seconds": time.perf_counter() - start,
              **read_metrics(folder / "metrics.jsonl")}  # fmt: skip
    result_file.write_text(json.dumps(result, indent=1) + "\n")
    return result


def read_metrics(metrics_file: Path) -> dict:
    """Evaluation rows (step and EVAL_METRICS) and, per evaluated epoch, the means of TRAIN_METRICS over the
    training rows logged since the previous evaluation."""
    evaluations, epochs, window = [], [], {}
    for line in metrics_file.read_text().splitlines():
        row = json.loads(line)
        for name, short in TRAIN_METRICS.items():
            if name in row:
                window.setdefault(short, []).append(row[name])
        if "eval/r_mean" not in row:
            continue
        metrics = {k[len("eval/") :]: v for k, v in row.items() if k.startswith("eval/")}
        metrics["r1_mean"] = (metrics["txt_r1"] + metrics["img_r1"]) / 2
        if "itc_txt_r1" in metrics:
            metrics["itc_r1_mean"] = (metrics["itc_txt_r1"] + metrics["itc_img_r1"]) / 2
        evaluations.append({"step": row["step"], **{k: metrics.get(k) for k in EVAL_METRICS}})
        epochs.append({k: statistics.fmean(v) for k, v in window.items()})
        window = {}
    return {"evaluations": evaluations, "training": epochs}


def first_step_reaching(rows: list[dict], target: float, metric: str = "r1_mean") -> int | None:
    return next((r["step"] for r in rows if r[metric] is not None and r[metric] >= target), None)


def _mean_sd(values: list) -> list[float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return [None, None]
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def summarise(runs: list[dict]) -> dict:
    """Per epoch, the [mean, sd] over seeds of every evaluation and training metric (runs of one variant)."""
    epochs = min(len(r["evaluations"]) for r in runs)
    out = {"seeds": [r["seed"] for r in runs], "steps": [runs[0]["evaluations"][e]["step"] for e in range(epochs)]}
    for metric in EVAL_METRICS:
        out[metric] = [_mean_sd([r["evaluations"][e][metric] for r in runs]) for e in range(epochs)]
    for metric in TRAIN_METRICS.values():
        out[metric] = [_mean_sd([r["training"][e].get(metric) for r in runs]) for e in range(epochs)]
    out["minutes"] = _mean_sd([r["seconds"] / 60 for r in runs])
    return out


def reach(summary: dict, runs: list[dict], target: float) -> dict:
    """First evaluated step at (a)'s final mean R@1: of the seed-mean curve, and of each seed; and the step where
    the seed-mean curve, linearly interpolated between evaluations, crosses it (the evaluations are an epoch
    apart)."""
    mean_rows = [{"step": s, "r1_mean": m[0]} for s, m in zip(summary["steps"], summary["r1_mean"])]
    step = first_step_reaching(mean_rows, target)
    interpolated = step
    at = next((k for k, r in enumerate(mean_rows) if r["step"] == step), None)
    if at:  # crossed between evaluation at - 1 (below the target) and at
        (s0, v0), (s1, v1) = ((mean_rows[k]["step"], mean_rows[k]["r1_mean"]) for k in (at - 1, at))
        interpolated = round(s0 + (s1 - s0) * (target - v0) / (v1 - v0))
    return {"mean_curve": step, "interpolated": interpolated,
            "per_seed": [first_step_reaching(r["evaluations"], target) for r in runs]}  # fmt: skip


def paired_differences(runs: list[dict], baseline: list[dict]) -> dict:
    """[mean, sd] over seeds of (this run's final value - the same seed's (a) run's), for mean R@1 and the hard-
    negative ITM accuracy: runs of one seed share their initial weights and the whole first epoch, so the
    difference of a pair is sharper than the difference of the two seed means."""
    by_seed = {r["seed"]: r for r in baseline}
    out = {}
    for metric in ("r1_mean", "hard_itm_all"):
        diffs = [r["evaluations"][-1][metric] - by_seed[r["seed"]]["evaluations"][-1][metric]
                 for r in runs if r["seed"] in by_seed]  # fmt: skip
        out[metric] = _mean_sd(diffs)
    return out


def _fmt(pair: list, digits: int = 1, signed: bool = False) -> str:
    mean, sd = pair
    if mean is None:
        return "-"
    return f"{mean:{'+' if signed else ''}.{digits}f} ± {sd:.{digits}f}"


def tables(summaries: dict, reaches: dict, target: float, total_steps: int, paired: dict) -> str:
    """Markdown: learning per epoch, then hard negatives and false negatives after the last epoch."""
    lines = [
        f"Mean ± standard deviation over seeds {', '.join(map(str, next(iter(summaries.values()))['seeds']))}. "
        f"Target: (a)'s final mean R@1, {target:.1f} (2/3 of the {total_steps} steps is {total_steps * 2 // 3}).",
        "",
        "| variant | mean R@1 (re-ranked) per epoch | final, minus (a) of the same seed | ITC-only mean R@1, "
        "final | first step at (a)'s final: seed mean, interpolated (per seed) |",
        "|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        per_epoch = " / ".join(_fmt(p) for p in s["r1_mean"])
        r = reaches[name]
        seeds = ", ".join("never" if x is None else str(x) for x in r["per_seed"])
        lines.append(f"| {LABELS.get(name, name)} | {per_epoch} | {_fmt(paired[name]['r1_mean'], signed=True)} | "
                     f"{_fmt(s['itc_r1_mean'][-1])} | {r['mean_curve'] or 'never'}, {r['interpolated'] or 'never'} "
                     f"({seeds}) |")  # fmt: skip
    lines += [
        "",
        "| variant | hard-neg. ITM acc. per epoch (all) | final, minus (a) of the same seed | final: colour | shape "
        "| size | relation | false-neg. share of in-batch pairs, after epoch 1 | of chosen ITM negatives | "
        "converted / replaced per step | s per step, last epoch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        kinds = " | ".join(_fmt(s[f"hard_itm_{k}"][-1]) for k in KINDS[1:])
        shares = " | ".join(_after_first_epoch(s[m], percent=True) for m in ("false_negative_share",
                                                                             "itm_false_negative_share"))  # fmt: skip
        mined = " / ".join(_after_first_epoch(s[m]) for m in ("converted_negatives", "replaced_negatives"))
        lines.append(f"| {LABELS.get(name, name)} | {' / '.join(_fmt(p) for p in s['hard_itm_all'])} | "
                     f"{_fmt(paired[name]['hard_itm_all'], signed=True)} | {kinds} | "
                     f"{shares} | {mined} | {_fmt(s['step_time_s'][-1], 3)} |")  # fmt: skip
    return "\n".join(lines)


def _after_first_epoch(pairs: list, percent: bool = False) -> str:
    """The mean of a training metric's seed means over the epochs after the first (which trains on random batches
    in every variant)."""
    values = [mean for mean, _ in pairs[1:] if mean is not None]
    if not values:
        return "-"
    return f"{statistics.fmean(values) * 100:.1f}%" if percent else f"{statistics.fmean(values):.1f}"


def plot(summaries: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("r1_mean", "mean R@1, re-ranked (%)"), ("itc_r1_mean", "mean R@1, ITC only (%)"),
              ("hard_itm_all", "hard negatives, ITM accuracy (%)"),
              ("false_negative_share", "false negatives %: pairs; ITM negs. dashed"))  # fmt: skip
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, (metric, title) in zip(axes, panels):
        for colour, (name, s) in enumerate(summaries.items()):
            curves = [(metric, "-")]
            if metric == "false_negative_share":
                curves.append(("itm_false_negative_share", "--"))
            for curve, style in curves:
                scale = 100 if curve.endswith("share") else 1
                pairs = [(st, p) for st, p in zip(s["steps"], s[curve]) if p[0] is not None]
                ax.errorbar([st for st, _ in pairs], [p[0] * scale for _, p in pairs],
                            yerr=[p[1] * scale for _, p in pairs], marker="o", capsize=3, linestyle=style,
                            color=f"C{colour}", label=LABELS.get(name, name) if style == "-" else None)  # fmt: skip
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
    axes[2].axhline(50, color="grey", linestyle=":")
    axes[0].legend(fontsize=7)
    fig.suptitle("demo ablation: mean ± sd over seeds, evaluated after every epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/ablation"), help="run folders")
    p.add_argument("--only", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated train.seed values")
    p.add_argument("--fresh", action="store_true", help="run again even where a result exists")
    p.add_argument("--bench", type=Path, default=ROOT / "benchmarks", help="where the JSON, table and plot go")
    p.add_argument("overrides", nargs="*", help="config overrides applied to every run (e.g. train.epochs=2)")
    args = p.parse_args(argv)
    variants, seeds = args.only.split(","), [int(s) for s in args.seeds.split(",")]
    if "e" in variants and "a" not in variants:
        variants.insert(0, "a")  # (e) mines with (a)'s export
    runs = {v: [run(v, seed, args.out, args.overrides, args.fresh) for seed in seeds] for v in variants}
    summaries = {v: summarise(r) for v, r in runs.items()}
    payload = {"common_overrides": args.overrides, "variants": {v: VARIANTS[v] for v in variants},
               "summaries": summaries, "runs": runs}  # fmt: skip
    if "a" in summaries:
        target = summaries["a"]["r1_mean"][-1][0]
        reaches = {v: reach(summaries[v], runs[v], target) for v in variants}
        paired = {v: paired_differences(runs[v], runs["a"]) for v in variants}
        payload.update(target_r1_mean=target, reach=reaches, paired_vs_a=paired)
        text = tables(summaries, reaches, target, summaries["a"]["steps"][-1], paired)
        (args.bench / "ablation.md").write_text(text + "\n")
        print(text)
    (args.bench / "ablation.json").write_text(json.dumps(payload, indent=1) + "\n")
    plot(summaries, args.bench / "ablation.png")
    print(f"wrote {args.bench / 'ablation.json'} and {args.bench / 'ablation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
