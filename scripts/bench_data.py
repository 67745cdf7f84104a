"""Times the data path on one CPU core: loader samples/s per DataLoader worker, and opening the sample index.

Loader: photographic-like JPEGs (1/f luminance and colour fields, soft-edged objects, sensor grain; quality 90) at
640x480 and 1024x768 go into temporary shards, read through ShardDataset with the vitb16_bert training transform
(256 px, ALBEF augmentation), one process, one thread. In the same run it times the previous data path: eager
`convert("RGB")`, torchvision RandomResizedCrop + RandAugment (ALBEF's ops on torchvision's scale) + ToTensor +
Normalize. Rounds of the paths alternate, and each path's best round counts, so that other load on the machine
biases neither.

Index: start-up time and resident memory (RSS) of a fresh process opening a synthetic binary index of 4M and 400M
samples (the columns of a real index, written directly), against the per-shard JSON indexes of the previous release
read as it read them, measured at --json-samples and extrapolated linearly.

Device decode (data.image_decode=device; --part device-decode, not part of "all"): on the same generated shards,
(a) what one worker produces per second of CPU time when it only reads the bytes and the header and draws the
parameters (the host half), beside the CPU path's full transform; (b) the device half (decode, crop, resize, flip,
RandomAugment, normalise a batch) in samples/s on CUDA when present, else on this CPU (a CPU figure, not a GPU's);
(c) the CPU cores per GPU that (a) needs for 4,000 samples/s. Written under "device_decode" with its own machine.

    python scripts/bench_data.py                          # both; JSON to benchmarks/data_cpu.json
    python scripts/bench_data.py --part index --index-sizes 4e6
    python scripts/bench_data.py --part device-decode     # about a minute on a CPU
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import timeit
from pathlib import Path

import numpy as np

from gritvlp.data.photos import write_shard

TARGET_SAMPLES_PER_S = 2000  # per GPU
DEVICE_TARGET_SAMPLES_PER_S = 4000  # per GPU, what a GPU step consumes at the top of its range
SAMPLES_PER_SHARD = 10_000


# ---------------------------------------------------------------- the loader, before and after


def previous_transform(image_size: int):
    """The training transform of the previous release: torchvision's RandAugment restricted to ALBEF's ops."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    from gritvlp.data.transforms import ALBEF_OPS, CLIP_MEAN, CLIP_STD

    class TorchvisionAlbefOps(T.RandAugment):
        def _augmentation_space(self, num_bins, size):
            space = super()._augmentation_space(num_bins, size)
            return {name: space[name] for name in ALBEF_OPS}

    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            TorchvisionAlbefOps(num_ops=2, magnitude=7, num_magnitude_bins=11),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def datasets(shard: str, index_dir: str, image_size: int) -> dict:
    from PIL import Image
    from torchvision import transforms as T

    from gritvlp.data.shards import ShardDataset
    from gritvlp.data.transforms import train_transform

    class PreviousDecode(ShardDataset):
        """Decoded eagerly, always through convert("RGB") (a copy even for RGB), as the previous release did."""

        def _open_image(self, data):
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")

    new = train_transform(image_size)
    return {
        "previous": PreviousDecode(shard, previous_transform(image_size), index_dir=index_dir),
        "new": ShardDataset(shard, new, index_dir=index_dir),
        # what the trainer's loader returns: uint8 pixels, normalised on the device after the copy
        "new_uint8": ShardDataset(shard, train_transform(image_size, normalize=False), index_dir=index_dir),
        # the same transform as a plain Compose: the dataset decodes at full size before the crop is drawn
        "new_full_decode": ShardDataset(shard, T.Compose(new.transforms), index_dir=index_dir),
    }


def time_round(dataset, count: int) -> tuple[float, float]:
    """Samples per second of CPU time of this (single-threaded) process, and per second of wall time."""
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(count):
        assert dataset[i % len(dataset)] is not None
    return count / (time.process_time() - cpu), count / (time.perf_counter() - wall)


