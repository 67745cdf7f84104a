"""What the demo ablation's batches hold: per run, how alike its last epoch's training batches are, in the model's own
feature space and in what their captions say.

    python scripts/ablation_batches.py            # reads runs/ablation, writes benchmarks/ablation_batches.{json,md}

Each run trained on the demo set its seed draws (the generator is seeded by train.seed), made again here in a scratch
folder from the run's config.yaml. Its checkpoints hold the batches of its last epoch (random batches for (a), GRIT's grouped batches built from
the previous epoch's features for the others). For each run:
  - the mean image-text cosine of the in-batch negative pairs of those batches and of random batches of the same
    samples, both under the run's own model early in that epoch (its first checkpoint of the epoch): how much
    harder grouping made the negatives, in the features it grouped by;
  - the share of the batches' sample pairs whose captions name a common colour (any object), a common shape, a
    common size, or are identical, against random batches: which attributes the grouped batches share, and so
    which their in-batch negatives can no longer teach.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from ablate import LABELS, VARIANTS  # noqa: E402

ATTRIBUTES = ("colour", "shape", "size", "caption")


def caption_attributes(caption: str) -> dict[str, frozenset]:
    """The sets of colours, shapes and sizes a demo caption names, and the caption itself."""
    from gritvlp.data.demo import parse_caption

    objects = set()
    for subject, _, obj in parse_caption(caption):
        objects.update(d for d in (subject, obj) if d)
    words = [d.split() for d in objects]  # "a <size> <colour> <shape>"
    return {"size": frozenset(w[1] for w in words), "colour": frozenset(w[2] for w in words),
            "shape": frozenset(w[3] for w in words), "caption": frozenset([caption])}  # fmt: skip


def sampler_state(checkpoints: Path, tag: str) -> dict:
    return torch.load(checkpoints / tag / "gritvlp_rank00000.pt", map_location="cpu", weights_only=False)["sampler"]


def epoch_batches(sampler: dict) -> list[list[int]]:
    """Rank 0's batches of the epoch a checkpoint is in (a random epoch is a pure function of seed and epoch)."""
    if sampler["batches"] is None:
        from gritvlp.sampling.order import epoch_key, random_rank_batches

        key = epoch_key(sampler["seed"], sampler["epoch"])
        return [b.tolist() for b in random_rank_batches(sampler["num_samples"], sampler["batch_size"], 0,
                                                        sampler["world_size"], key)]  # fmt: skip
    samples, sizes = sampler["batches"]["samples"].tolist(), sampler["batches"]["sizes"].tolist()
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    return [samples[s : s + n] for s, n in zip(starts, sizes)]


def shuffled(batches: list[list[int]], seed: int) -> list[list[int]]:
    """Random batches of the same samples and sizes."""
    flat = torch.tensor([i for b in batches for i in b])
    flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))].tolist()
    out, start = [], 0
    for b in batches:
        out.append(flat[start : start + len(b)])
        start += len(b)
    return out


def pair_shares(batches: list[list[int]], attributes: list[dict]) -> dict[str, float]:
    shares = []
    for b in batches:
        pairs = [(i, j) for n, i in enumerate(b) for j in b[n + 1 :]]
        if pairs:
            shares.append({a: sum(bool(attributes[i][a] & attributes[j][a]) for i, j in pairs) / len(pairs)
                           for a in ATTRIBUTES})  # fmt: skip
    return {a: statistics.fmean(s[a] for s in shares) for a in ATTRIBUTES}


class Features:
    """Normalised image and text features of every training sample under one checkpoint's model."""

    def __init__(self, dataset, tokenizer, checkpoints: Path, tag: str, scratch: Path):
        from gritvlp.eval.loading import load_model
        from gritvlp.export import export_fp16

        folder = export_fp16(checkpoints / tag, scratch / f"{checkpoints.parent.parent.name}_{checkpoints.parent.name}")
        model = load_model(folder)
        image, text = [], []
        with torch.no_grad():
            for lo in range(0, len(dataset), 256):
                items = [dataset[i] for i in range(lo, min(len(dataset), lo + 256))]
                image.append(model.encode_image(torch.stack([x["image"] for x in items]))[1])
                tokens = tokenizer([x["caption"] for x in items], padding="longest", truncation=True, max_length=25,
                                   return_tensors="pt")  # fmt: skip
                text.append(model.encode_text(tokens["input_ids"], tokens["attention_mask"])[1])
        self.image, self.text = torch.cat(image), torch.cat(text)

    def negative_cosine(self, batches: list[list[int]]) -> float:
        """Mean image-text cosine of the in-batch negative pairs."""
        values = []
        for b in (b for b in batches if len(b) > 1):
            sim = self.image[b] @ self.text[b].T
            values.append(float((sim.sum() - sim.diagonal().sum()) / (len(b) * (len(b) - 1))))
        return statistics.fmean(values)


