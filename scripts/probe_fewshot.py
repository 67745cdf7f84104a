#!/usr/bin/env python
"""Few-shot linear probing of a trained gritvlp model: DiHT's zero-shot-initialised probe against CLIP's logistic
regression from scratch, for k shots per class and several seeds, with the zero-shot accuracy as the reference.

    python scripts/probe_fewshot.py --model runs/demo/export_fp16 --demo-shards demo_data \\
        --out benchmarks/fewshot_probe.json --plot benchmarks/fewshot_probe.png
    python scripts/probe_fewshot.py --model EXPORT --train-folder /data/pets/train --test-folder /data/pets/test \\
        --classnames en_classnames.json --templates en_zeroshot_classification_templates.json --dataset pets

The shots (k training + k validation images per class, disjoint) are drawn from the training images, the accuracy
is measured on the test images. --demo-shards takes the demo set's folder: shape, colour and size of its
single-object images, shots from the training split, tested on the test split (whose objects are all (shape,
colour) pairs never seen in training), or on --demo-test-shards. See gritvlp/eval/probing.py for both probes.
"""

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="export folder, or DeepSpeed checkpoints / tag folder")
    parser.add_argument("--demo-shards", help="folder of the demo set (train-*.tar and test-*.tar)")
    parser.add_argument("--demo-test-shards", help="demo shards to test on instead of the folder's test split, e.g. "
                        "another draw's training split (seen (shape, colour) pairs)")
    parser.add_argument("--train-folder", help="image folder (one sub-folder per class) the shots come from")
    parser.add_argument("--test-folder", help="image folder with the same classes, for the accuracy")
    parser.add_argument("--classnames", help="class-name file (CLIP_benchmark layout; default: folder names)")
    parser.add_argument("--templates", help='template file (default: "a photo of a {c}.")')
    parser.add_argument("--dataset", help="the entry of {dataset: ...} prompt files to use")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seeds", type=int, default=5, help="shot draws per k")
    parser.add_argument("--steps", type=int, default=300, help="projected gradient steps of DiHT's probe")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--out", help="result JSON")
    parser.add_argument("--plot", help="accuracy-vs-k plot (PNG)")
    args = parser.parse_args(argv)
    if bool(args.demo_shards) == bool(args.train_folder and args.test_folder):
        parser.error("give --demo-shards, or --train-folder and --test-folder")
    return args


def task_pairs(args, image_size: int):
    """[(train set, test set)] with the same classes and templates."""
    from gritvlp.eval import classification_data as cdata
    from gritvlp.eval.zeroshot import load_prompt_file

    if args.demo_shards:
        folder = Path(args.demo_shards)
        train = cdata.demo_attribute_sets(str(folder / "train-*.tar"), image_size)
        test = cdata.demo_attribute_sets(args.demo_test_shards or str(folder / "test-*.tar"), image_size)
        return list(zip(train, test))
    names = load_prompt_file(args.classnames, args.dataset) if args.classnames else None
    templates = load_prompt_file(args.templates, args.dataset) if args.templates else ["a photo of a {c}."]
    name = args.dataset or "folder"
    train = cdata.from_image_folder(args.train_folder, image_size, names, templates, name)
    test = cdata.from_image_folder(args.test_folder, image_size, names, templates, name)
    if train.classnames != test.classnames:
        raise ValueError("the train and test folders hold different classes")
    return [(train, test)]


def probe_task(model, tokenizer, train, test, args, device) -> dict:
    """Zero-shot accuracy and, per k, both probes' test accuracy over the seeds."""
    import torch

    from gritvlp.eval import probing
    from gritvlp.eval.zeroshot import class_embeddings, image_features

    classes = class_embeddings(model, tokenizer, train.classnames, train.templates, device).cpu()
    pool = image_features(model, train, device, args.batch_size, progress=False).cpu()
    test_x = image_features(model, test, device, args.batch_size, progress=False).cpu()
    logit_scale = 1.0 / float(model.temperature().detach())
    zero_shot = probing.LinearClassifier(logit_scale * classes, torch.zeros(len(classes)), 0.0)
    result = {"num_classes": train.num_classes, "pool": len(pool), "test": len(test_x),
              "zero_shot": zero_shot.accuracy(test_x, test.labels), "shots": {}}  # fmt: skip
    for k in args.shots:
        runs = {"logreg": [], "diht": [], "diht_radius": [], "logreg_cost": []}
        for seed in range(args.seeds):
            train_idx, val_idx = probing.few_shot_split(train.labels, k, seed)
            fit = (pool[train_idx], train.labels[train_idx], pool[val_idx], train.labels[val_idx])
            logreg = probing.logistic_regression_probe(*fit, train.num_classes)
            diht = probing.zero_shot_init_probe(*fit, classes, logit_scale, steps=args.steps)
            runs["logreg"].append(logreg.accuracy(test_x, test.labels))
            runs["diht"].append(diht.accuracy(test_x, test.labels))
            runs["logreg_cost"].append(logreg.chosen)
            runs["diht_radius"].append(diht.chosen)
        result["shots"][str(k)] = {
            **{f"{p}_mean": statistics.mean(runs[p]) for p in ("logreg", "diht")},
            **{f"{p}_sd": statistics.stdev(runs[p]) if len(runs[p]) > 1 else 0.0 for p in ("logreg", "diht")},
            **runs,
        }
        print(f"{train.name} k={k}: zero-shot {result['zero_shot']:.1f}  logreg {result['shots'][str(k)]['logreg_mean']:.1f}"
              f"  diht {result['shots'][str(k)]['diht_mean']:.1f}", flush=True)  # fmt: skip
    return result


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, (name, task) in zip(axes[0], tasks.items()):
        ks = [int(k) for k in task["shots"]]
        for probe, label in (("diht", "zero-shot init + PGD (DiHT)"), ("logreg", "logistic regression (CLIP)")):
            means = [task["shots"][str(k)][f"{probe}_mean"] for k in ks]
            sds = [task["shots"][str(k)][f"{probe}_sd"] for k in ks]
            ax.errorbar(ks, means, yerr=sds, marker="o", capsize=3, label=label)
        ax.axhline(task["zero_shot"], color="grey", linestyle="--", label="zero-shot")
        ax.axhline(100.0 / task["num_classes"], color="lightgrey", linestyle=":", label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_title(f"{name} ({task['num_classes']} classes)")
        ax.set_xlabel("shots per class (k)")
        ax.set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"few-shot linear probing, mean ± sd over {results['seeds']} shot draws; tested on {results['test']}",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from gritvlp.eval.loading import load_model, load_model_tokenizer

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model = load_model(args.model, device)
        tokenizer = load_model_tokenizer(args.model, model)
        pairs = task_pairs(args, model.config.image_size)
    except (FileNotFoundError, KeyError, ValueError) as err:
        sys.exit(f"error: {err}")
    results = {"model": str(args.model), "test": args.demo_test_shards or args.test_folder or "demo test split",
               "seeds": args.seeds, "shots": args.shots, "steps": args.steps, "tasks": {}}
    for train, test in pairs:
        results["tasks"][train.name] = probe_task(model, tokenizer, train, test, args, device)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    if args.plot:
        plot(results, args.plot)
    return results


if __name__ == "__main__":
    main()
