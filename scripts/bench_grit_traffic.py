"""Bytes that GRIT sampling moves between ranks: measured on a few CPU processes (gloo), computed beyond.

    python scripts/bench_grit_traffic.py            # writes benchmarks/grit_traffic.json

Measured: W processes run one epoch of the real GritSchedule on synthetic features (banks flushed every L / B
steps, the next epoch dealt out at its end); every tensor passed to a collective is counted, input and output
buffers both (so a sample's index sent and received counts twice). Computed, for W = 8,
64 and 512 at paper scale (L = 48000 samples per bank, D = 256, B = 128, fp16 features):
  before (features gathered at every flush): each rank receives the other ranks' banks, L (W - 1) (2 D 2 + 8)
    bytes, and the grouped walks of every search space, L W 8 bytes;
  now (indices only, once per epoch): each rank sends its samples to the ranks that train on them, 8 (1 + 1 / B)
    bytes each (a slot number per batch), plus the counts and the epoch's tail (under W B samples, gathered by
    every rank); per L samples of a rank that is L 8 (1 + 1 / B) bytes, whatever W.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from gritvlp.sampling.order import EpochBatchSampler
from gritvlp.sampling.schedule import GritSchedule

ROOT = Path(__file__).resolve().parents[1]


def _count(fn, counter: list):
    def counted(*args, **kwargs):
        tensors = [t for t in args if torch.is_tensor(t)] + [t for a in args if isinstance(a, list) for t in a]
        counter.append(sum(t.numel() * t.element_size() for t in tensors))
        return fn(*args, **kwargs)

    return counted


def _worker(rank, world, init, out, n, bank, batch, dim):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    sent: list[int] = []
    for name in ("all_gather", "all_to_all_single"):
        setattr(dist, name, _count(getattr(dist, name), sent))
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(n, dim, generator=g), dim=-1).half()
    text = F.normalize(image.float() + torch.randn(n, dim, generator=g), dim=-1).half()
    sampler = EpochBatchSampler(n, batch, rank=rank, world_size=world)
    schedule = GritSchedule(n, batch, world, bank, bank, rank=rank)
    sampler.set_epoch(0)
    at_flushes = 0
    for batch_indices in sampler:
        sampler.advance()
        idx = torch.tensor(batch_indices, dtype=torch.long)
        schedule.add(image[idx], text[idx], idx)
        schedule.tick(0)
    at_flushes = sum(sent)
    schedule.next_epoch_batches(1, sampler.own_samples())
    own = sampler.own_samples().numel()
    torch.save({"flush_bytes": at_flushes, "epoch_end_bytes": sum(sent) - at_flushes, "own_samples": own},
               Path(out) / f"rank{rank}.pt")  # fmt: skip
    dist.destroy_process_group()


def measure(world: int, n: int, bank: int, batch: int, dim: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, f"{tmp}/init", tmp, n, bank, batch, dim), nprocs=world)
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]
    per_sample = [r["epoch_end_bytes"] / r["own_samples"] for r in ranks]
    return {
        "world": world, "samples": n, "bank": bank, "batch": batch,
        "bytes_at_flushes_per_rank": max(r["flush_bytes"] for r in ranks),
        "bytes_at_epoch_end_per_sample": max(per_sample),
    }  # fmt: skip


def computed(world: int, bank: int = 48000, dim: int = 256, batch: int = 128) -> dict:
    before = bank * (world - 1) * (2 * dim * 2 + 8) + bank * world * 8
    now = bank * 8 * (1 + 1 / batch)
    return {"world": world, "bank": bank, "dim": dim, "batch": batch,
            "before_bytes_per_rank_per_flush": before, "now_bytes_per_rank_per_bank": now, "ratio": before / now}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--bank", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--worlds", default="2,4", help="process counts measured on this machine")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "grit_traffic.json")
    args = p.parse_args(argv)
    measured = [measure(int(w), args.samples, args.bank, args.batch, 256) for w in args.worlds.split(",")]
    paper = [computed(w) for w in (8, 64, 512)]
    for m in measured:
        print(f"measured W={m['world']}: {m['bytes_at_flushes_per_rank']} B at flushes, "
              f"{m['bytes_at_epoch_end_per_sample']:.2f} B per sample at the epoch's end")  # fmt: skip
    for c in paper:
        print(f"W={c['world']:4d}: before {c['before_bytes_per_rank_per_flush'] / 2**30:8.2f} GiB per rank per flush, "
              f"now {c['now_bytes_per_rank_per_bank'] / 2**20:.2f} MiB per rank per L samples ({c['ratio']:,.0f}x less)")  # fmt: skip
    args.out.write_text(json.dumps({"measured": measured, "computed": paper}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