def time_full_decode(shard: Path, count: int) -> float:
    """CPU milliseconds to decode one image at full size (PIL, libjpeg-turbo): the floor of any path that needs
    all of its pixels."""
    from PIL import Image

    with tarfile.open(shard) as tar:
        images = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")][:count]
    best = math.inf
    for _ in range(3):
        start = time.process_time()
        for data in images:
            Image.open(io.BytesIO(data)).load()
        best = min(best, time.process_time() - start)
    return best / len(images) * 1e3


def bench_loader(args, scratch: Path) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    results = []
    for width, height in args.sizes:
        shard = scratch / f"photos-{width}x{height}.tar"
        kb = write_shard(shard, width, height, args.samples, seed=width)
        paths = datasets(str(shard), str(scratch / "index"), args.image_size)
        for dataset in paths.values():  # warm-up: page cache, imports, allocator
            time_round(dataset, min(16, args.samples))
        decode_ms = time_full_decode(shard, args.samples)
        rounds = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, dataset in paths.items():
                rounds[name].append(time_round(dataset, args.samples))
        cpu = {name: max(r[0] for r in runs) for name, runs in rounds.items()}
        wall = {name: max(r[1] for r in runs) for name, runs in rounds.items()}
        results.append(
            {
                "image": f"{width}x{height}",
                "jpeg_kb": round(kb, 1),
                "samples_per_cpu_s": {name: round(v, 1) for name, v in cpu.items()},
                "samples_per_wall_s": {name: round(v, 1) for name, v in wall.items()},
                "speedup": round(cpu["new"] / cpu["previous"], 3),
                "uint8_over_float": round(cpu["new_uint8"] / cpu["new"], 3),
                # per sample through collation, pinned memory and the host-to-device copy
                "bytes_per_sample": {"float": 3 * args.image_size**2 * 4, "uint8": 3 * args.image_size**2},
                "full_decode_cpu_ms": round(decode_ms, 3),
                "full_decode_share_of_new": round(decode_ms / 1e3 * cpu["new"], 3),
                "workers_per_gpu_for_2000": {
                    name: math.ceil(TARGET_SAMPLES_PER_S / v) for name, v in cpu.items() if name != "new_full_decode"
                },
            }
        )
        print(json.dumps(results[-1]), flush=True)
    return results


# ---------------------------------------------------------------- decoding on the device (data.image_decode=device)


def time_decode(batch, device, reps: int) -> float:
    """Samples per second of the device half on one batch (the best of `reps`, after a warm-up)."""
    import torch

    from gritvlp.data.device_images import decode_batch

    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    decode_batch(batch, device)
    best = math.inf
    for _ in range(reps):
        synchronize()
        start = time.perf_counter()
        decode_batch(batch, device)
        synchronize()
        best = min(best, time.perf_counter() - start)
    return len(batch) / best


def agreement(train, batch, device) -> dict:
    """The device half's output against the CPU path's for the same draws, in pixel levels (0-255). The CPU path
    decodes large crops at a reduced DCT scale; nvJPEG's IDCT differs from libjpeg's: both show here."""
    import torch
    from PIL import Image

    from gritvlp.data.device_images import decode_batch
    from gritvlp.data.transforms import CLIP_STD

    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    jpegs = batch.jpegs()
    cpu = [train.apply(Image.open(io.BytesIO(jpegs[r].numpy().tobytes())), batch.draw(r)) for r in range(len(batch))]
    diff = (decode_batch(batch, device).float().cpu() - torch.stack(cpu)).mul(std).abs().mul(255)
    return {"mean_abs_levels": round(diff.mean().item(), 4), "p99_abs_levels": round(diff.quantile(0.99).item(), 3)}


