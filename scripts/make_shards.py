"""Write tar shards (img2dataset layout) from an ALBEF/COCO-style annotation JSON, or write the demo set.

python scripts/make_shards.py ANNOTATION_JSON IMAGE_ROOT OUT_DIR [--prefix NAME] [--samples_per_shard N]
python scripts/make_shards.py --demo OUT_DIR [--num_train N] [--num_test N] [--seed S] [--image_size S]
"""

import argparse
import os

from gritvlp.data.demo import make_demo_shards
from gritvlp.data.writer import write_shards_from_json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="ANNOTATION_JSON IMAGE_ROOT OUT_DIR, or OUT_DIR with --demo")
    parser.add_argument("--prefix", default="shard", help="shard names: OUT_DIR/PREFIX-000000.tar ...")
    parser.add_argument("--samples_per_shard", type=int, default=None, help="default 10000 (demo: 1024)")
    parser.add_argument("--demo", action="store_true", help="write the synthetic demo set instead")
    parser.add_argument("--num_train", type=int, default=4096)
    parser.add_argument("--num_test", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=96)
    args = parser.parse_args(argv)

    if args.demo:
        if len(args.paths) != 1:
            parser.error("--demo takes exactly one path: OUT_DIR")
        train, test = make_demo_shards(
            args.paths[0], args.num_train, args.num_test, args.seed, args.image_size, args.samples_per_shard or 1024
        )
        print(f"train: {train}\ntest: {test}")
        return
    if len(args.paths) != 3:
        parser.error("expected ANNOTATION_JSON IMAGE_ROOT OUT_DIR")
    annotation, image_root, out_dir = args.paths
    pattern = os.path.join(out_dir, f"{args.prefix}-%06d.tar")
    stats = write_shards_from_json(annotation, image_root, pattern, args.samples_per_shard or 10000)
    last = max(stats["shards"] - 1, 0)
    print(f"{stats['samples']} samples, {stats['skipped']} skipped: {out_dir}/{args.prefix}-{{000000..{last:06d}}}.tar")


if __name__ == "__main__":
    main()
