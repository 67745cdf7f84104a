"""Precomputed concept targets travel from scripts/precompute_concepts.py's shards through ShardDataset and the
Collator into a distillation step: the dataset read on its own, then scripts/pretrain.py on one process. Attribute
labels from captions (no teacher) take the same road."""

import hashlib
import io
import json
import math
import tarfile
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from test_distill import NUM_CLASSES, load_script
from test_train import ds_config, losses, pretrain

from gritvlp.data.collate import Collator
from gritvlp.data.demo import ensure_demo_shards
from gritvlp.data.shards import ShardDataset, expand_shards, well_formed_concepts
from gritvlp.data.text import load_tokenizer
from gritvlp.data.transforms import eval_transform


@pytest.fixture(scope="module")
def labelled_shards(tmp_path_factory) -> str:
    """16 demo samples in 2 shards, labelled by a 5-class test_vit teacher (top 3); returns their folder."""
    tmp = tmp_path_factory.mktemp("concepts")
    torch.manual_seed(7)
    teacher = tmp / "test_vit.safetensors"
    save_file(timm.create_model("test_vit", pretrained=False, num_classes=NUM_CLASSES).state_dict(), str(teacher))
    train, _ = ensure_demo_shards(str(tmp / "demo"), 16, 2, image_size=64, samples_per_shard=8, progress=False)
    out = tmp / "labelled"
    stats = load_script().main([train, "--teacher", "test_vit", "--weights", str(teacher), "--topk", "3",
                                "--out", str(out), "--device", "cpu"])  # fmt: skip
    assert stats == {"shards": 2, "labelled": 16, "undecodable": 0}
    return str(out)


def written_concepts(folder: str) -> list[dict]:
    """The "concepts" of every KEY.json, in sample order, straight from tarfile."""
    found = []
    for shard in expand_shards(folder):
        with tarfile.open(shard) as tar:
            found += [json.loads(tar.extractfile(m).read())["concepts"] for m in tar if m.name.endswith(".json")]
    return found


def test_dataset_returns_the_precomputed_concepts(labelled_shards):
    expected = written_concepts(labelled_shards)
    ds = ShardDataset(labelled_shards, eval_transform(64), read_concepts=True)
    samples = [ds[i] for i in range(len(ds))]
    assert len(samples) == len(expected) == 16
    assert [s["concepts"] for s in samples] == expected
    assert all(c["teacher"] == "test_vit" and len(c["ids"]) == 3 for c in expected)
    batch = Collator(load_tokenizer())(samples[:4])
    assert batch["concept_ids"].tolist() == [c["ids"] for c in expected[:4]]
    torch.testing.assert_close(batch["concept_probs"], torch.tensor([c["probs"] for c in expected[:4]]))
    plain = ShardDataset(labelled_shards, eval_transform(64))
    assert all("concepts" not in plain[i] for i in range(len(plain)))


@pytest.mark.slow
def test_pretraining_distils_from_precomputed_concepts(labelled_shards, tmp_path):
    """No teacher weights: the distillation term can only come from the shards' KEY.json."""
    run, index_dir = tmp_path / "run", tmp_path / "index" / "new"
    pretrain(
        run, ds_config(tmp_path, 2), 1,
        f"data.train_shards={labelled_shards}", f"data.index_dir={index_dir}",
        "model.teacher_name=test_vit", f"model.num_concepts={NUM_CLASSES}",
        "train.max_steps=2", "train.export_fp16=false",
    )  # fmt: skip
    metrics = losses(run)
    steps = sorted(step for step, m in metrics.items() if "loss/total" in m)
    assert steps == [1, 2]
    assert all(math.isfinite(metrics[s]["loss/distill"]) and metrics[s]["loss/distill"] > 0 for s in steps)
    assert all(metrics[s]["loss/distill_objects"] == metrics[s]["loss/distill"] for s in steps)  # no attributes
    assert list(Path(index_dir).glob("*.json"))  # the index was built where data.index_dir says


@pytest.mark.slow
def test_pretraining_distils_objects_and_caption_attributes(labelled_shards, tmp_path):
    """Teacher objects and caption attributes in the same KEY.json, through scripts/pretrain.py."""
    vocab = tmp_path / "colours.txt"
    vocab.write_text("\n".join(["red", "green", "blue", "yellow", "purple", "orange", "white", "small", "large"]))
    attributed = tmp_path / "attributed"
    load_script().main([labelled_shards, "--attributes-from", "caption", "--attribute-vocab", str(vocab),
                        "--out", str(attributed)])  # fmt: skip
    run = tmp_path / "run"
    pretrain(
        run, ds_config(tmp_path, 2), 1,
        f"data.train_shards={attributed}", f"data.index_dir={tmp_path / 'index'}",
        "model.teacher_name=test_vit", f"model.num_concepts={NUM_CLASSES}", "model.num_attributes=9",
        "train.max_steps=2", "train.export_fp16=false",
    )  # fmt: skip
    metrics = losses(run)
    for step in (1, 2):
        m = metrics[step]
        assert m["loss/distill_attributes"] > 0 and m["loss/distill_objects"] > 0
        assert m["loss/distill"] == pytest.approx(m["loss/distill_objects"] + m["loss/distill_attributes"], rel=1e-5)


