#!/usr/bin/env python
"""FLM against MLM (mask rate 0.5) at equal wall time on the demo data.

    python scripts/bench_flm.py                                 # 150 s of training each, demo preset, CPU
    python scripts/bench_flm.py --budget-s 600 --device cuda objectives.flm_corruption_rate=0.1

Both runs use the same preset (overrides apply to both), seed, initial weights, sample order, learning rate and
objectives; only objectives.text_objective differs. Each trains for --budget-s seconds of wall time (data loading
included, evaluation excluded) in one process: AdamW with the DeepSpeed config's optimizer settings, linear warm-up
to train.lr over train.warmup_steps and then a constant rate (the run length is a time, so no cosine), random batches
(GRIT grouping is left out: it would act alike on both). Every --log-every steps the training losses are recorded
with the elapsed time; at the end zero-shot retrieval (ITC top-k re-ranked by ITM, gritvlp.eval) runs on the demo's
held-out split. Writes <out>.json, <out>.md (tables) and <out>.png (losses over time, R@1), default
benchmarks/flm_vs_mlm.*. Needs matplotlib for the figure.

The runs share the machine with whatever else runs on it: compare samples/s to see whether they got the same share.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from gritvlp.config import load_config
from gritvlp.data.collate import Collator
from gritvlp.data.demo import ensure_demo_shards
from gritvlp.data.shards import ShardDataset
from gritvlp.data.text import load_tokenizer
from gritvlp.data.transforms import train_transform
from gritvlp.eval.data import from_shards
from gritvlp.eval.retrieval import evaluate_retrieval
from gritvlp.model.gritvlp import GritVLP
from gritvlp.objectives.pretraining import PretrainingObjective
from gritvlp.train.engine import parameter_groups
from gritvlp.train.step import step_seed

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "mlm": ["objectives.text_objective=mlm", "objectives.mask_prob=0.5"],
    "flm": ["objectives.text_objective=flm"],
}
LOGGED = ("loss", "itc", "itm", "mlm", "flm", "flm_reconstruction", "flm_next", "flm_previous")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides for both runs, section.key=value")
    parser.add_argument("--config", default="demo", help="gritvlp preset or YAML (default demo)")
    parser.add_argument("--budget-s", type=float, default=150.0, help="training wall time per run (default 150 s)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32, the demo's)")
    parser.add_argument("--log-every", type=int, default=5, help="steps between recorded losses (default 5)")
    parser.add_argument("--k-test", type=int, default=None, help="ITM re-ranks the top k of ITC (default eval.k_test)")
    parser.add_argument("--no-eval", action="store_true", help="skip the zero-shot retrieval")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ds-config", type=Path, default=ROOT / "ds_configs" / "zero2.json")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "flm_vs_mlm", help="output path, no suffix")
    return parser.parse_args(argv)


def optimizer(objective, ds_config: Path, lr: float) -> torch.optim.Optimizer:
    params = json.loads(ds_config.read_text())["optimizer"]["params"]
    groups = parameter_groups(objective, params.get("weight_decay", 0.0))
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(params.get("betas", (0.9, 0.999))), eps=params.get("eps", 1e-8))


def batches(dataset, collator, batch: int, seed: int):
    """Shuffled batches for as long as asked, epoch after epoch, in an order fixed by the seed."""
    epoch = 0
    while True:
        order = torch.Generator().manual_seed(seed + epoch)
        yield from DataLoader(dataset, batch_size=batch, shuffle=True, generator=order, collate_fn=collator,
                              drop_last=True, num_workers=1, persistent_workers=False)  # fmt: skip
        epoch += 1


def train_for(cfg, args, dataset, collator, special_tokens) -> tuple[GritVLP, list[dict]]:
    """Trains one variant for args.budget_s seconds; returns the model and the recorded losses."""
    torch.manual_seed(cfg.train.seed)
    objective = PretrainingObjective(GritVLP(cfg.model, special_tokens), cfg.objectives).to(args.device).train()
    lr, warmup = cfg.train.lr or 1e-4, max(1, cfg.train.warmup_steps)
    opt = optimizer(objective, args.ds_config, lr)
    records, step, samples, start = [], 0, 0, time.perf_counter()
    for host in batches(dataset, collator, args.batch, cfg.train.seed):
        if host["input_ids"].shape[0] < 2:
            continue
        prepared = objective.prepare_batch(
            host, torch.Generator().manual_seed(step_seed(cfg.train.seed, step, 0, "mlm"))
        )
        batch = {k: v.to(args.device) for k, v in prepared.items() if torch.is_tensor(v)}
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        objective.set_step(step)  # the preset's text_start_step / text_ramp_steps, as the trainer applies them
        out = objective(batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), 5.0)
        opt.step()
        step, samples = step + 1, samples + host["input_ids"].shape[0]
        elapsed = time.perf_counter() - start
        if step % args.log_every == 0 or elapsed >= args.budget_s:
            records.append({"time_s": elapsed, "step": step, "samples": samples,
                            **{k: float(out[k].detach()) for k in LOGGED if k in out}})  # fmt: skip
            print(f"  {cfg.objectives.text_objective} {elapsed:6.1f} s step {step:4d}: "
                  + " ".join(f"{k} {records[-1][k]:.3f}" for k in LOGGED if k in records[-1]), flush=True)  # fmt: skip
        if elapsed >= args.budget_s:
            return objective.model, records
    raise AssertionError("unreachable: the batch stream never ends")


def retrieval(model, cfg, args, tokenizer) -> dict:
    _, test = ensure_demo_shards(cfg.data.demo_dir, cfg.data.demo_train_samples, cfg.data.demo_test_samples,
                                 seed=cfg.train.seed)  # fmt: skip
    data = from_shards(test, cfg.model.image_size, cfg.data.max_words, progress=False)
    return evaluate_retrieval(model, data, args.k_test or cfg.eval.k_test, args.device, tokenizer,
                              max_tokens=cfg.data.max_tokens, progress=False, rerank_score=cfg.eval.rerank_score)  # fmt: skip


def table(report: dict) -> str:
    """Markdown: final and time-matched losses per run, then retrieval."""
    lines = ["| run | time s | steps | samples/s | itc | itm | text loss | TR@1 | IR@1 | mean R@1 | ITC mean R@1 | r_mean |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for name, run in report["runs"].items():
        last, ret = run["records"][-1], run.get("retrieval", {})
        text = last.get("mlm", last.get("flm"))
        cells = [name, f"{last['time_s']:.0f}", str(last["step"]), f"{last['samples'] / last['time_s']:.1f}",
                 f"{last['itc']:.3f}", f"{last.get('itm', float('nan')):.3f}", f"{text:.3f}"]  # fmt: skip
        if ret:
            ret = {**ret, "r1_mean": (ret["txt_r1"] + ret["img_r1"]) / 2,
                   "itc_r1_mean": (ret["itc_txt_r1"] + ret["itc_img_r1"]) / 2}  # fmt: skip
        cells += [f"{ret[k]:.2f}" if k in ret else "-" for k in ("txt_r1", "img_r1", "r1_mean", "itc_r1_mean", "r_mean")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Losses at matched times (the last record at or before each time):", "",
              "| time s | " + " | ".join(f"{n} itc | {n} itm | {n} text" for n in report["runs"]) + " |",
              "| ---: |" + " ---: |" * 3 * len(report["runs"])]  # fmt: skip
    budget = report["budget_s"]
    for t in [budget * f for f in (0.25, 0.5, 0.75, 1.0)]:
        row = [f"{t:.0f}"]
        for run in report["runs"].values():
            seen = [r for r in run["records"] if r["time_s"] <= t + 1e-6]
            if not seen:
                row += ["-"] * 3
                continue
            r = seen[-1]
            row += [f"{r['itc']:.3f}", f"{r.get('itm', float('nan')):.3f}", f"{r.get('mlm', r.get('flm')):.3f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def figure(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for name, run in report["runs"].items():
        t = [r["time_s"] for r in run["records"]]
        axes[0].plot(t, [r.get("mlm", r.get("flm")) for r in run["records"]], label=name)
        axes[1].plot(t, [r["itc"] for r in run["records"]], label=name)
        axes[2].plot(t, [r.get("itm", float("nan")) for r in run["records"]], label=name)
    for ax, title in zip(axes[:3], ("text loss (MLM; FLM: mean of its 3)", "ITC loss", "ITM loss")):
        ax.set_title(title)
        ax.set_xlabel("wall time (s)")
        ax.legend()
    names = list(report["runs"])
    metrics = ("txt_r1", "img_r1", "r_mean")
    for i, name in enumerate(names):
        ret = report["runs"][name].get("retrieval", {})
        axes[3].bar([j + 0.4 * i for j in range(len(metrics))], [ret.get(m, 0) for m in metrics], width=0.4, label=name)
    axes[3].set_xticks([j + 0.2 for j in range(len(metrics))], ["TR@1", "IR@1", "r_mean"])
    axes[3].set_title("zero-shot retrieval, demo test split (%)")
    axes[3].legend()
    fig.suptitle(f"FLM vs MLM (0.5) at equal wall time, {report['budget_s']:.0f} s each on {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> dict:
    args = parse_args(argv)
    base = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(base.model.tokenizer)
    special = {"pad": tokenizer.pad_token_id, "cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id,
               "mask": tokenizer.mask_token_id}  # fmt: skip
    train, _ = ensure_demo_shards(base.data.demo_dir, base.data.demo_train_samples, base.data.demo_test_samples,
                                  seed=base.train.seed)  # fmt: skip
    transform = train_transform(base.model.image_size, tuple(base.data.crop_scale), base.data.hflip,
                                base.data.randaug_n, base.data.randaug_m)  # fmt: skip
    dataset = ShardDataset(base.data.train_shards or train, transform, base.data.max_words, seed=base.train.seed)
    collator = Collator(tokenizer, base.data.max_tokens)
    report = {"budget_s": args.budget_s, "device": args.device, "host": platform.node(), "threads": torch.get_num_threads(),
              "config": args.config, "overrides": args.overrides, "runs": {}}  # fmt: skip
    for name, variant in VARIANTS.items():
        cfg = load_config(args.config, [*args.overrides, *variant])
        print(f"{name}: training for {args.budget_s:.0f} s", flush=True)
        model, records = train_for(cfg, args, dataset, collator, special)
        run = {"objectives": vars(cfg.objectives), "records": records}
        if not args.no_eval:
            run["retrieval"] = retrieval(model, cfg, args, tokenizer)
            print(f"  {name} zero-shot retrieval: {run['retrieval']}", flush=True)
        report["runs"][name] = run
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(table(report))
    figure(report, args.out.with_suffix(".png"))
    print(table(report))
    return report


if __name__ == "__main__":
    main()