def run_data(run: Path, scratch: Path):
    """The run's demo training set (dataset, caption attributes), as its config drew it."""
    import yaml

    from gritvlp.data.demo import ensure_demo_shards
    from gritvlp.data.shards import ShardDataset
    from gritvlp.data.transforms import eval_transform
    from gritvlp.eval.hard_negatives import demo_scenes

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    seed, data = cfg["train"]["seed"], cfg["data"]
    pattern, _ = ensure_demo_shards(str(scratch / f"demo_seed{seed}"), data["demo_train_samples"],
                                    data["demo_test_samples"], seed=seed, progress=False)  # fmt: skip
    dataset = ShardDataset(pattern, eval_transform(cfg["model"]["image_size"]), max_words=1 << 30)
    captions = [scene["caption"] for scene in demo_scenes(pattern)]  # in index order, as the dataset reads them
    if len(captions) != len(dataset) or any(dataset[i]["caption"] != captions[i] for i in (0, len(captions) - 1)):
        raise ValueError(f"{pattern}: the shards' captions and the dataset's rows disagree")
    return dataset, [caption_attributes(c) for c in captions]


def analyse(run: Path, tokenizer, scratch: Path) -> dict:
    dataset, attributes = run_data(run, scratch)
    checkpoints = run / "checkpoints"
    final = sampler_state(checkpoints, (checkpoints / "latest").read_text().strip())
    # the run's first checkpoint inside its last epoch: the features nearest to those the batches were grouped by
    tags = sorted((p.name for p in checkpoints.glob("global_step*")), key=lambda t: int(t[len("global_step") :]))
    early = next(t for t in tags if sampler_state(checkpoints, t)["epoch"] == final["epoch"])
    batches = epoch_batches(final)
    random = shuffled(batches, seed=final["seed"])
    features = Features(dataset, tokenizer, checkpoints, early, scratch)
    return {"model": early, "cosine": features.negative_cosine(batches), "cosine_random": features.negative_cosine(random),
            "shares": pair_shares(batches, attributes), "shares_random": pair_shares(random, attributes)}  # fmt: skip


def table(result: dict) -> str:
    lines = [
        "Per run, seeds 0 / 1 / 2. Cosine: mean image-text cosine of the in-batch negatives of the last epoch's "
        "batches (random batches of the same samples in brackets), under the run's model early in that epoch. "
        "Shares: % of the batches' sample pairs whose captions name a common colour, shape or size (random "
        "batches in brackets).",
        "",
        "| variant | in-batch negative cosine | same colour | same shape | same size | identical caption |",
        "|---|---|---|---|---|---|",
    ]
    for variant, runs in result.items():
        cosine = " / ".join(f"{r['cosine']:.2f} ({r['cosine_random']:.2f})" for r in runs)
        shares = [" / ".join(f"{100 * r['shares'][a]:.0f} ({100 * r['shares_random'][a]:.0f})" for r in runs)
                  for a in ATTRIBUTES[:3]]  # fmt: skip
        same = " / ".join(f"{100 * r['shares'][ATTRIBUTES[3]]:.1f} ({100 * r['shares_random'][ATTRIBUTES[3]]:.1f})"
                          for r in runs)  # fmt: skip
        lines.append(f"| {LABELS[variant]} | {cosine} | {' | '.join(shares)} | {same} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import tempfile

    from gritvlp.data.text import load_tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "ablation")
    p.add_argument("--bench", type=Path, default=ROOT / "benchmarks")
    args = p.parse_args(argv)
    tokenizer, result = load_tokenizer(), {}
    with tempfile.TemporaryDirectory() as scratch:
        for variant in VARIANTS:
            runs = sorted((args.runs / variant).glob("seed*"))
            if runs:
                result[variant] = [analyse(run, tokenizer, Path(scratch)) for run in runs]
                print(variant, [round(r["cosine"], 3) for r in result[variant]], flush=True)
    text = table(result)
    (args.bench / "ablation_batches.md").write_text(text + "\n")
    (args.bench / "ablation_batches.json").write_text(json.dumps(result, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
