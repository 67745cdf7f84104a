import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from test_data_shards import _jpg, _write_tar

from gritvlp.config import ConfigError, load_config
from gritvlp.data import index as index_mod
from gritvlp.data.index import BLOCK, MISSING, build_index, first_appearance_ids, open_index
from gritvlp.data.shards import ShardDataset, expand_shards
from gritvlp.data.transforms import eval_transform

ROOT = Path(__file__).resolve().parents[1]




def _many_shards(folder: Path, count: int, per_shard: int) -> list[str]:
    folder.mkdir()
    colours = ["red", "green", "blue", "white"]
    for s in range(count):
        samples = [(f"{s:04d}{i:05d}", {"jpg": _jpg(colours[i % 4]), "txt": b"a square"}) for i in range(per_shard)]
        _write_tar(folder / f"shard-{s:04d}.tar", samples)
    return expand_shards(str(folder))


def _columns(index):
    return {n: np.asarray(getattr(index, n)) for n in (*index_mod.COLUMNS, "group_id", "caption_id", "shard_start")}


def _part_mtimes(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (root / "parts").glob("*.npz")}


def test_binary_index_matches_the_tars(demo):
    """Every column against tarfile's own view of the demo shards."""
    ds = ShardDataset(demo, eval_transform(32))
    keys, image, text, meta, image_ids, starts = [], [], [], [], [], [0]
    for shard in expand_shards(demo):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".jpg")):
                key = name[:-4]
                keys.append(key)
                image.append((members[name].offset_data, members[name].size))
                text.append((members[key + ".txt"].offset_data, members[key + ".txt"].size))
                meta.append((members[key + ".json"].offset_data, members[key + ".json"].size))
                image_ids.append(json.loads(tar.extractfile(key + ".json").read())["image_id"])
        starts.append(len(keys))
    index = ds.index
    assert len(index) == len(keys) == 24 and list(ds.keys) == keys
    assert np.array_equal(index.shard_start, starts)
    assert np.array_equal(index.image_block.astype(np.int64) * BLOCK, [o for o, _ in image])
    assert np.array_equal(index.image_size, [s for _, s in image])
    assert np.array_equal(index.text_block.astype(np.int64) * BLOCK, [o for o, _ in text])
    assert np.array_equal(index.text_size, [s for _, s in text])
    assert np.array_equal(index.json_block.astype(np.int64) * BLOCK, [o for o, _ in meta])
    assert np.array_equal(index.json_size, [s for _, s in meta])
    assert [index.json_member(row) for row in range(len(index))] == meta
    dense = {}
    assert ds.group_ids.tolist() == [dense.setdefault(i, len(dense)) for i in image_ids]
    assert isinstance(index.image_block, np.memmap) and isinstance(index.group_id, np.memmap)  # mapped, not loaded


def test_first_appearance_ids():
    hashes = np.array([9, 3, 9, 7, 3, 1], dtype=np.uint64)
    assert first_appearance_ids(hashes).tolist() == [0, 1, 0, 2, 1, 3]


def test_missing_members_and_long_keys(tmp_path):
    long_key = "k" * 120  # longer than a ustar name field: the name lives in a pax header
    path = _write_tar(
        tmp_path / "s.tar",
        [
            (long_key, {"jpg": _jpg("red"), "txt": b"long"}),
            ("textonly", {"txt": b"no image here"}),
            ("jsononly", {"json": b"{}"}),
            ("short", {"jpg": _jpg("blue"), "txt": b"short"}),
        ],
    )
    ds = ShardDataset(path, eval_transform(16))
    assert list(ds.keys) == [long_key, "textonly", "jsononly", "short"]
    assert ds.index.image_size[1] == MISSING and ds.index.text_size[2] == MISSING
    assert [ds.index.json_member(row)[1] for row in range(4)] == [-1, -1, 2, -1]  # only "jsononly" has a KEY.json
    assert ds[0]["caption"] == "long" and ds[1] is None and ds[2] is None and ds[3]["caption"] == "short"
    assert len(set(ds.group_ids.tolist())) == 4  # samples without an image are groups of their own


