#!/usr/bin/env python
"""Zero-shot image classification (CLIP's protocol) of a trained gritvlp model: top-1 / top-5 accuracy and mean
per-class recall.

    python scripts/eval_zeroshot.py --model runs/demo/export_fp16 --image-folder /data/imagenet/val \\
        --classnames en_classnames.json --templates en_zeroshot_classification_templates.json --dataset imagenet1k
    python scripts/eval_zeroshot.py --model EXPORT --shards '/data/test-{000000..000009}.tar' --label-key label \\
        --classnames classes.json --templates templates.json --out zs.json
    python scripts/eval_zeroshot.py --model runs/demo/export_fp16 --demo-shards 'demo_data/test-{000000..000000}.tar'
    torchrun --nproc_per_node 8 scripts/eval_zeroshot.py --model EXPORT --image-folder ... (each rank a share)

Prompt files take CLIP_benchmark's layout: {dataset: [class names]} and {dataset: [templates with "{c}"]} (or
{dataset: {class name: [prompts]}}), or plain lists; --dataset picks the entry. An image folder holds one sub-folder
per class, in sorted order (the class-name file lists them in that order; without it, folder names are the names).
Shards: each sample's KEY.json holds a class index or a class name under --label-key. --demo-shards classifies the
demo set's single-object images by shape, colour and size with the demo grammar's own templates.
"""

import argparse
import json
import logging
import sys
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="export folder, or DeepSpeed checkpoints / tag folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image-folder", help="one sub-folder of images per class")
    source.add_argument("--shards", help="img2dataset shards whose KEY.json holds a label")
    source.add_argument("--demo-shards", help="the demo set's shards: shape, colour and size of single objects")
    parser.add_argument("--label-key", default="label", help="KEY.json field with the class index or name (--shards)")
    parser.add_argument("--classnames", help="class-name file (needed with --shards; default: folder names)")
    parser.add_argument("--templates", help='template file (default: the single template "a photo of a {c}.")')
    parser.add_argument("--dataset", help="the entry of {dataset: ...} prompt files to use")
    parser.add_argument("--image-size", type=int, help="evaluation resolution (default: the model's)")
    parser.add_argument("--max-tokens", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoding batch")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", help="default: cuda (this rank's GPU) when available, else cpu")
    parser.add_argument("--out", help="write the result JSON here")
    args = parser.parse_args(argv)
    if args.shards and not args.classnames:
        parser.error("--shards needs --classnames")
    return args


def classification_sets(args, image_size: int):
    from gritvlp.eval import classification_data as cdata
    from gritvlp.eval.zeroshot import load_prompt_file

    if args.demo_shards:
        return cdata.demo_attribute_sets(args.demo_shards, image_size)
    classnames = load_prompt_file(args.classnames, args.dataset) if args.classnames else None
    templates = load_prompt_file(args.templates, args.dataset) if args.templates else ["a photo of a {c}."]
    name = args.dataset or "zeroshot"
    if args.image_folder:
        return [cdata.from_image_folder(args.image_folder, image_size, classnames, templates, name)]
    return [cdata.from_labelled_shards(args.shards, image_size, args.label_key, classnames, templates, name)]


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from gritvlp.eval.loading import load_for_evaluation
    from gritvlp.eval.zeroshot import evaluate_zeroshot

    try:
        model, tokenizer, device, is_main = load_for_evaluation(args.model, args.device, args.dtype)
        sets = classification_sets(args, args.image_size or model.config.image_size)
    except (FileNotFoundError, KeyError, ValueError) as err:
        sys.exit(f"error: {err}")
    results = {}
    for data in sets:
        result = evaluate_zeroshot(model, data, device, tokenizer, batch_size=args.batch_size,
                                   max_tokens=args.max_tokens, num_workers=args.num_workers, progress=is_main)  # fmt: skip
        results[data.name] = {**result, "classnames": data.classnames}
    out = next(iter(results.values())) if len(results) == 1 else results
    if is_main:
        print(json.dumps(out, indent=2))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
