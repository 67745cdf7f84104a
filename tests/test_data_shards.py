import io
import json
import logging
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from gritvlp.data import index as index_mod
from gritvlp.data.collate import Collator
from gritvlp.data.shards import ShardDataset, expand_shards
from gritvlp.data.text import clean_caption, load_tokenizer
from gritvlp.data.transforms import eval_transform, train_transform


def _jpg(colour, size=16):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "JPEG")
    return buf.getvalue()


def _write_tar(path, samples):
    """samples: (key, {ext: bytes}) in img2dataset layout."""
    with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
        for key, members in samples:
            sink.write({"__key__": key, **members})
    return str(path)


def _oracle_rows(shard):
    """(key, {ext: [data offset, size]}, group key) per sample, straight from tarfile: the index's oracle."""
    samples = {}
    with tarfile.open(shard) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            data = tar.extractfile(info).read()
            samples.setdefault(key, {})[ext] = ([info.offset_data, info.size], data)
    rows = []
    for key, members in samples.items():
        image_id = json.loads(members["json"][1]).get("image_id") if "json" in members else None
        group = "id:" + json.dumps(image_id) if image_id is not None else None
        rows.append((key, {ext: span for ext, (span, _) in members.items()}, group))
    return rows


def test_expand_shards(demo, tmp_path):
    folder = os.path.dirname(demo)
    names = [os.path.join(folder, f"train-00000{i}.tar") for i in range(3)]
    assert expand_shards(demo) == names
    for sidecar in ("train-000000.parquet", "train-000000_stats.json"):
        open(os.path.join(folder, sidecar), "w").close()
    assert expand_shards(os.path.join(folder, "train-*")) == names  # img2dataset sidecars are ignored
    test = os.path.join(folder, "test-000000.tar")
    assert expand_shards(f"{names[2]}::{demo}::{folder}/test-*.tar") == [test, *names]  # sorted, de-duplicated
    assert expand_shards([names[0], names[0]]) == names[:1]
    with pytest.raises(FileNotFoundError, match="nothing-"):
        expand_shards(f"{demo}::{tmp_path}/nothing-*.tar")
    with pytest.raises(FileNotFoundError, match=r"train-000003.*\{000000\.\.000009\}"):  # missing shard and pattern
        expand_shards(os.path.join(folder, "train-{000000..000009}.tar"))


