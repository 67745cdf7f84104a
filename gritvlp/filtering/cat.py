"""DiHT's CAT filter (Radenovic et al., CVPR 2023): keep an image-text pair only when its caption is Complex
enough, describes an Action, and is not mostly Text spotted in the image.

- Complexity: DiHT measures it on the caption's dependency tree. Here it is the largest number of dependents
  (children) of any one token, punctuation not counted: "a dog" scores 1, "a brown dog" 2, "a dog runs on the
  beach" 2 (runs <- dog, on). Pairs scoring below `min_complexity` are dropped.
- Action: some subject (nsubj / nsubjpass) depends on a verb or an auxiliary ("a dog runs", "a cake is
  eaten", "the sky is blue"); "running on the beach" has a verb but no subject and is dropped.
- Text spotting: the words (2+ letters or digits, case-folded) that Tesseract reads in the image are matched
  against the caption's distinct words; a pair is dropped when the share of caption words found in the image
  exceeds `max_text_overlap`, i.e. the caption mostly transcribes text in the picture.

Defaults: min_complexity = 2 and max_text_overlap = 0.5 (DiHT's CAT kept ~438M of ~1.9B LAION pairs). Neither
number could be checked against the paper's own text: 2 is the smallest score that asks some word for more than
one dependent (a bare "a dog" scores 1), and 0.5 reads "the caption is largely spotted text" as more than half
of its words. Both are options of scripts/filter_cat.py.

Each dropped pair is counted under the first rule it fails, in the order above; OCR, the slow part, runs only
for pairs that pass the two caption rules.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from gritvlp.filtering.ocr import Ocr
from gritvlp.filtering.parse import Parser, Token

RULES = ("complexity", "action", "text_spotting")
UNREADABLE = "unreadable"  # no caption or image member, or image bytes that cannot be decoded
REASONS = (*RULES, UNREADABLE)

SUBJECT_DEPS = frozenset({"nsubj", "nsubjpass", "nsubj:pass"})  # spaCy English labels, and UD's for other models
ACTION_HEADS = frozenset({"VERB", "AUX"})
_WORD = re.compile(r"[^\W_]+")


@dataclass(frozen=True)
class Thresholds:
    min_complexity: int = 2
    max_text_overlap: float = 0.5


def complexity(tokens: list[Token]) -> int:
    """The largest number of non-punctuation children of any token."""
    children = Counter(t.head for i, t in enumerate(tokens) if t.head != i and t.dep != "punct" and t.pos != "PUNCT")
    return max(children.values(), default=0)


def has_action(tokens: list[Token]) -> bool:
    return any(t.dep in SUBJECT_DEPS and tokens[t.head].pos in ACTION_HEADS for t in tokens)


def words(text: str) -> set[str]:
    # one-character words are left out: Tesseract reads stray marks as "a", "i", "l" and captions are full of "a"
    return {w for w in _WORD.findall(text.lower()) if len(w) >= 2}


def text_overlap(caption: str, ocr_text: str) -> float:
    """Share of the caption's distinct words that also occur in the text read from the image."""
    caption_words = words(caption)
    if not caption_words:
        return 0.0
    return len(caption_words & words(ocr_text)) / len(caption_words)


def failed_rule(caption: str, image: bytes, parse: Parser, ocr: Ocr, thresholds: Thresholds) -> str | None:
    """The first CAT rule the pair fails, or None when it is kept. OCR errors propagate to the caller."""
    tokens = parse(caption)
    if complexity(tokens) < thresholds.min_complexity:
        return "complexity"
    if not has_action(tokens):
        return "action"
    if text_overlap(caption, ocr(image)) > thresholds.max_text_overlap:
        return "text_spotting"
    return None
