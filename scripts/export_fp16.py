#!/usr/bin/env python
"""Export a gritvlp DeepSpeed checkpoint (ZeRO stage 0-3) as fp16 safetensors for fine-tuning.

    python scripts/export_fp16.py runs/demo/checkpoints runs/demo/export
    python scripts/export_fp16.py runs/demo/checkpoints/global_step300 runs/demo/export_step300

The output folder (config.json, model.safetensors, tokenizer files) loads with
gritvlp.model.gritvlp.GritVLP.from_pretrained(folder).
"""

import argparse
import logging
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoints folder (uses 'latest') or one tag folder")
    parser.add_argument("out_dir", help="folder to write config.json, model.safetensors and the tokenizer to")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from gritvlp.export import export_fp16

    try:
        export_fp16(args.checkpoint, args.out_dir)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
