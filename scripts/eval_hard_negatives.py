#!/usr/bin/env python
"""Hard-negative benchmark on the demo test split: each image's caption against the same caption with one colour,
shape or size changed or its relation turned round, scored by ITM (match probability) and ITC (similarity).

    python scripts/eval_hard_negatives.py --model runs/demo/export_fp16 --out runs/demo/hard_negatives.json
    python scripts/eval_hard_negatives.py --model runs/demo_ft/best_fp16 --shards 'demo_data/test-{000000..000000}.tar'

--model takes an fp16 export folder or a DeepSpeed checkpoints folder (or one tag folder). Accuracies are
percentages of images whose true caption scores higher; "count" says how many comparisons each kind holds.
"""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="export folder, or DeepSpeed checkpoints / tag folder")
    parser.add_argument("--shards", default="demo_data/test-{000000..000000}.tar", help="demo test shards")
    parser.add_argument("--image-size", type=int, help="evaluation resolution (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=30)
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--out", help="write the result JSON here")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from gritvlp.eval.hard_negatives import evaluate_hard_negatives
    from gritvlp.eval.loading import load_model, load_model_tokenizer

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    dtype = dtypes[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    try:
        model = load_model(args.model, device, dtype)
        tokenizer = load_model_tokenizer(args.model, model)
        result = evaluate_hard_negatives(
            model, args.shards, device, tokenizer, image_size=args.image_size, batch_size=args.batch_size,
            max_tokens=args.max_tokens,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
