#!/usr/bin/env python
"""Image-text retrieval (ALBEF's protocol: ITC top-k, re-ranked by ITM) of a trained gritvlp model.

    python scripts/eval_retrieval.py --model runs/demo/export_fp16 --shards 'demo_data/test-{000000..000000}.tar'
    python scripts/eval_retrieval.py --model runs/grit_4m/checkpoints --ann coco_test.json \\
        --image-root /data/coco --k-test coco --out coco_test.json
    torchrun --nproc_per_node 8 scripts/eval_retrieval.py --model EXPORT --ann flickr30k_test.json \\
        --image-root /data/flickr30k --k-test flickr30k

--model takes an fp16 export folder or a DeepSpeed checkpoints folder (or one tag folder). Under torchrun /
deepspeed each rank re-ranks a share of the queries; rank 0 prints and writes the JSON result.
"""

import argparse
import json
import logging
import sys
from pathlib import Path


def k_test_value(text: str) -> int:
    from gritvlp.eval.retrieval import ALBEF_K_TEST

    if text in ALBEF_K_TEST:
        return ALBEF_K_TEST[text]
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or one of {sorted(ALBEF_K_TEST)}") from None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="export folder, or DeepSpeed checkpoints / tag folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", help="test shards (img2dataset layout); samples of one image share a group id")
    source.add_argument("--ann", help='Karpathy-style JSON: [{"image": relative path, "caption": [...]}]')
    parser.add_argument("--image-root", help="folder the --ann image paths are relative to")
    parser.add_argument("--k-test", type=k_test_value, default="coco", help="candidates re-ranked per query: N, coco (256) or flickr30k (128)")  # fmt: skip
    parser.add_argument("--image-size", type=int, help="evaluation resolution (default: the model's)")
    parser.add_argument("--max-words", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoding batch")
    parser.add_argument("--rerank-score", choices=("itm", "itm+itc"), default="itm", help="ALBEF's ITM logit or BLIP's logit + cosine similarity")  # fmt: skip
    parser.add_argument("--itm-batch-size", type=int, default=256, help="image-text pairs per ITM batch")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", help="default: cuda (this rank's GPU) when available, else cpu")
    parser.add_argument("--out", help="write the result JSON here")
    args = parser.parse_args(argv)
    if args.ann and not args.image_root:
        parser.error("--ann needs --image-root")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from gritvlp.eval import data as eval_data
    from gritvlp.eval.loading import load_for_evaluation
    from gritvlp.eval.retrieval import evaluate_retrieval

    try:
        model, tokenizer, device, is_main = load_for_evaluation(args.model, args.device, args.dtype)
        image_size = args.image_size or model.config.image_size
        if args.shards:
            data = eval_data.from_shards(args.shards, image_size, args.max_words, args.num_workers, progress=is_main)
        else:
            data = eval_data.from_karpathy(args.ann, args.image_root, image_size, args.max_words)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    result = evaluate_retrieval(
        model, data, args.k_test, device, tokenizer, batch_size=args.batch_size, itm_batch_size=args.itm_batch_size,
        max_tokens=args.max_tokens, num_workers=args.num_workers, progress=is_main, rerank_score=args.rerank_score,
    )  # fmt: skip
    if is_main:
        print(json.dumps(result, indent=2))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
