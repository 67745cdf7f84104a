"""DiHT's CAT filter (Radenovic et al., CVPR 2023): keep an image-text pair only when its caption is Complex
enough, describes an Action, and is not mostly Text spotted in the image.

- Complexity: DiHT measures it on the caption's dependency tree. Here it is the largest number of dependents
  (children) of any one token, punctuation not counted: "a dog" scores 1, "a brown dog" 2, "a dog runs on the
  beach" 2 (runs <- dog, on). Pairs scoring below `min_complexity` are dropped.
- Action: DiHT's rule, a verb that governs a subject: some nsubj / nsubjpass depends on a token tagged VERB
  that is not a form of "be". "a dog runs", "a dog is running" (is: auxiliary of running) and "a cake is
  eaten" (passive subject of eaten) pass. A subject of a copula or auxiliary does not count: "the sky is blue"
  (sky <- is, an AUX) is dropped, and so are "there is a dog" (an expletive, no subject), "running on the
  beach" and "a dog on the beach" (no subject on a verb). `action_rule="verb_or_aux"` is a looser variant that
  also takes the subject of an auxiliary or copula, so "the sky is blue" passes.
- Text spotting: the words (2+ letters or digits, case-folded) that Tesseract reads in the image are matched
  against the caption's distinct words; a pair is dropped when the share of caption words found in the image
  exceeds `max_text_overlap`, i.e. the caption mostly transcribes text in the picture.

Defaults: min_complexity = 2 and max_text_overlap = 0.5 (DiHT's CAT kept ~438M of ~1.9B LAION pairs). DiHT's
paper text could not be checked for its exact threshold values, so both are this project's choices: 2 is the
smallest score that asks some word for more than one dependent (a bare "a dog" scores 1), and 0.5 reads "the
caption is largely spotted text" as more than half of its words. Both are options of scripts/filter_cat.py.

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

# spaCy English labels, and UD's for other models. Clausal subjects (csubj) are left out: they are rare in
# captions, and with the same subjects under both rules "verb" accepts exactly what "verb_or_aux" does minus
# the subjects of copulas and auxiliaries.
SUBJECT_DEPS = frozenset({"nsubj", "nsubjpass", "nsubj:pass"})
# The parser runs without a lemmatizer, so "be" is told by its forms: spaCy tags it VERB in "there is a dog",
# and other models may tag a copula VERB too.
BE_FORMS = frozenset({"be", "am", "is", "are", "was", "were", "been", "being", "'s", "'re", "'m", "’s", "’re", "’m"})
ACTION_HEAD = {
    "verb": lambda head: head.pos == "VERB" and head.text.lower() not in BE_FORMS,  # DiHT's rule
    "verb_or_aux": lambda head: head.pos in ("VERB", "AUX"),  # also the subject of a copula or auxiliary
}
ACTION_RULES = tuple(ACTION_HEAD)
_WORD = re.compile(r"[^\W_]+")


@dataclass(frozen=True)
class Thresholds:
    """Settings of the CAT rules; the report records them."""

    min_complexity: int = 2
    max_text_overlap: float = 0.5
    action_rule: str = "verb"  # one of ACTION_RULES

    def __post_init__(self):
        check_action_rule(self.action_rule)


def check_action_rule(rule: str) -> None:
    if rule not in ACTION_HEAD:
        raise ValueError(f"unknown action rule {rule!r}; choose one of {', '.join(ACTION_RULES)}")


def complexity(tokens: list[Token]) -> int:
    """The largest number of non-punctuation children of any token."""
    children = Counter(t.head for i, t in enumerate(tokens) if t.head != i and t.dep != "punct" and t.pos != "PUNCT")
    return max(children.values(), default=0)


def has_action(tokens: list[Token], rule: str = "verb") -> bool:
    """Some subject depends on a head that `rule` counts: under "verb" a token tagged VERB that is no form of
    "be", under "verb_or_aux" any VERB or AUX."""
    check_action_rule(rule)
    return any(t.dep in SUBJECT_DEPS and ACTION_HEAD[rule](tokens[t.head]) for t in tokens)


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
    if not has_action(tokens, thresholds.action_rule):
        return "action"
    if text_overlap(caption, ocr(image)) > thresholds.max_text_overlap:
        return "text_spotting"
    return None
