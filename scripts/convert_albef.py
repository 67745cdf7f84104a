#!/usr/bin/env python
"""Convert weights between ALBEF's checkpoint layout (also GRIT-VLP's) and gritvlp.

    # ALBEF / GRIT-VLP .pth -> gritvlp export folder (evaluate or fine-tune it like any export)
    python scripts/convert_albef.py to-gritvlp ALBEF_4M.pth runs/albef_4m_export
    # a retrieval fine-tuned checkpoint (384 px) has no MLM head: that head keeps its initial values
    python scripts/convert_albef.py to-gritvlp mscoco.pth runs/albef_coco --set model.image_size=384 \
        --allow-missing mlm_head.

    # gritvlp export folder or DeepSpeed checkpoint -> .pth that ALBEF's Retrieval/VQA/Grounding scripts load
    python scripts/convert_albef.py to-albef runs/grit_4m/export_fp16 grit_4m_albef.pth

The model of to-gritvlp is built from a preset (default vitb16_bert, 256 px) with section.key=value overrides;
position embeddings are resampled to its image size (keep a 384 px checkpoint's with --set model.image_size=384).
Its captions are tokenised as ALBEF's code does, without a trailing [SEP] (model.text_format=cls_only, written to
config.json). to-albef warns when the model was trained with [SEP] (cls_sep): ALBEF's code will feed it none.
"""

import argparse
import logging
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to_ours = commands.add_parser("to-gritvlp", help="ALBEF / GRIT-VLP .pth -> gritvlp export folder")
    to_ours.add_argument("checkpoint", help="ALBEF or GRIT-VLP .pth (state dict, or under 'model')")
    to_ours.add_argument("out_dir")
    to_ours.add_argument("--config", default="vitb16_bert", help="gritvlp preset or YAML the weights fit")
    to_ours.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    to_ours.add_argument("--allow-missing", nargs="*", default=[], metavar="PREFIX", help="model tensors the checkpoint may lack")  # fmt: skip
    to_albef = commands.add_parser("to-albef", help="gritvlp export / checkpoint -> ALBEF .pth")
    to_albef.add_argument("model", help="export folder, or DeepSpeed checkpoints / tag folder")
    to_albef.add_argument("out_file")
    to_albef.add_argument("--layout", choices=("pretrain", "retrieval"), default="pretrain", help="ALBEF model to match")  # fmt: skip
    to_albef.add_argument("--queue-size", type=int, default=65536)
    return parser.parse_args(argv)


def to_gritvlp(args) -> None:
    from gritvlp import albef
    from gritvlp.config import load_config
    from gritvlp.model.gritvlp import GritVLP

    state = albef.load_albef_file(args.checkpoint)
    config = load_config(args.config, [f"model.text_format={albef.TEXT_FORMAT}", *args.set])
    model = GritVLP(config.model)
    albef.load_albef_weights(model, state, tuple(args.allow_missing))
    albef.write_export_folder(model, args.out_dir)
    logging.getLogger("gritvlp").info("wrote %s", args.out_dir)


def to_albef(args) -> None:
    from gritvlp import albef
    from gritvlp.eval.loading import load_model

    albef.save_albef_checkpoint(load_model(args.model), args.out_file, args.layout, args.queue_size)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        (to_gritvlp if args.command == "to-gritvlp" else to_albef)(args)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
