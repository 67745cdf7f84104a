"""The text format is the model's: weights imported from ALBEF / GRIT-VLP read "[CLS] words" (no [SEP], as their
code tokenises), models trained here "[CLS] words [SEP]"; evaluation, fine-tuning, training and the mining filter
tokenise each model as it was trained."""

import dataclasses
import importlib.util
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from gritvlp import albef
from gritvlp.config import ConfigError, load_config
from gritvlp.data.collate import Collator
from gritvlp.data.text import load_tokenizer
from gritvlp.eval.features import encode_captions
from gritvlp.eval.loading import load_model, load_model_tokenizer
from gritvlp.model.gritvlp import GritVLP
from gritvlp.objectives.mining import ConnectionMiner, load_filter_model
from gritvlp.train.data import tokenizer_and_special_tokens

_spec = importlib.util.spec_from_file_location(
    "convert_albef", Path(__file__).parents[1] / "scripts" / "convert_albef.py"
)
convert_albef = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_albef)

CAPTIONS = ["a red circle", "two small blue squares left of a green triangle", "a cat"]
CLS, SEP = 101, 102


def word_ids(captions: list[str]) -> list[list[int]]:
    tokenizer = load_tokenizer()
    return [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(c)) for c in captions]


def padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows padded with 0 to the longest, mask 1 on every given token."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """An ALBEF-layout .pth (momentum copies and queues included), its conversion, and a gritvlp export."""
    root = tmp_path_factory.mktemp("formats")
    torch.manual_seed(0)
    model = GritVLP(load_config("demo").model)
    pth = albef.save_albef_checkpoint(model, root / "albef.pth", queue_size=8)
    convert_albef.main(["to-gritvlp", str(pth), str(root / "converted"), "--config", "demo"])
    return {"pth": pth, "converted": root / "converted", "export": albef.write_export_folder(model, root / "export")}


def test_unknown_text_format_is_a_config_error():
    with pytest.raises(ConfigError, match="model.text_format"):
        dataclasses.replace(load_config("demo").model, text_format="cls")


def test_converted_albef_weights_read_captions_as_albef_does(folders):
    assert json.loads((folders["converted"] / "config.json").read_text())["model"]["text_format"] == "cls_only"
    model = load_model(folders["converted"])
    tokenizer = load_model_tokenizer(folders["converted"], model)
    hidden, feats, mask = encode_captions(model, tokenizer, CAPTIONS, "cpu", progress=False)
    ids, albef_mask = padded([[CLS, *words] for words in word_ids(CAPTIONS)])  # ALBEF's: no [SEP]
    assert torch.equal(mask, albef_mask)
    with torch.no_grad():
        expected_hidden, expected = model.encode_text(ids, albef_mask)
    assert torch.equal(feats, expected) and torch.equal(hidden, expected_hidden)
    # the same captions with [SEP] appended: features the imported weights were never trained on
    _, with_sep, _ = encode_captions(model, load_tokenizer(), CAPTIONS, "cpu", progress=False)
    assert not torch.allclose(with_sep, feats, atol=1e-4)
    # fine-tuning collates with the same tokenizer
    batch = Collator(tokenizer, max_tokens=30)([{"image": torch.zeros(3, 8, 8), "caption": c, "index": i, "group_id": i}
                                                for i, c in enumerate(CAPTIONS)])  # fmt: skip
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], albef_mask)


def test_gritvlp_exports_keep_sep_and_old_configs_read_as_cls_sep(folders, tmp_path):
    export = shutil.copytree(folders["export"], tmp_path / "export")
    config = json.loads((export / "config.json").read_text())
    assert config["model"]["text_format"] == "cls_sep"
    ids, mask = padded([[CLS, *words, SEP] for words in word_ids(CAPTIONS)])
    model = load_model(export)
    _, feats, got_mask = encode_captions(model, load_model_tokenizer(export, model), CAPTIONS, "cpu", progress=False)
    with torch.no_grad():
        assert torch.equal(got_mask, mask) and torch.equal(feats, model.encode_text(ids, mask)[1])
    del config["model"]["text_format"]  # a config.json written before the field existed
    (export / "config.json").write_text(json.dumps(config))
    old = load_model(export)
    assert old.config.text_format == "cls_sep"
    assert load_model_tokenizer(export, old)("a cat")["input_ids"][-1] == SEP


def test_training_tokenizer_follows_the_model_config():
    tokenizer, special = tokenizer_and_special_tokens(load_config("demo"))
    assert tokenizer("a cat")["input_ids"][-1] == SEP and special["sep"] == SEP
    tokenizer, _ = tokenizer_and_special_tokens(load_config("demo", ["model.text_format=cls_only"]))
    assert tokenizer("a cat")["input_ids"] == [CLS, *word_ids(["a cat"])[0]]


def test_to_albef_warns_that_albef_code_drops_sep(folders, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="gritvlp.albef"):
        convert_albef.main(["to-albef", str(folders["export"]), str(tmp_path / "a.pth"), "--queue-size", "8"])
    assert "tokenises without [SEP]" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gritvlp.albef"):
        convert_albef.main(["to-albef", str(folders["converted"]), str(tmp_path / "b.pth"), "--queue-size", "8"])
    assert "[SEP]" not in caplog.text


def test_mining_filter_from_albef_weights_reads_the_batches_without_sep(folders):
    filter_model = load_filter_model(folders["pth"], 64, albef_preset="demo")
    assert filter_model.config.text_format == "cls_only"
    g = torch.Generator().manual_seed(0)
    images = torch.randn(len(CAPTIONS), 3, 64, 64, generator=g)
    rows, texts = torch.tensor([0, 1, 2, 2]), torch.tensor([1, 2, 0, 2])
    sep_ids, sep_mask = padded([[CLS, *words, SEP] for words in word_ids(CAPTIONS)])  # a training batch
    ids, mask = padded([[CLS, *words] for words in word_ids(CAPTIONS)])
    mined = ConnectionMiner(filter_model, batch_format="cls_sep").match_probability(images, sep_ids, sep_mask, rows, texts)  # fmt: skip
    own = ConnectionMiner(filter_model).match_probability(images, ids, mask, rows, texts)
    torch.testing.assert_close(mined, own, rtol=1e-5, atol=1e-6)
    unconverted = ConnectionMiner(filter_model).match_probability(images, sep_ids, sep_mask, rows, texts)
    assert not torch.allclose(unconverted, own, atol=1e-4)


def test_a_filter_reading_sep_cannot_judge_batches_without_it(folders):
    with pytest.raises(ValueError, match="reads captions as cls_sep"):
        ConnectionMiner(load_model(folders["export"]), batch_format="cls_only")