def bench_device_decode(args, scratch: Path) -> dict:
    import torch

    from gritvlp.data.encoded_images import EncodedBatch, HostDrawTransform
    from gritvlp.data.shards import ShardDataset
    from gritvlp.data.transforms import train_transform

    torch.set_num_threads(1)  # one worker, one core; the device half on a CPU too (more threads contend here)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batch_size = args.decode_batch or (256 if cuda else 32)
    results = []
    for width, height in args.sizes:
        shard = scratch / f"photos-{width}x{height}.tar"
        kb = write_shard(shard, width, height, args.samples, seed=width)
        train = train_transform(args.image_size)
        host = ShardDataset(str(shard), HostDrawTransform(train), index_dir=str(scratch / "index"))
        cpu_path = ShardDataset(str(shard), train, index_dir=str(scratch / "index"))
        for dataset in (host, cpu_path):
            time_round(dataset, min(16, args.samples))
        rounds = {"host": [], "cpu_path": []}
        for _ in range(args.rounds):  # the host half is fast: each image is read several times per round
            rounds["host"].append(time_round(host, 8 * args.samples)[0])
            rounds["cpu_path"].append(time_round(cpu_path, args.samples)[0])
        samples = [host[i % args.samples] for i in range(batch_size)]
        images, indices = [s["image"] for s in samples], [s["index"] for s in samples]
        collate = functools.partial(EncodedBatch.collate, images, indices)
        collate_s = min(timeit.repeat(collate, number=1, repeat=args.rounds))
        batch = collate()
        batch = batch.pin_memory() if cuda else batch
        device_rate = time_decode(batch, device, args.rounds)
        check = agreement(train, batch, device)
        # the host half per sample: the worker's read, header and draws, and its share of the batch's collation
        host_rate = 1 / (1 / max(rounds["host"]) + collate_s / batch_size)
        cpu_rate = max(rounds["cpu_path"])
        results.append(
            {
                "image": f"{width}x{height}",
                "jpeg_kb": round(kb, 1),
                "host_samples_per_cpu_s": round(host_rate, 1),
                "cpu_path_samples_per_cpu_s": round(cpu_rate, 1),
                "device_samples_per_s": round(device_rate, 1),
                "device_batch": batch_size,
                "cpu_cores_per_gpu_for_4000": {
                    "device_decode": math.ceil(DEVICE_TARGET_SAMPLES_PER_S / host_rate),
                    "cpu_path": math.ceil(DEVICE_TARGET_SAMPLES_PER_S / cpu_rate),
                },
                "vs_cpu_path": check,
            }
        )
        print(json.dumps(results[-1]), flush=True)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    return {
        "device": name,
        "device_threads": None if cuda else 1,
        "note": None if cuda else "device_samples_per_s ran on this CPU: it is not the GPU's figure",
        "results": results,
    }


# ---------------------------------------------------------------- opening the index, binary vs JSON


def memory() -> dict[str, int]:
    """Resident bytes of this process: all, anonymous (its own heap: per process) and file-backed (mapped files:
    page cache, one copy per node however many processes map it)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {
        name: int(fields[key].split()[0]) * 1024
        for name, key in (("rss", "VmRSS"), ("anon", "RssAnon"), ("file", "RssFile"))
    }


def _delta(after: dict, before: dict) -> dict:
    return {f"{k}_delta_bytes": after[k] - before[k] for k in after}


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def release_freed_memory() -> None:
    """Return freed heap pages to the OS, so that RSS counts what is kept, not what was once allocated."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def write_synthetic_index(root: Path, samples: int) -> list[str]:
    """The columns and meta of a binary index over samples / 10k fake shards, written in chunks."""
    from gritvlp.data import index as index_mod

    shards = [f"/data/fake/{i:06d}.tar" for i in range(math.ceil(samples / SAMPLES_PER_SHARD))]
    counts = [SAMPLES_PER_SHARD] * (len(shards) - 1) + [samples - SAMPLES_PER_SHARD * (len(shards) - 1)]
    folder = root / f"{index_mod.set_digest(shards)}.synthetic"
    folder.mkdir(parents=True)
    dtypes = {**index_mod.COLUMNS, **{name: np.int64 for name in index_mod.HASH_IDS.values()}}
    arrays = {n: np.lib.format.open_memmap(folder / f"{n}.npy", "w+", d, (samples,)) for n, d in dtypes.items()}
    chunk = 1 << 24
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        rows = np.arange(start, start + n, dtype=np.int64) % SAMPLES_PER_SHARD
        arrays["image_block"][start : start + n] = rows * 200 + 1
        arrays["image_size"][start : start + n] = 90_000
        arrays["text_block"][start : start + n] = rows * 200 + 180
        arrays["text_size"][start : start + n] = 60
        arrays["group_id"][start : start + n] = np.arange(start, start + n) // 2
        arrays["caption_id"][start : start + n] = np.arange(start, start + n) // 3
    for array in arrays.values():
        array.flush()
    np.save(folder / "shard_start.npy", np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]))
    meta = {
        "version": index_mod.INDEX_VERSION,
        "columns": folder.name,
        "shards": shards,
        "stamps": [{"size": 10**9, "mtime_ns": 0}] * len(shards),
        "samples": counts,
        "truncated": [0] * len(shards),
    }
    (root / f"{index_mod.set_digest(shards)}.json").write_text(json.dumps(meta))
    return shards


