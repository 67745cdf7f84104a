"""Filter image-text shards with DiHT's CAT rules: Complexity, Action, Text spotting.

python scripts/filter_cat.py IN_SHARDS... --out OUT_DIR [--spacy-model en_core_web_sm] [--min-complexity 2]
                             [--max-text-overlap 0.5] [--action-rule {verb,verb_or_aux}] [--workers N]
                             [--no-progress]

IN_SHARDS are local tars in img2dataset's layout (KEY.jpg, KEY.txt, KEY.json), given as paths, globs, brace patterns
({00000..00099}) or folders. A pair is kept when its caption's dependency tree is complex enough (some word has
at least --min-complexity dependents), the caption has a subject attached to a verb (an action: DiHT's rule,
--action-rule verb; verb_or_aux also takes the subject of a copula or auxiliary, as in "the sky is blue"), and at
most --max-text-overlap of its words are read (by Tesseract OCR) in the image. See gritvlp/filtering/cat.py.

Writes OUT_DIR/<shard name> for every input shard (the kept samples, members and bytes unchanged),
OUT_DIR/<shard name>.cat.json per finished shard, and OUT_DIR/cat_report.json: kept and dropped pairs per rule,
per shard and in total, with the thresholds and action rule used. A killed run, started again with the same
arguments, resumes at the next unfinished shard.

Needs (pip install -e ".[filter]" installs the Python parts):
    python -m pip install spacy && python -m spacy download en_core_web_sm
    apt-get install tesseract-ocr && python -m pip install pytesseract

Example:
    python scripts/filter_cat.py /data/laion/{00000..00099}.tar --out /data/laion_cat --workers 8
"""

import argparse
import os
import sys

from gritvlp.filtering.cat import ACTION_RULES, Thresholds
from gritvlp.filtering.ocr import TesseractMissing, check_tesseract, tesseract_ocr
from gritvlp.filtering.parse import SpacyModelMissing, load_spacy_parser
from gritvlp.filtering.report import format_table
from gritvlp.filtering.runner import REPORT_NAME, FilterJob, run_filter


def parse_args(argv):
    defaults = Thresholds()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="+", metavar="IN_SHARDS", help="tar shards: paths, globs, {a..b}, folders")
    parser.add_argument("--out", required=True, metavar="OUT_DIR", help="folder for the filtered shards and report")
    parser.add_argument("--spacy-model", default="en_core_web_sm", help="installed spaCy pipeline with a parser")
    parser.add_argument("--min-complexity", type=int, default=defaults.min_complexity)
    parser.add_argument("--max-text-overlap", type=float, default=defaults.max_text_overlap)
    parser.add_argument(
        "--action-rule",
        choices=ACTION_RULES,
        default=defaults.action_rule,
        help="verb: a subject on a verb, DiHT's rule (default); verb_or_aux: also on a copula or auxiliary",
    )
    parser.add_argument("--workers", type=int, default=1, help="processes, one shard each at a time")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def load_tools(spacy_model: str):
    """The parser, after checking both spaCy's model and Tesseract; every missing piece is reported at once."""
    problems, parse = [], None
    try:
        parse = load_spacy_parser(spacy_model)
    except SpacyModelMissing as err:
        problems.append(str(err))
    try:
        check_tesseract()
    except TesseractMissing as err:
        problems.append(str(err))
    return parse, problems


def main(argv=None) -> int:
    args = parse_args(argv)
    # before any shard is touched: a missing model should cost seconds, not a partial run
    parse, problems = load_tools(args.spacy_model)
    if problems:
        print("\n\n".join(problems), file=sys.stderr)
        return 2
    # imported here: it pulls in torch, seconds that a missing tool should not cost
    from gritvlp.data.shards import expand_shards

    shards = expand_shards(args.shards)
    thresholds = Thresholds(args.min_complexity, args.max_text_overlap, args.action_rule)
    job = FilterJob(args.out, parse, tesseract_ocr, thresholds, args.spacy_model)
    report = run_filter(shards, job, args.workers, progress=not args.no_progress)
    print(format_table(report))
    print(f"report: {os.path.join(args.out, REPORT_NAME)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
