"""Write shards of photograph-like JPEGs (gritvlp.data.photos) in img2dataset's layout, one process per shard, for
throughput runs of the real trainer on data shaped like web images (no download needed).

    python scripts/make_photo_shards.py /data/photos --samples 16384 --size 640x480     # 16 shards of 1024
    deepspeed scripts/pretrain.py --config vitb16_bert ... data.train_shards='/data/photos/photos-{000000..000015}.tar'

Prints the shards' brace pattern as its last line.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from gritvlp.data.photos import write_shard


def size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--samples", type=int, default=16384)
    parser.add_argument("--per-shard", type=int, default=1024)
    parser.add_argument("--size", type=size, default=(640, 480), help="WIDTHxHEIGHT (default 640x480)")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.samples < 1 or args.per_shard < 1:
        parser.error("--samples and --per-shard must be positive")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    starts = range(0, args.samples, args.per_shard)
    jobs = [
        (args.out_dir / f"photos-{i:06d}.tar", *args.size, min(args.per_shard, args.samples - start), args.seed + i, start)
        for i, start in enumerate(starts)
    ]
    with ProcessPoolExecutor(max_workers=max(1, min(args.workers, len(jobs)))) as pool:
        futures = [pool.submit(write_shard, *job) for job in jobs]
        kb = [f.result() for f in tqdm(futures, desc="shards", unit="shard")]
    pattern = str(args.out_dir / f"photos-{{000000..{len(jobs) - 1:06d}}}.tar")
    print(f"{args.samples} samples, mean JPEG {sum(kb) / len(kb):.1f} KB, in {len(jobs)} shards")
    print(pattern)
    return pattern


if __name__ == "__main__":
    main()
