"""Dependency parses of captions in the form the CAT rules read, and a spaCy-backed parser.

The rules only need each token's relation to its head, its part of speech and the head's position, so any
parser (or a test) can supply them as a list of Token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

# spaCy models are versioned with spaCy's major.minor; used in the offline-install hint when spaCy is absent.
DEFAULT_MODEL_VERSION = "3.8.0"
MODEL_RELEASES = "https://github.com/explosion/spacy-models/releases/download"


@dataclass(frozen=True)
class Token:
    text: str
    dep: str  # relation to the head, as spaCy's Token.dep_ ("nsubj", "amod", "ROOT", ...)
    pos: str  # universal part of speech, as spaCy's Token.pos_ ("VERB", "AUX", "NOUN", ...)
    head: int  # index of the head token in the caption; the root points to itself


Parser = Callable[[str], list[Token]]


class SpacyModelMissing(RuntimeError):
    """spaCy or the named pipeline is not installed (or has no dependency parser)."""


def install_hint(model: str, model_version: str = DEFAULT_MODEL_VERSION) -> str:
    wheel = f"{MODEL_RELEASES}/{model}-{model_version}/{model}-{model_version}-py3-none-any.whl"
    return (
        f"Install spaCy and the model with:\n"
        f"    python -m pip install spacy && python -m spacy download {model}\n"
        f"On a machine without access to the model releases, download the wheel elsewhere and pip-install it:\n"
        f"    python -m pip install {wheel}\n"
        f"(the model version must match spaCy's major.minor version)"
    )


def _model_version_for(spacy_version: str) -> str:
    major, minor = spacy_version.split(".")[:2]
    return f"{major}.{minor}.0"


def load_spacy_parser(model: str) -> Parser:
    """A Parser backed by the installed spaCy pipeline `model` (name or path); SpacyModelMissing otherwise."""
    try:
        import spacy
    except ImportError:
        raise SpacyModelMissing(f"spaCy is not installed.\n{install_hint(model)}") from None
    version = _model_version_for(spacy.__version__)
    try:
        # the rules read only the parser's and the tagger's output; the other components would only cost time
        nlp = spacy.load(model, exclude=["ner", "lemmatizer", "textcat"])
    except OSError:
        raise SpacyModelMissing(f"spaCy model {model!r} is not installed.\n{install_hint(model, version)}") from None
    if "parser" not in nlp.pipe_names:
        hint = install_hint("en_core_web_sm", version)
        raise SpacyModelMissing(f"spaCy model {model!r} has no dependency parser; use one that has.\n{hint}")
    return partial(_parse_with, nlp)


def _parse_with(nlp, caption: str) -> list[Token]:
    return doc_to_tokens(nlp(caption))


def doc_to_tokens(doc) -> list[Token]:
    """spaCy Doc -> Tokens (Token.i indexes the whole Doc, so heads stay valid across sentences)."""
    return [Token(t.text, t.dep_, t.pos_, t.head.i) for t in doc]
