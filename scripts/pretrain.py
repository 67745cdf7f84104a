#!/usr/bin/env python
"""Pre-train GRIT-VLP with DeepSpeed.

    deepspeed scripts/pretrain.py --deepspeed_config ds_configs/zero2.json
    deepspeed scripts/pretrain.py --deepspeed_config ds_configs/zero2.json --config vitb16_bert \
        --output_dir runs/cc3m data.train_shards='/data/cc3m/{00000..00331}.tar' train.epochs=10
    deepspeed scripts/pretrain.py --deepspeed_config ds_configs/zero2.json --resume latest
    deepspeed scripts/pretrain.py --deepspeed_config ds_configs/zero2.json --overwrite    # start runs/demo again

Trailing section.key=value arguments override keys of the config (values are parsed as YAML).
"""

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None):
    import deepspeed

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo", help="preset name (demo, vitb16_bert) or a YAML file")
    parser.add_argument("--output_dir", default=None, help="run folder (overrides train.output_dir)")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder / tag folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an output_dir that holds checkpoints (they, metrics.jsonl and the "
                             "TensorBoard events are removed first); without it such a run is refused")  # fmt: skip
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the config")
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args(argv)
    if not args.deepspeed_config:
        parser.error("--deepspeed_config is required (e.g. ds_configs/zero2.json)")
    return args


def main(argv=None):
    args = parse_args(argv)
    from gritvlp.config import ConfigError, load_config
    from gritvlp.train.distributed import configure_logging
    from gritvlp.train.trainer import train

    configure_logging()

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    try:
        cfg = load_config(args.config, overrides)
    except (ConfigError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    try:
        train(cfg, args.deepspeed_config, resume=args.resume, overwrite=args.overwrite)
    except FileExistsError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