def test_captions_and_group_ids(demo):
    ds = ShardDataset(demo, eval_transform(32))
    assert len(ds) == 24 and ds.num_truncated == 0 and ds.keys[10] == "000000010"
    shard = expand_shards(demo)[1]  # index 10 is the third sample of the second shard
    with tarfile.open(shard) as tar:
        raw = tar.extractfile("000000010.txt").read().decode()
        meta = json.loads(tar.extractfile("000000010.json").read())
    sample = ds[10]
    assert sample["caption"] == clean_caption(raw, 30) and sample["index"] == 10
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
    metas = []
    for s in expand_shards(demo):
        with tarfile.open(s) as tar:
            metas += [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    image_ids = [m["image_id"] for m in metas]
    assert len(set(image_ids)) < len(image_ids), "the demo set should hold an image with two captions"
    for i in range(len(ds)):
        for j in range(len(ds)):
            assert (image_ids[i] == image_ids[j]) == (ds.group_ids[i] == ds.group_ids[j]).item()
    assert ds.group_ids.dtype == torch.long and ds.group_ids.max().item() == len(set(image_ids)) - 1
    assert sample["group_id"] == ds.group_ids[10].item() and meta["key"] == "000000010"


def test_content_hash_groups_without_image_id(tmp_path):
    red, blue = _jpg("red"), _jpg("blue")
    path = _write_tar(
        tmp_path / "s.tar",
        [
            ("a", {"jpg": red, "txt": b"one", "json": b"{}"}),
            ("b", {"jpg": blue, "txt": b"two", "json": json.dumps({"image_id": None}).encode()}),
            ("c", {"jpg": red, "txt": b"three"}),
        ],
    )
    ds = ShardDataset(path, eval_transform(16))
    assert ds.group_ids.tolist() == [0, 1, 0]


def test_augmentation_is_a_function_of_seed_epoch_index(demo):
    ds = ShardDataset(demo, train_transform(32), seed=3)
    first = ds[5]["image"]
    assert torch.equal(first, ds[5]["image"])
    assert torch.equal(first, ShardDataset(demo, train_transform(32), seed=3)[5]["image"])
    torch.manual_seed(123)  # global RNG state must not matter, nor be disturbed
    state = torch.get_rng_state()
    assert torch.equal(first, ds[5]["image"])
    assert torch.equal(state, torch.get_rng_state())
    ds.set_epoch(1)
    assert not torch.equal(first, ds[5]["image"])
    ds.set_epoch(0)
    assert torch.equal(first, ds[5]["image"])
    assert not torch.equal(first, ShardDataset(demo, train_transform(32), seed=4)[5]["image"])


def test_bad_samples_return_none_and_are_counted(tmp_path, caplog):
    path = _write_tar(
        tmp_path / "bad.tar",
        [
            ("good", {"jpg": _jpg("red"), "txt": b"A red square."}),
            ("corrupt", {"jpg": b"\xff\xd8 not really a jpeg", "txt": b"broken"}),
            ("nocaption", {"jpg": _jpg("blue"), "json": b"{}"}),
            ("emptycaption", {"jpg": _jpg("blue"), "txt": b" ... "}),
        ],
    )
    ds = ShardDataset(path, eval_transform(16))
    with caplog.at_level(logging.WARNING, logger="gritvlp.data"):
        samples = [ds[i] for i in range(len(ds))]
    assert samples[0]["caption"] == "a red square" and samples[1:] == [None, None, None]
    text = caplog.text
    assert "corrupt" in text and "undecodable image" in text and "bad.tar" in text
    assert "nocaption" in text and "no caption" in text and "empty caption" in text
    batch = Collator(load_tokenizer())(samples[:2])
    assert batch["num_skipped"] == 1 and batch["image"].shape[0] == 1


def test_truncated_tar_keeps_earlier_samples(demo, tmp_path, caplog):
    shard = expand_shards(demo)[0]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(open(shard, "rb").read()[: os.path.getsize(shard) // 2])
    with caplog.at_level(logging.WARNING, logger="gritvlp.data"):
        ds = ShardDataset(str(cut), eval_transform(32))
    assert 0 < len(ds) < 8 and ds.num_truncated > 0
    assert "truncated" in caplog.text and "cut.tar" in caplog.text
    full = ShardDataset(shard, eval_transform(32))
    for i in range(len(ds)):
        assert ds[i]["caption"] == full[i]["caption"] and torch.equal(ds[i]["image"], full[i]["image"])
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x01" * 3000)
    ds = ShardDataset(str(garbage), eval_transform(32))
    assert len(ds) == 0 and ds.num_truncated == 1


def test_index_cache_reused_and_rebuilt(tmp_path, monkeypatch):
    path = _write_tar(tmp_path / "s.tar", [("a", {"jpg": _jpg("red"), "txt": b"one"})])
    assert len(ShardDataset(path, eval_transform(16))) == 1
    (meta,) = (tmp_path / ".gritvlp-index").glob("*.json")
    stamp = meta.stat().st_mtime_ns

    def no_rebuild(shard):
        raise AssertionError("the cached index should have been used")

    monkeypatch.setattr(index_mod, "build_part", no_rebuild)
    assert len(ShardDataset(path, eval_transform(16))) == 1
    assert meta.stat().st_mtime_ns == stamp
    monkeypatch.undo()
    _write_tar(path, [("a", {"jpg": _jpg("red"), "txt": b"one"}), ("b", {"jpg": _jpg("blue"), "txt": b"two"})])
    ds = ShardDataset(path, eval_transform(16))
    assert len(ds) == 2 and ds[1]["caption"] == "two" and ds.keys[1] == "b"


def test_index_falls_back_to_user_cache(tmp_path, monkeypatch):
    path = _write_tar(tmp_path / "s.tar", [("a", {"jpg": _jpg("red"), "txt": b"one"})])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real_writable = index_mod._writable
    monkeypatch.setattr(index_mod, "_writable", lambda root: root.parent != tmp_path and real_writable(root))
    assert len(ShardDataset(path, eval_transform(16))) == 1
    assert not (tmp_path / ".gritvlp-index").exists()
    assert len(list((tmp_path / "cache" / "gritvlp" / "index").glob("*/*.json"))) == 1
    monkeypatch.setattr(index_mod, "build_part", None)  # the cached copy is found again
    assert ShardDataset(path, eval_transform(16))[0]["caption"] == "one"


def test_index_in_memory_when_nothing_is_writable(tmp_path, monkeypatch, caplog):
    path = _write_tar(
        tmp_path / "s.tar", [("a", {"jpg": _jpg("red"), "txt": b"one"}), ("b", {"jpg": _jpg("red"), "txt": b"two"})]
    )
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(index_mod, "_writable", lambda root: False)
    with caplog.at_level(logging.WARNING, logger="gritvlp.data"):
        ds = ShardDataset(path, eval_transform(16))
    assert "held in memory" in caplog.text and ds.index.location is None
    assert [ds[i]["caption"] for i in range(2)] == ["one", "two"] and ds.group_ids.tolist() == [0, 0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[1]["caption"] == "two" and list(clone.keys) == ["a", "b"]


def test_previous_json_index_is_read_instead_of_scanning(demo, monkeypatch):
    """A current <shard>.idx.json of the previous release is converted, not rescanned, with the same result."""
    shards = expand_shards(demo)
    folder = Path(shards[0]).parent
    scanned = ShardDataset(demo, eval_transform(32), index_dir=str(folder / "scanned"))
    monkeypatch.setattr(index_mod, "scan_tar", None)  # any scan now fails
    try:
        for shard in shards:
            stat = os.stat(shard)
            rows = [list(row) for row in _oracle_rows(shard)]
            index = {"version": 1, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "truncated": 0, "samples": rows}
            Path(shard + ".idx.json").write_text(json.dumps(index))
        converted = ShardDataset(demo, eval_transform(32), index_dir=str(folder / "converted"))
    finally:
        for shard in shards:
            Path(shard + ".idx.json").unlink(missing_ok=True)
    for name in ("image_block", "image_size", "text_block", "text_size", "group_id", "shard_start"):
        assert np.array_equal(getattr(scanned.index, name), getattr(converted.index, name)), name
    assert converted[5]["caption"] == scanned[5]["caption"]


def test_dataloader_workers_and_pickle(demo):
    ds = ShardDataset(demo, train_transform(32, hflip=False))
    expected = [ds[i]["image"] for i in range(len(ds))]  # opens handles in this process before the fork
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, collate_fn=Collator(load_tokenizer()))
    seen = {}
    for batch in loader:
        assert batch["num_skipped"] == 0
        seen.update({int(i): img for i, img in zip(batch["index"], batch["image"])})
    assert sorted(seen) == list(range(len(ds)))
    assert all(torch.equal(seen[i], expected[i]) for i in seen)  # same pixels in workers as in the main process
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[3]["image"], expected[3])


def _concepts_json(ids, probs, **extra) -> bytes:
    return json.dumps({"image_id": None, "concepts": {"teacher": "t", "ids": ids, "probs": probs}, **extra}).encode()


@pytest.fixture
def concept_shard(tmp_path):
    """One sample per way KEY.json can carry (or fail to carry) concepts."""
    return _write_tar(
        tmp_path / "concepts.tar",
        [
            ("good", {"jpg": _jpg("red"), "txt": b"one", "json": _concepts_json([4, 1], [0.7, 0.2], extra="x")}),
            ("nofield", {"jpg": _jpg("red"), "txt": b"two", "json": b'{"image_id": 3}'}),
            ("nojson", {"jpg": _jpg("red"), "txt": b"three"}),
            ("garbled", {"jpg": _jpg("red"), "txt": b"four", "json": b'{"concepts": {"ids": [1'}),
            ("mismatched", {"jpg": _jpg("red"), "txt": b"five", "json": _concepts_json([1, 2], [0.5])}),
            ("negative", {"jpg": _jpg("red"), "txt": b"six", "json": _concepts_json([-1], [0.5])}),
            ("second", {"jpg": _jpg("blue"), "txt": b"seven", "json": _concepts_json([3], [0.9])}),
        ],
    )


def _recording_reads(ds: ShardDataset) -> list[tuple[int, int]]:
    spans, read = [], ds._reader.read_ranges
    ds._reader.read_ranges = lambda shard_id, ranges: spans.extend(ranges) or read(shard_id, ranges)
    return spans


def test_concepts_read_from_key_json(concept_shard, caplog):
    ds = ShardDataset(concept_shard, eval_transform(16), read_concepts=True)
    with caplog.at_level(logging.WARNING, logger="gritvlp.data"):
        samples = [ds[i] for i in range(len(ds))]
    assert [s["caption"] for s in samples] == ["one", "two", "three", "four", "five", "six", "seven"]  # none lost
    assert samples[0]["concepts"] == {"teacher": "t", "ids": [4, 1], "probs": [0.7, 0.2]}  # the field, nothing else
    assert samples[6]["concepts"]["ids"] == [3]
    assert [i for i, s in enumerate(samples) if "concepts" in s] == [0, 6]
    broken = [r for r in caplog.records if "left without concept targets" in r.getMessage()]
    assert len(broken) == 1 and "garbled" in broken[0].getMessage()  # three broken samples, one line
    batch = Collator(load_tokenizer())(samples)
    assert batch["concept_ids"].tolist() == [[4, 1], [0, 0], [0, 0], [0, 0], [0, 0], [0, 0], [3, 0]]


def test_concepts_are_not_read_unless_asked(concept_shard):
    ds = ShardDataset(concept_shard, eval_transform(16))
    spans = _recording_reads(ds)
    samples = [ds[i] for i in range(len(ds))]
    assert all("concepts" not in s for s in samples)
    json_spans = {ds.index.json_member(i) for i in range(len(ds))}
    assert len(spans) == 2 * len(ds) and not json_spans & set(spans)
    asked = ShardDataset(concept_shard, eval_transform(16), read_concepts=True)
    spans = _recording_reads(asked)
    asked[0]
    assert spans[-1] == asked.index.json_member(0)  # the recorder sees a KEY.json read when there is one