def test_build_resumes_after_a_failure(tmp_path, monkeypatch):
    shards = _many_shards(tmp_path / "shards", 5, 4)
    root = tmp_path / "index"
    real = index_mod.build_part
    built = []

    def fail_on_third(shard):
        if len(built) == 2:
            raise OSError("injected failure")
        built.append(shard)
        return real(shard)

    monkeypatch.setattr(index_mod, "build_part", fail_on_third)
    with pytest.raises(OSError, match="injected"):
        build_index(shards, root, progress=False)
    assert len(_part_mtimes(root)) == 2 and open_index(root, shards) is None  # parts kept, nothing merged
    before = _part_mtimes(root)
    built.clear()
    monkeypatch.setattr(index_mod, "build_part", lambda shard: built.append(shard) or real(shard))
    resumed = build_index(shards, root, progress=False)
    assert built == shards[2:]  # only the shards not indexed yet
    assert all(_part_mtimes(root)[name] == mtime for name, mtime in before.items())
    fresh = build_index(shards, tmp_path / "fresh", progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(_columns(resumed).values(), _columns(fresh).values()))


def test_changed_shard_is_indexed_again(tmp_path, monkeypatch):
    shards = _many_shards(tmp_path / "shards", 3, 4)
    root = tmp_path / "index"
    build_index(shards, root, progress=False)
    _write_tar(shards[1], [(f"new{i}", {"jpg": _jpg("red"), "txt": b"rewritten"}) for i in range(6)])
    assert open_index(root, shards) is None  # out of date: the dataset would rebuild it
    real, built = index_mod.build_part, []
    monkeypatch.setattr(index_mod, "build_part", lambda shard: built.append(shard) or real(shard))
    ds = ShardDataset(shards, eval_transform(16), index_dir=str(root))
    assert built == [shards[1]] and len(ds) == 4 + 6 + 4
    assert ds[4]["caption"] == "rewritten" and ds.keys[4] == "new0"


# What each older format lacks: its part columns and merged columns.
OLDER_FORMATS = {2: ("json_", ("json_block", "json_size")), 3: ("caption_", ("caption_id",))}


def _downgrade(root: Path, shards: list[str], version: int) -> None:
    """Rewrite an index as an earlier release wrote it: format 2 (no KEY.json columns) or 3 (no caption ids)."""
    prefix, merged = OLDER_FORMATS[version]
    for shard in shards:
        path = index_mod.part_file(root, shard)
        with np.load(path) as part:
            meta = {**json.loads(str(part["meta"])), "version": version}
            columns = {name: part[name] for name in part.files if name != "meta" and not name.startswith(prefix)}
        with open(path, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **columns)
    (set_meta,) = root.glob("*.json")
    meta = {**json.loads(set_meta.read_text()), "version": version}
    set_meta.write_text(json.dumps(meta))
    for column in merged:
        (root / meta["columns"] / f"{column}.npy").unlink()


@pytest.mark.parametrize("version", [2, 3])
def test_index_of_an_older_format_is_rebuilt(tmp_path, monkeypatch, caplog, version):
    shards = _many_shards(tmp_path / "shards", 3, 2)
    root = tmp_path / "index"
    fresh = _columns(build_index(shards, root, progress=False))
    _downgrade(root, shards, version)
    real, built = index_mod.build_part, []
    monkeypatch.setattr(index_mod, "build_part", lambda shard: built.append(shard) or real(shard))
    with caplog.at_level(logging.INFO, logger="gritvlp.data"):
        ds = ShardDataset(shards, eval_transform(16), index_dir=str(root))
    assert built == shards  # every part, though no shard changed
    assert f"in format {version}, this release reads format 4" in caplog.text
    assert "3 shard(s) under" in caplog.text and "indexed in an older format" in caplog.text
    assert all(np.array_equal(a, b) for a, b in zip(_columns(ds.index).values(), fresh.values()))
    assert ds[5]["caption"] == "a square" and ds[5]["caption_id"] == ds[0]["caption_id"]


