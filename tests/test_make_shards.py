import json
import runpy
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from gritvlp.data.shards import ShardDataset, expand_shards
from gritvlp.data.transforms import eval_transform
from gritvlp.data.writer import write_shards_from_json

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_shards.py"


@pytest.fixture
def annotations(tmp_path):
    """Three images (JPEG, PNG-with-.jpg-name, JPEG) and an entry whose image is missing."""
    (tmp_path / "img" / "sub").mkdir(parents=True)
    Image.new("RGB", (20, 10), "red").save(tmp_path / "img" / "a.jpg")
    Image.new("RGB", (12, 12), "blue").save(tmp_path / "img" / "sub" / "b.jpg", format="PNG")
    Image.new("RGB", (8, 8), "green").save(tmp_path / "img" / "c.jpg")
    entries = [
        {"image": "a.jpg", "caption": ["A red box.", "Something red"]},
        {"image": "sub/b.jpg", "caption": "a blue square", "image_id": 7},
        {"image": "missing.jpg", "caption": ["lost", "also lost"]},
        {"image": "c.jpg", "caption": "green"},
    ]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(entries))
    return str(path), str(tmp_path / "img")


def test_round_trip(annotations, tmp_path):
    ann, root = annotations
    stats = write_shards_from_json(
        ann, root, str(tmp_path / "out" / "coco-%06d.tar"), samples_per_shard=2, progress=False
    )
    assert stats == {"samples": 4, "shards": 2, "skipped": 2}
    ds = ShardDataset(str(tmp_path / "out" / "coco-{000000..000001}.tar"), eval_transform(16))
    assert [ds[i]["caption"] for i in range(len(ds))] == ["a red box", "something red", "a blue square", "green"]
    g = ds.group_ids.tolist()
    assert g[0] == g[1] and len(set(g)) == 3  # captions of one image share a group

    with tarfile.open(tmp_path / "out" / "coco-000001.tar") as tar:
        names = tar.getnames()
        png = tar.extractfile("000000002.png").read()
        meta = json.loads(tar.extractfile("000000002.json").read())
    assert "000000002.png" in names and "000000003.jpg" in names  # extension follows the real format
    assert png == (Path(root) / "sub" / "b.jpg").read_bytes()  # copied, not re-encoded
    assert meta["image_id"] == 7 and (meta["width"], meta["height"]) == (12, 12) and meta["status"] == "success"


def _cli(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *argv])
    runpy.run_path(str(SCRIPT), run_name="__main__")


def test_cli(annotations, tmp_path, monkeypatch, capsys):
    ann, root = annotations
    _cli(monkeypatch, ann, root, str(tmp_path / "shards"), "--prefix", "coco", "--samples_per_shard", "3")
    assert len(expand_shards(str(tmp_path / "shards" / "coco-{000000..000001}.tar"))) == 2
    assert "2 skipped" in capsys.readouterr().out
    _cli(monkeypatch, "--demo", str(tmp_path / "demo"), "--num_train", "10", "--num_test", "4", "--image_size", "32")
    assert len(ShardDataset(str(tmp_path / "demo" / "train-*.tar"), eval_transform(32))) == 10
    with pytest.raises(SystemExit):
        _cli(monkeypatch, "--demo", "a", "b")