# -- attributes from captions ---------------------------------------------------------------------------------------
VOCAB = ["light blue", "Shiny", "red", "car", "blue"]  # ids 0..4; a phrase, and capitals normalised away


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def jpeg(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def caption_shard(tmp_path) -> Path:
    earlier = {"image_id": 1, "concepts": {"teacher": "earlier", "ids": [2], "probs": [0.9]}}
    folder = tmp_path / "in"
    folder.mkdir()
    write_tar(folder / "shard-0.tar", [
        ("000", {"jpg": jpeg("blue"), "txt": b"A Light-Blue, SHINY car!", "json": json.dumps(earlier).encode()}),
        ("001", {"jpg": jpeg("red"), "txt": b"a carpet on a bluebell"}),  # no whole-word match; no KEY.json yet
        ("002", {"jpg": b"not a jpeg", "txt": b"a red car"}),  # images are not decoded without a teacher
        ("003", {"jpg": jpeg("red"), "json": b"{}"}),  # no caption: nothing to match
    ])  # fmt: skip
    return folder / "shard-0.tar"


def test_caption_attributes_without_teacher(caption_shard, tmp_path):
    vocab = tmp_path / "attributes.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    out = tmp_path / "out"
    before = hashlib.sha256(caption_shard.read_bytes()).hexdigest()
    argv = [str(caption_shard), "--attributes-from", "caption", "--attribute-vocab", str(vocab), "--out", str(out)]
    stats = load_script().main(argv)
    assert stats == {"shards": 1, "labelled": 3, "undecodable": 0, "with_attributes": 2}
    assert hashlib.sha256(caption_shard.read_bytes()).hexdigest() == before  # the input is only read
    with tarfile.open(out / "shard-0.tar") as tar:
        metas = {m.name: json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")}
    assert metas == {
        "000.json": {"image_id": 1, "concepts": {"teacher": "earlier", "ids": [2], "probs": [0.9],
                                                 "attributes": [0, 1, 3, 4]}},  # the earlier objects are kept
        "001.json": {"concepts": {"attributes": []}},
        "002.json": {"concepts": {"attributes": [2, 3]}},
        "003.json": {},
    }  # fmt: skip
    stamp = (out / "shard-0.tar").stat().st_mtime_ns
    assert load_script().main(argv)["shards"] == 0 and (out / "shard-0.tar").stat().st_mtime_ns == stamp

    ds = ShardDataset(str(out / "shard-0.tar"), eval_transform(16), index_dir=tmp_path / "index", read_concepts=True)
    samples = [ds[i] for i in range(len(ds))]
    assert samples[2] is None and samples[3] is None  # undecodable, uncaptioned: skipped by training anyway
    batch = Collator(load_tokenizer(), num_attributes=len(VOCAB))(samples)
    torch.testing.assert_close(batch["attribute_targets"], torch.tensor([[1.0, 1, 0, 1, 1], [0, 0, 0, 0, 0]]))
    assert batch["attribute_mask"].tolist() == [1, 1]  # 001 is labelled: none of the attributes
    assert batch["concept_ids"].tolist() == [[2], [0]]
    with pytest.raises(ValueError, match="attribute id 4 is outside"):
        Collator(load_tokenizer(), num_attributes=4)(samples)


def test_objects_named_by_the_caption_replace_a_teacher(caption_shard, tmp_path):
    objects = tmp_path / "objects.txt"
    objects.write_text("bus\ncar\nbluebell\n")
    out = tmp_path / "out"
    stats = load_script().main([str(caption_shard), "--object-vocab", str(objects), "--out", str(out)])
    assert stats == {"shards": 1, "labelled": 3, "undecodable": 0}
    with tarfile.open(out / "shard-0.tar") as tar:
        metas = {m.name: json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")}
    assert metas["000.json"]["concepts"] == {"teacher": "caption", "ids": [1], "probs": [1.0]}  # replaces "earlier"
    assert metas["001.json"]["concepts"] == {"teacher": "caption", "ids": [2], "probs": [1.0]}  # not "car" in carpet
    assert metas["002.json"]["concepts"] == {"teacher": "caption", "ids": [1], "probs": [1.0]}
    assert metas["003.json"] == {}  # no caption
    with pytest.raises(SystemExit):
        load_script().main([str(caption_shard), "--object-vocab", str(objects), "--teacher", "test_vit",
                            "--weights", str(objects), "--out", str(tmp_path / "x")])  # fmt: skip


@pytest.mark.parametrize("lines,match", [(["red", "", "blue"], "line 2: an empty attribute"),
                                         (["red", "Red."], "line 2: 'red' repeats line 1")])  # fmt: skip
def test_attribute_vocabulary_errors(lines, match, caption_shard, tmp_path):
    vocab = tmp_path / "attributes.txt"
    vocab.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=match):
        load_script().main([str(caption_shard), "--attributes-from", "caption", "--attribute-vocab", str(vocab),
                            "--out", str(tmp_path / "out")])  # fmt: skip


@pytest.mark.parametrize(
    "concepts,ok",
    [
        ({"attributes": []}, True),  # labelled: no attribute applies
        ({"attributes": [3, 0], "attribute_probs": [0.5, 1]}, True),
        ({"teacher": "t", "ids": [1], "probs": [0.9], "attributes": [2]}, True),
        ({"attributes": [1], "attribute_probs": [1.5]}, False),  # soft labels lie in [0, 1]
        ({"attributes": [1, 2], "attribute_probs": [0.5]}, False),
        ({"attribute_probs": [0.5]}, False),
        ({"attributes": [-1]}, False),
        ({"attributes": "red"}, False),
        ({"ids": [1], "probs": [0.9], "attributes": [True]}, False),
        ({"ids": [], "probs": [], "attributes": [1]}, False),  # objects, when present, need at least one class
        ({"teacher": "t"}, False),  # neither objects nor attributes
    ],
)
def test_well_formed_concepts_with_attributes(concepts, ok):
    assert well_formed_concepts(concepts) is ok
