#!/usr/bin/env python
"""Fine-tune a pre-trained GRIT-VLP export for image-text retrieval (ITC + ITM, lr 1e-5, 384 px, 5 epochs COCO /
10 Flickr30k), evaluating after every epoch and exporting the best epoch as fp16.

    deepspeed scripts/finetune_retrieval.py --deepspeed_config ds_configs/finetune_zero2.json \\
        --pretrained runs/grit_4m/export_fp16 --train-ann coco_karpathy_train.json --test-ann coco_karpathy_test.json \\
        --image-root /data/coco --dataset coco --output_dir runs/coco_ft
    python scripts/finetune_retrieval.py --deepspeed_config ds_configs/finetune_zero2.json \\
        --pretrained runs/demo/export_fp16 --train-shards 'demo_data/train-{000000..000003}.tar' \\
        --test-shards 'demo_data/test-{000000..000000}.tar' --hard-negative-shards 'demo_data/test-{000000..000000}.tar' \\
        --image-size 64 --no-hflip --randaug-n 0 --epochs 2 --lr 1e-4 --queue-size 512 --rerank-score itm+itc \\
        --output_dir runs/demo_ft

The demo example (from the demo's export, runs/demo/export_fp16): lr 1e-4 is a tenth of the demo's pre-training
rate, as ALBEF's 1e-5 is of its 1e-4; a queue of 512 holds about 12% of the demo's 4,096 training captions, as
ALBEF's 65,536 does of COCO's ~567k (65,536 would be 16 epochs of the demo, random features for all of these 2).
--recipe grit takes the same flags, --recipe in-batch all but --queue-size.

Recipes (--recipe):
  albef     ALBEF's (the default): a momentum encoder (EMA 0.995) and queues of 65,536 momentum features with their
            image ids; ITC targets uniform over every batch and queue feature of the row's image, mixed with the
            momentum model's softmax (alpha 0.4, warmed up over the first epoch); ITM negatives sampled from the
            in-batch similarities; cosine lr stepped once per epoch.
  grit      GRIT-VLP's: ALBEF's model and loop without distillation (alpha 0), queue 65,280. Its batch is 64 per GPU
            (ALBEF's 32): set train_micro_batch_size_per_gpu in the DeepSpeed config.
  in-batch  no momentum encoder or queue: ITC over the local batch, each positive against the negatives only, cosine
            per optimiser step after --warmup-steps; the cheapest, and the one with GRIT's --consistency-weight.

Evaluation: each query's top --k-test (default: coco 256, flickr30k 128, never more than 12.8% of the test images,
ALBEF's Flickr30k share) is re-ranked by --rerank-score; the ITC ranking alone is logged beside it (eval/itc_*).
The best epoch is chosen by --select (the re-ranked r_mean, or the ITC ranking's). On the demo, whose ITM head is
weak, re-rank by itm+itc: the ITM logit alone scrambles the ITC order there.

The best epoch's weights land in OUTPUT_DIR/best_fp16 (its metrics in OUTPUT_DIR/best.json); TensorBoard logs in
OUTPUT_DIR/tensorboard (loss/*, train/*, eval/*). --resume latest continues at the epoch after the last checkpoint,
with the momentum encoder and queue it saved.
"""

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None):
    import deepspeed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", required=True, help="export folder of pre-training (config.json + model.safetensors)")  # fmt: skip
    p.add_argument("--output_dir", default="runs/finetune")
    train = p.add_mutually_exclusive_group(required=True)
    train.add_argument("--train-shards", help="training shards (img2dataset layout)")
    train.add_argument("--train-ann", help="ALBEF's training JSON: [{image, caption, image_id}]")
    test = p.add_mutually_exclusive_group(required=True)
    test.add_argument("--test-shards", help="test shards")
    test.add_argument("--test-ann", help="ALBEF's test JSON: [{image, caption: [...]}]")
    p.add_argument("--image-root", help="folder the annotation files' image paths are relative to")
    p.add_argument("--test-image-root", help="image folder of --test-ann (default: --image-root)")
    p.add_argument("--dataset", choices=("coco", "flickr30k"), default="coco", help="default epochs and k_test")
    p.add_argument("--recipe", choices=("albef", "grit", "in-batch"), default="albef", help="see above")
    p.add_argument("--momentum", type=float, help="EMA rate of the momentum encoder (default: the recipe's, 0.995)")
    p.add_argument("--queue-size", type=int, help="default: the recipe's (albef 65536, grit 65280)")
    p.add_argument("--alpha", type=float, help="momentum distillation weight (default: albef 0.4, grit 0)")
    p.add_argument("--epochs", type=int, help="default: 5 coco, 10 flickr30k")
    p.add_argument("--k-test", type=int, help="candidates re-ranked per query (default: 256 coco, 128 flickr30k, at most 12.8%% of the test images)")  # fmt: skip
    p.add_argument("--rerank-score", choices=("itm", "itm+itc"), default="itm", help="ALBEF's ITM logit or BLIP's logit + cosine similarity")  # fmt: skip
    p.add_argument("--select", choices=("rerank", "itc"), default="rerank", help="the best epoch by the re-ranked r_mean or by the ITC ranking's")  # fmt: skip
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--lr", type=float, default=1e-5, help="replaces the DeepSpeed config's learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=0, help="in-batch recipe only")
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.5, 1.0))
    p.add_argument("--no-hflip", dest="hflip", action="store_false", help="no horizontal flips (the demo set)")
    p.add_argument("--randaug-n", type=int, default=2)
    p.add_argument("--randaug-m", type=int, default=7)
    p.add_argument("--max-words", type=int, default=30)
    p.add_argument("--max-tokens", type=int, default=30)
    p.add_argument("--itm-negatives", choices=("sample", "hardest"), default="sample", help="sample: ALBEF's and GRIT-VLP's fine-tuning")  # fmt: skip
    p.add_argument("--consistency-weight", type=float, default=0.0, help="GRIT's consistency term (in-batch recipe)")
    p.add_argument("--hard-negative-shards", help="demo test shards: run the hard-negative benchmark every epoch")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--itm-batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--max-steps", type=int, default=0, help="> 0 stops early")
    p.add_argument("--keep-checkpoints", type=int, default=1)
    p.add_argument("--resume", help="'latest' or a checkpoints / tag folder")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    p = deepspeed.add_config_arguments(p)
    args = p.parse_args(argv)
    if not args.deepspeed_config:
        p.error("--deepspeed_config is required (e.g. ds_configs/finetune_zero2.json)")
    return args


def main(argv=None):
    args = parse_args(argv)
    from gritvlp.train.distributed import configure_logging

    configure_logging()
    import dataclasses

    from gritvlp.train.finetune import FinetuneConfig, finetune

    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    try:
        cfg = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in fields})
    except ValueError as err:
        sys.exit(f"error: {err}")
    finetune(cfg, args.deepspeed_config, resume=args.resume)


if __name__ == "__main__":
    main()
