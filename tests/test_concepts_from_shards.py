"""Precomputed concept targets travel from scripts/precompute_concepts.py's shards through ShardDataset and the
Collator into a distillation step: the dataset read on its own, then scripts/pretrain.py on one process."""

import json
import math
import tarfile
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from test_distill import NUM_CLASSES, load_script
from test_train import ds_config, losses, pretrain

from gritvlp.data.collate import Collator
from gritvlp.data.demo import ensure_demo_shards
from gritvlp.data.shards import ShardDataset, expand_shards
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
    assert list(Path(index_dir).glob("*.json"))  # the index was built where data.index_dir says