def open_binary(root: str, shards_file: str) -> dict:
    """In a fresh process: what ShardDataset does with a binary index (map the columns, wrap the group ids)."""
    import torch

    from gritvlp.data.index import open_index

    torch.set_num_threads(1)  # as in a DataLoader worker; a thread pool would add its own memory
    shards = json.loads(Path(shards_file).read_text())
    release_freed_memory()
    before, start = memory(), time.perf_counter()
    index = open_index(root, shards, verify=False)  # the shards are fake: nothing to stat
    group_ids = torch.from_numpy(index.group_id)
    seconds = time.perf_counter() - start
    opened = _delta(memory(), before)
    group_ids.max()  # what a sampler reading every group id maps in
    scanned = _delta(memory(), before)
    probe = np.random.default_rng(0).integers(0, len(index), 1000)
    assert all(index.sample(int(i))[1][1] == 90_000 for i in probe) and group_ids.dtype == torch.long
    return {"samples": len(index), "open_s": seconds, "after_open": opened, "after_reading_all_group_ids": scanned}


def write_json_indexes(folder: Path, samples: int) -> list[Path]:
    """Per-shard JSON indexes in the previous release's format (key, {ext: [offset, size]}, group key)."""
    folder.mkdir(parents=True)
    paths = []
    for shard, start in enumerate(range(0, samples, SAMPLES_PER_SHARD)):
        rows = []
        for i in range(start, min(samples, start + SAMPLES_PER_SHARD)):
            offset = (i - start) * 102_400
            members = {"jpg": [offset + 512, 90_000], "txt": [offset + 92_160, 60], "json": [offset + 93_184, 400]}
            rows.append([f"{i:09d}", members, f"sha1:{i // 2:040x}"])
        path = folder / f"{shard:06d}.tar.idx.json"
        path.write_text(json.dumps({"version": 1, "size": 10**9, "mtime_ns": 0, "truncated": 0, "samples": rows}))
        paths.append(path)
    return paths


def open_json(folder: str) -> dict:
    """In a fresh process: the previous release's ShardDataset start-up over its per-shard JSON indexes (every
    rank parsed every shard's index and kept keys, spans and group ids in Python and numpy)."""
    import torch

    torch.set_num_threads(1)
    paths = sorted(Path(folder).glob("*.idx.json"))
    release_freed_memory()
    before, start = memory(), time.perf_counter()
    keys, shard_of, spans, groups = [], [], [], []
    for shard_id, path in enumerate(paths):
        index = json.loads(path.read_text())
        for key, members, group in index["samples"]:
            keys.append(key)
            shard_of.append(shard_id)
            spans.append((*members["jpg"], *members["txt"]))
            groups.append(group)
    shard_of = np.asarray(shard_of, dtype=np.int32)
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 4)
    dense: dict[str, int] = {}
    group_ids = torch.tensor([dense.setdefault(g, len(dense)) for g in groups], dtype=torch.long)
    del groups, dense  # the previous dataset kept only keys, shard_of, spans and group_ids
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes() - before["rss"]
    release_freed_memory()
    assert len(keys) == len(shard_of) == len(spans) == len(group_ids)
    return {"samples": len(keys), "open_s": seconds, "after_open": _delta(memory(), before), "peak_delta_bytes": peak}


