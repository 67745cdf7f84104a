"""Builds the binary sample index of a shard list, in parallel, resumably.

    python scripts/index_shards.py '/data/cc3m/{00000..00331}.tar' '/data/coco/*.tar' --workers 16
    python scripts/index_shards.py 's3://bucket/laion/{00000..41455}.tar' --out /shared/index/laion --workers 64

Each shard's part is published (temp file + rename) as soon as it is indexed, so a killed run resumes where it
stopped; a shard whose size or mtime (remote: version tag) changed is indexed again, and so is every shard of an
index written in an older format (logged; format 3 added the KEY.json spans that concept distillation reads); a
current per-shard `<shard>.idx.json` of an earlier release is converted instead of rescanning its tar. The parts
are then merged into one index of the whole list, which ShardDataset maps (pass the same --out as its index_dir,
the config key data.index_dir in training; the default location is the one ShardDataset looks in). --out is
created when missing.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from gritvlp.data.index import build_index, default_roots, set_digest
from gritvlp.data.shards import expand_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="+", help="shard patterns (brace, glob, folder; '::'-separated lists too)")
    parser.add_argument("--out", default=None, help="index folder (default: .gritvlp-index beside the shards)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes indexing shards")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shards = expand_shards("::".join(args.shards))
    root = args.out or default_roots(shards)[0]
    start = time.perf_counter()
    index = build_index(shards, root, workers=args.workers)
    seconds = time.perf_counter() - start
    truncated = [(s, n) for s, n in zip(shards, index.truncated) if n]
    for shard, lost in truncated:
        print(f"{shard}: truncated or corrupt, {lost} incomplete sample(s) dropped", file=sys.stderr)
    print(f"{len(index)} samples in {len(shards)} shards ({len(truncated)} damaged), indexed in {seconds:.1f} s")
    print(f"index: {os.path.join(root, set_digest(shards) + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