def test_caption_ids_join_identical_normalised_captions_across_shards(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    captions = [[b"A red circle.", b"a blue star", b"a red  circle"], [b"a Blue star!", b"a green square", b""]]
    for s, texts in enumerate(captions):
        _write_tar(folder / f"s{s}.tar", [(f"{s}{i:03d}", {"jpg": _jpg(["red", "blue", "white"][i], 16 + s),
                                                          "txt": t}) for i, t in enumerate(texts)])  # fmt: skip
    index = build_index(expand_shards(str(folder)), tmp_path / "index", progress=False)
    # ALBEF's cleaning: case, punctuation and spacing do not make two captions different
    assert index.caption_id.tolist() == [0, 1, 0, 1, 2, 3]  # the empty caption is a group of its own
    assert index.group_id.tolist() == [0, 1, 2, 3, 4, 5]  # every image differs (size)
    assert np.dtype(index.caption_id.dtype).itemsize + sum(np.dtype(d).itemsize for d in index_mod.COLUMNS.values()) \
        + np.dtype(index.group_id.dtype).itemsize == 40  # bytes per sample
    ds = ShardDataset(expand_shards(str(folder)), eval_transform(16), index_dir=str(tmp_path / "index"))
    assert [ds[i]["caption_id"] for i in (0, 2, 3)] == [0, 0, 1]


def test_index_dir_config_key(tmp_path):
    absent = tmp_path / "not" / "yet"
    assert load_config("demo", [f"data.index_dir={absent}"]).data.index_dir == str(absent)  # the builder makes it
    assert load_config("demo").data.index_dir is None
    (tmp_path / "file").write_text("")
    for bad in (tmp_path / "file", ""):
        with pytest.raises(ConfigError, match="'data.index_dir'"):
            load_config("demo", [f"data.index_dir='{bad}'"])


def test_cli_builds_in_parallel_and_the_dataset_maps_it(tmp_path, monkeypatch):
    shards = _many_shards(tmp_path / "shards", 4, 3)
    out = tmp_path / "index"
    cmd = [sys.executable, str(ROOT / "scripts" / "index_shards.py"), str(tmp_path / "shards"), "--out", str(out)]
    result = subprocess.run([*cmd, "--workers", "2"], capture_output=True, text=True, check=True)
    assert "12 samples in 4 shards (0 damaged)" in result.stdout
    monkeypatch.setattr(index_mod, "build_part", None)  # opening must not index anything
    ds = ShardDataset(shards, eval_transform(16), index_dir=str(out))
    assert len(ds) == 12 and ds[11]["caption"] == "a square" and ds.keys[11] == "000300002"


def test_killed_tool_resumes(tmp_path, monkeypatch):
    shards = _many_shards(tmp_path / "shards", 40, 200)
    out = tmp_path / "index"
    cmd = [sys.executable, str(ROOT / "scripts" / "index_shards.py"), str(tmp_path / "shards"), "--out", str(out)]
    proc = subprocess.Popen([*cmd, "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not _part_mtimes(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _part_mtimes(out)
    assert 0 < len(before) < len(shards), "the kill should land mid-run"
    (out / "parts" / "0123456789abcdef-shard-9999.tar.npz.999.tmp").write_bytes(b"half a part")
    real, built = index_mod.build_part, []
    monkeypatch.setattr(index_mod, "build_part", lambda shard: built.append(shard) or real(shard))
    resumed = build_index(shards, out, progress=False)
    assert len(built) == len(shards) - len(before) and len(resumed) == 40 * 200
    assert all(_part_mtimes(out)[name] == mtime for name, mtime in before.items())
    assert not list(out.glob("parts/*.tmp"))