def in_fresh_process(function: str, *args: str) -> dict:
    code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_data; "
    code += f"print(json.dumps(bench_data.{function}(*sys.argv[1:])))"
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_index(args, scratch: Path) -> dict:
    per_sample_disk = sum(np.dtype(d).itemsize for d in (np.uint32,) * 4 + (np.int64,))
    results = {"binary": [], "json": None, "bytes_per_sample_on_disk": per_sample_disk}
    for samples in args.index_sizes:
        root = scratch / f"binary-{samples}"
        free = shutil.disk_usage(scratch).free
        if samples * per_sample_disk > 0.8 * free:
            print(f"skipping {samples:.0f} samples: {samples * per_sample_disk / 1e9:.1f} GB exceeds the free disk")
            continue
        start = time.perf_counter()
        shards = write_synthetic_index(root, samples)
        written = time.perf_counter() - start
        shards_file = root / "shards.json"
        shards_file.write_text(json.dumps(shards))
        runs = [in_fresh_process("open_binary", str(root), str(shards_file)) for _ in range(3)]
        best = min(runs, key=lambda r: r["open_s"])
        results["binary"].append(
            {**best, "shards": len(shards), "write_s": written, "open_s_all": [r["open_s"] for r in runs]}
        )
        print(json.dumps(results["binary"][-1]), flush=True)
        shutil.rmtree(root)
    folder = scratch / "json"
    write_json_indexes(folder, args.json_samples)
    measured = in_fresh_process("open_json", str(folder))
    shutil.rmtree(folder)
    kept = {**measured["after_open"], "peak_delta_bytes": measured["peak_delta_bytes"], "open_s": measured["open_s"]}
    per_sample = {k: v / measured["samples"] for k, v in kept.items()}
    results["json"] = {
        "measured": measured,
        "per_sample": per_sample,
        "extrapolated_linearly": {f"{n:.0f}": {k: v * n for k, v in per_sample.items()} for n in args.index_sizes},
    }
    print(json.dumps(results["json"]), flush=True)
    return results


# ---------------------------------------------------------------- main


def machine() -> dict:
    import PIL
    import torch

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "load_average_1m_at_end": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("loader", "index", "all", "device-decode"), default="all")
    parser.add_argument("--samples", type=int, default=None, help="images per size (default 200; device-decode 32)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument(
        "--sizes",
        type=lambda s: [tuple(map(int, wh.split("x"))) for wh in s.split(",")],
        default=[(640, 480), (1024, 768)],
    )
    parser.add_argument(
        "--index-sizes", type=lambda s: [int(float(v)) for v in s.split(",")], default=[4_000_000, 400_000_000]
    )
    parser.add_argument("--json-samples", type=int, default=4_000_000)
    parser.add_argument("--decode-batch", type=int, default=None, help="device-decode batch (256 on CUDA, else 32)")
    parser.add_argument("--scratch", default=None, help="folder for the shards and indexes (default: a temp folder)")
    parser.add_argument("--out", default="benchmarks/data_cpu.json")
    args = parser.parse_args()
    args.samples = args.samples or (32 if args.part == "device-decode" else 200)
    scratch = Path(tempfile.mkdtemp(prefix="gritvlp-bench-data-", dir=args.scratch))
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    try:
        if args.part in ("loader", "all"):
            result["loader"] = {
                "command": " ".join(sys.argv),
                "image_size": args.image_size,
                "results": bench_loader(args, scratch),
            }
        if args.part in ("index", "all"):
            result["index"] = {"command": " ".join(sys.argv), **bench_index(args, scratch)}
        if args.part == "device-decode":
            decode = bench_device_decode(args, scratch)
            result["device_decode"] = {"command": " ".join(sys.argv), "image_size": args.image_size, **decode}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.part == "device-decode":
        result["device_decode"]["machine"] = machine()  # the other parts' machine stays theirs
    else:
        result["machine"] = machine()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
