import pickle
import shutil

import pytest
import torch

from gritvlp.data.collate import Collator
from gritvlp.data.text import _bundled_vocab, clean_caption, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_clean_caption():
    assert clean_caption("  A Man's   DOG, running!  ", 30) == "a mans dog running"
    assert clean_caption("<person> rides a well-known bike/scooter.", 30) == "person rides a well known bike scooter"
    assert clean_caption('"Hi": yes; no? ~ok*', 30) == "hi yes no ok"
    assert clean_caption("one two three four five", 3) == "one two three"
    assert clean_caption("line\nbreak\ttab", 30) == "line break tab"
    assert clean_caption(" ... !!! ", 30) == ""


def test_tokenizer_offline_known_ids(tokenizer):
    ids = tokenizer("A red circle")["input_ids"]
    assert ids == [101, 1037, 2417, 4418, 102]  # [CLS] a red circle [SEP] in bert-base-uncased
    assert tokenizer.mask_token_id == 103 and tokenizer.pad_token_id == 0 and len(tokenizer) == 30522


def test_tokenizer_from_folder_and_errors(tmp_path):
    shutil.copy(_bundled_vocab(), tmp_path / "vocab.txt")
    assert load_tokenizer(str(tmp_path))("a red circle")["input_ids"] == [101, 1037, 2417, 4418, 102]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(str(tmp_path / "nowhere"))


def _sample(caption, index, size=8):
    return {"image": torch.full((3, size, size), float(index)), "caption": caption, "index": index, "group_id": index}


def test_collator_pads_truncates_and_skips(tokenizer):
    batch = Collator(tokenizer, max_tokens=6)([_sample("a red circle", 3), None, _sample("a b c d e f g h", 7)])
    assert batch["num_skipped"] == 1
    assert batch["image"].shape == (2, 3, 8, 8)
    assert batch["input_ids"].shape == (2, 6) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][0].tolist() == [101, 1037, 2417, 4418, 102, 0]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0]
    assert batch["input_ids"][1, -1].item() == 102  # truncated, still ends with [SEP]
    assert batch["index"].tolist() == [3, 7] and batch["group_id"].tolist() == [3, 7]
    assert batch["captions"] == ["a red circle", "a b c d e f g h"]


def test_collator_all_skipped(tokenizer):
    batch = Collator(tokenizer)([None, None])
    assert batch["num_skipped"] == 2 and batch["captions"] == []
    assert batch["image"].shape[0] == 0 and batch["input_ids"].shape[0] == 0 and batch["index"].numel() == 0


def test_cls_only_tokenizer_writes_no_sep_and_keeps_a_word_more(tmp_path):
    cls_only = load_tokenizer(text_format="cls_only")
    batch = Collator(cls_only, max_tokens=6)([_sample("a red circle", 0), _sample("a b c d e f g h", 1)])
    assert batch["input_ids"].tolist() == [[101, 1037, 2417, 4418, 0, 0], [101, 1037, 1038, 1039, 1040, 1041]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    # the format survives pickling (DataLoader workers); a folder's tokenizer takes the format asked for
    assert pickle.loads(pickle.dumps(cls_only))("a red circle")["input_ids"] == [101, 1037, 2417, 4418]
    cls_only.save_pretrained(str(tmp_path))
    assert load_tokenizer(str(tmp_path))("a red circle")["input_ids"] == [101, 1037, 2417, 4418, 102]
    assert load_tokenizer(str(tmp_path), "cls_only")("a red circle")["input_ids"] == [101, 1037, 2417, 4418]
    with pytest.raises(ValueError, match="text format must be one of"):
        load_tokenizer(text_format="cls")
