"""Times GRIT grouping as training runs it (gritvlp.sampling.schedule.GritSchedule: a full bank grouped into the next
epoch's order) against a straightforward per-step loop, in the same run.

The loop is the way the GRIT-VLP reference code groups a search space: softmax similarity matrices with the diagonal
zeroed, then per step a top-1 over the current row, the chosen index read back to the host, the visited row and
column zeroed in both matrices, python list bookkeeping. Example:

    python scripts/bench_grouping.py --reference-spaces 4            # CPU: reference on 4 spaces, extrapolated
    python scripts/bench_grouping.py --device cuda --large           # GPU: L=48000 and L=192000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gritvlp.sampling.schedule import GritSchedule


def reference_grouping(img: torch.Tensor, txt: torch.Tensor, temp: float = 0.07) -> list[int]:
    """One search space, the per-step loop with a host sync every step (the baseline, not used in training)."""
    i2t = torch.softmax(img @ txt.T / temp, dim=1).fill_diagonal_(0)
    t2i = torch.softmax(txt @ img.T / temp, dim=1).fill_diagonal_(0)
    cur = int(torch.randint(0, img.shape[0], (1,)))
    order = [cur]
    for step in range(1, img.shape[0]):
        row = (i2t if step % 2 else t2i)[cur].clone()
        for sim in (i2t, t2i):  # remove the current sample
            sim[cur, :] = 0
            sim[:, cur] = 0
        row[cur] = 0
        cur = torch.topk(row, 1).indices[0].item()  # host sync
        order.append(cur)
    return order


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def features(n: int, dim: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    img = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    txt = F.normalize(img + torch.randn(n, dim, generator=g), dim=-1)
    return img.to(device, dtype), txt.to(device, dtype)


def time_ours(img, txt, args, repeats: int) -> float:
    """Seconds for the training path: a GritSchedule whose bank holds all n samples builds the next epoch's order
    (the flush groups the bank, then the order is arranged). Best of `repeats` after a warm-up."""
    n, device = img.shape[0], img.device
    idx = torch.arange(n, device=device)
    times = []
    for r in range(repeats + 1):  # the first run warms up
        schedule = GritSchedule(n, args.batch_size, 1, bank_size=n, search_space=args.search_space, seed=r)
        schedule.bank.add(img, txt, idx)
        sync(device)
        t0 = time.perf_counter()
        order = torch.cat(schedule.next_epoch_batches(1, torch.arange(n)))
        sync(device)
        times.append(time.perf_counter() - t0)
    assert order.numel() == n
    return min(times[1:])


def time_reference(img, txt, args, spaces: int) -> float:
    m, device = args.search_space, img.device
    # untimed warm-up on a small space (kernel selection, allocator)
    reference_grouping(img[: args.batch_size].float(), txt[: args.batch_size].float())
    sync(device)
    t0 = time.perf_counter()
    for s in range(spaces):
        order = reference_grouping(img[s * m : (s + 1) * m].float(), txt[s * m : (s + 1) * m].float())
    sync(device)
    assert sorted(order) == list(range(m))
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bank", type=int, default=48000, help="L: samples grouped (one rank's bank)")
    p.add_argument("--large", action="store_true", help="also time L=192000")
    p.add_argument("--search-space", type=int, default=1920, help="M")
    p.add_argument("--dim", type=int, default=256, help="D")
    p.add_argument("--batch-size", type=int, default=128, help="B per GPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="bank storage")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--reference-spaces",
        type=int,
        default=None,
        help="time the reference on K search spaces and extrapolate linearly to L/M (default: all)",
    )
    p.add_argument("--dataset-size", type=float, default=4e6, help="samples per epoch at paper scale")
    p.add_argument("--gpus", type=int, default=4, help="GPUs at paper scale")
    p.add_argument("--step-time", type=float, default=0.5, help="assumed seconds per training step at paper scale")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/grouping_<device>.json)")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}, torch {torch.__version__}, M={args.search_space}, D={args.dim}, B={args.batch_size}")

    n_epoch = args.dataset_size
    steps = n_epoch / (args.batch_size * args.gpus)
    epoch_s = steps * args.step_time
    print(
        f"paper scale (assumed): N={n_epoch:.0f} samples/epoch, {args.gpus} GPUs x B={args.batch_size}, "
        f"step {args.step_time} s -> epoch = N / (GPUs * B) * step = {steps:.0f} * {args.step_time} = {epoch_s:.0f} s"
    )

    results = []
    for bank in [args.bank] + ([192000] if args.large else []):
        img, txt = features(bank, args.dim, device, dtype)
        ours = time_ours(img, txt, args, args.repeats)
        spaces = bank // args.search_space
        k = min(spaces, args.reference_spaces or spaces)
        ref_k = time_reference(img, txt, args, k)
        ref = ref_k * spaces / k
        # per rank: ours groups its own bank of L samples, L at a time, as the reference loop does its N / GPUs
        ours_epoch = ours * n_epoch / args.gpus / bank
        ref_epoch = ref * n_epoch / args.gpus / bank
        row = {
            "bank": bank,
            "search_spaces": spaces,
            "ours_s": ours,
            "reference_s": ref,
            "reference_spaces_timed": k,
            "reference_extrapolated": k < spaces,
            "speedup": ref / ours,
            "ours_epoch_s": ours_epoch,
            "ours_epoch_share": ours_epoch / (epoch_s + ours_epoch),
            "reference_epoch_s": ref_epoch,
            "reference_epoch_share": ref_epoch / (epoch_s + ref_epoch),
        }
        results.append(row)
        note = f" (timed on {k} of {spaces} spaces, extrapolated linearly)" if k < spaces else ""
        print(f"L={bank}: ours {ours:.3f} s, reference {ref:.3f} s{note}, speedup {ref / ours:.1f}x")
        print(
            f"  per-epoch grouping t = t(L) * N / (GPUs * L), share = t / (epoch + t): ours {ours_epoch:.1f} s = "
            f"{100 * row['ours_epoch_share']:.3f}%, reference {ref_epoch:.1f} s = "
            f"{100 * row['reference_epoch_share']:.3f}%"
        )

    out = Path(args.out or f"benchmarks/grouping_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": " ".join(["python", *sys.argv]),
        "device": name,
        "load_average_1m_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "search_space": args.search_space,
        "dim": args.dim,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "assumptions": {
            "dataset_size": n_epoch,
            "gpus": args.gpus,
            "step_time_s": args.step_time,
            "epoch_s": epoch_s,
            "formula": "t = t(L) * N / (GPUs * L); share = t / (N / (GPUs * B) * step + t)",
        },
        "results": results,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
