"""DiHT's CAT filtering (Complexity, Action, Text spotting) of image-text shards; see cat.py for the rules."""

from gritvlp.filtering.cat import Thresholds, complexity, failed_rule, has_action, text_overlap
from gritvlp.filtering.parse import Token
from gritvlp.filtering.runner import FilterJob, run_filter

__all__ = ["FilterJob", "Thresholds", "Token", "complexity", "failed_rule", "has_action", "run_filter", "text_overlap"]
