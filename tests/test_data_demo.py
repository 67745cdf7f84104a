import json
import tarfile
from collections import defaultdict
from pathlib import Path

from gritvlp.data.demo import HELD_OUT, OPPOSITE, ensure_demo_shards, is_demo_split, make_demo_shards
from gritvlp.data.shards import expand_shards

ARGS = dict(num_train=120, num_test=40, image_size=32, samples_per_shard=50, progress=False)


def _records(pattern):
    """(json metadata, jpg bytes, caption) of every sample of the shards."""
    out = []
    for shard in expand_shards(pattern):
        with tarfile.open(shard) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in files if n.endswith(".json")):
            key = name[: -len(".json")]
            out.append((json.loads(files[name]), files[key + ".jpg"], files[key + ".txt"].decode()))
    return out


def _tars(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.tar"))}


def test_deterministic_from_seed(tmp_path):
    train, test = make_demo_shards(str(tmp_path / "a"), seed=0, **ARGS)
    make_demo_shards(str(tmp_path / "b"), seed=0, **ARGS)
    make_demo_shards(str(tmp_path / "c"), seed=1, **ARGS)
    a, b, c = (_tars(tmp_path / x) for x in "abc")
    assert sorted(a) == ["test-000000.tar", "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert a == b
    assert all(a[name] != c[name] for name in a)
    assert len(expand_shards(train)) == 3 and len(expand_shards(test)) == 1
    assert len(_records(train)) == 120 and len(_records(test)) == 40


def test_test_split_holds_unseen_combinations(tmp_path):
    train, test = make_demo_shards(str(tmp_path), seed=0, **ARGS)
    train_pairs = {(o["shape"], o["colour"]) for meta, _, _ in _records(train) for o in meta["objects"]}
    assert not train_pairs & HELD_OUT
    for meta, _, _ in _records(test):
        assert any((o["shape"], o["colour"]) in HELD_OUT for o in meta["objects"])
    for meta, _, caption in _records(train):  # nor does training text name a held-out pair
        for text in [caption, *meta["negatives"]]:
            assert not any(f"{colour} {shape}" in text for shape, colour in HELD_OUT)


def test_hard_negatives_and_second_captions(tmp_path):
    train, _ = make_demo_shards(str(tmp_path), seed=0, **ARGS)
    records = _records(train)
    kinds = defaultdict(int)
    for meta, _, caption in records:
        assert meta["caption"] == caption and meta["status"] == "success" and meta["negatives"]
        for negative in meta["negatives"]:
            a, b = caption.split(), negative.split()
            assert negative != caption and len(a) == len(b)
            diff = sum(x != y for x, y in zip(a, b))
            if sorted(a) == sorted(b):
                kinds["swap"] += 1  # same words, relation sides swapped
            else:
                assert diff == 1
                kinds["attribute"] += 1
    assert kinds["swap"] > 10 and kinds["attribute"] > 10
    captions = [c.split() for _, _, c in records]  # the captions themselves include one-word neighbours
    assert any(len(x) == len(y) and sum(p != q for p, q in zip(x, y)) == 1 for x in captions for y in captions)
    by_image = defaultdict(list)
    for meta, jpg, caption in records:
        by_image[meta["image_id"]].append((jpg, caption))
    pairs = [v for v in by_image.values() if len(v) == 2]
    assert pairs, "some images must carry two captions"
    for (jpg1, cap1), (jpg2, cap2) in pairs:
        assert jpg1 == jpg2 and cap1 != cap2
        assert any(r in cap1 and OPPOSITE[r] in cap2 for r in OPPOSITE)
    assert max(len(c) for c in captions) <= 23  # fits 25 tokens with [CLS] and [SEP]


def test_ensure_reuses_and_regenerates(tmp_path):
    out = tmp_path / "demo"
    args = dict(num_train=20, num_test=8, image_size=32, progress=False)
    train, test = ensure_demo_shards(str(out), **args)
    assert expand_shards(train) and expand_shards(test)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert ensure_demo_shards(str(out), **args) == (train, test)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    ensure_demo_shards(str(out), **{**args, "num_train": 30})
    assert json.loads((out / "manifest.json").read_text())["num_train"] == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo.lock", "demo"]  # no temporary folder left


def test_demo_splits_are_recognised_by_their_manifest(tmp_path):
    train, test = ensure_demo_shards(str(tmp_path / "demo"), 8, 8, progress=False)
    assert is_demo_split(train) and is_demo_split(test)
    other = tmp_path / "copied"
    other.mkdir()
    shard = expand_shards(test)[0]
    (other / Path(shard).name).write_bytes(Path(shard).read_bytes())  # the same tar, without the generator's manifest
    assert not is_demo_split(str(other)) and not is_demo_split(f"{test}::{other}")
    assert not is_demo_split(str(tmp_path / "missing-*.tar"))
