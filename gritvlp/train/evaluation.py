"""Evaluation during pre-training: zero-shot retrieval on a held-out set every `eval.every_epochs` epochs (and, when
training on the demo set, its hard-negative accuracy and zero-shot classification by shape, colour and size), with the
best value so far.

A run that does not train ITM (objectives.itm_weight 0: the flm and diht presets) ranks by ITC alone: its ITM head
is as initialised, so a re-ranking by it would measure nothing. The re-ranked keys (r_mean, txt_r1, ...) then hold the
ITC ranking's figures (equal to itc_*, so best_r_mean follows it), and the demo's hard_itm_* accuracies, which the
same head scores, are not logged."""

from __future__ import annotations

import logging

import torch

from gritvlp.config import Config
from gritvlp.data.demo import is_demo_split
from gritvlp.eval.data import RetrievalSet, from_shards
from gritvlp.eval.retrieval import evaluate_retrieval
from gritvlp.train.data import barrier, demo_test_shards, is_main

log = logging.getLogger("gritvlp.train")


class EpochEvaluation:
    """Built once (the test set's captions and image list are read at start-up); called at the end of epochs."""

    def __init__(self, cfg: Config, tokenizer, device: torch.device):
        self.cfg, self.tokenizer, self.device = cfg, tokenizer, device
        pattern = cfg.eval.test_shards or (demo_test_shards(cfg) if not cfg.data.train_shards else "")
        self.on_demo = pattern != "" and is_demo_split(pattern)  # the demo's scenes: its own evaluations too
        self.test_pattern = pattern
        self.retrieval: RetrievalSet | None = None
        if pattern and cfg.eval.every_epochs > 0:
            self.retrieval = self._test_set(pattern)
        self.best: dict[str, float] = {}
        self.zero_shot_sets = None
        self.itm_trained = cfg.objectives.itm_weight > 0
        if self.enabled and not self.itm_trained and is_main():
            log.info("objectives.itm_weight is 0: the ITM head is not trained, so evaluation ranks by ITC alone "
                     "(eval/r_mean and the other re-ranked figures equal eval/itc_*; no eval/hard_itm_*)")  # fmt: skip

    def _test_set(self, pattern: str) -> RetrievalSet:
        # rank 0 first: it builds (and caches) the test shards' index, so ranks do not race writing it
        size, words, index_dir = self.cfg.model.image_size, self.cfg.data.max_words, self.cfg.data.index_dir
        if is_main():
            test_set = from_shards(pattern, size, words, progress=True, index_dir=index_dir)
        barrier()
        if not is_main():
            test_set = from_shards(pattern, size, words, progress=False, index_dir=index_dir)
        return test_set

    @property
    def enabled(self) -> bool:
        return self.retrieval is not None

    def due(self, epochs_done: int) -> bool:
        return self.enabled and epochs_done % self.cfg.eval.every_epochs == 0

    def __call__(self, model) -> dict[str, float]:
        """Every rank must call this (the re-ranking is split across ranks). Returns the metrics and, for each
        one, its best so far under 'best_<name>'."""
        metrics = evaluate_retrieval(
            model, self.retrieval, self.cfg.eval.k_test if self.itm_trained else 0, self.device, self.tokenizer,
            batch_size=self.cfg.eval.batch_size, max_tokens=self.cfg.data.max_tokens, progress=is_main(),
            rerank_score=self.cfg.eval.rerank_score,
        )  # fmt: skip
        metrics = {k: float(v) for k, v in metrics.items() if k not in ("num_images", "num_captions", "k_test")}
        if self.on_demo and self.cfg.eval.hard_negatives:
            metrics.update(self._hard_negatives(model))
        if self.on_demo and self.cfg.eval.zero_shot:
            metrics.update(self._zero_shot(model))
        for name, value in metrics.items():
            self.best[name] = max(self.best.get(name, value), value)
        return {**metrics, **{f"best_{k}": v for k, v in self.best.items()}}

    def _hard_negatives(self, model) -> dict[str, float]:
        from gritvlp.eval.hard_negatives import evaluate_hard_negatives

        result = evaluate_hard_negatives(model, self.test_pattern, self.device, self.tokenizer)
        scorers = ("itm", "itc") if self.itm_trained else ("itc",)
        return {f"hard_{scorer}_{kind}": float(acc) for scorer, by_kind in result.items() if scorer in scorers
                for kind, acc in by_kind.items()}  # fmt: skip

    def _zero_shot(self, model) -> dict[str, float]:
        from gritvlp.eval.classification_data import demo_attribute_sets
        from gritvlp.eval.zeroshot import evaluate_zeroshot

        if self.zero_shot_sets is None:  # read once, on first use
            self.zero_shot_sets = demo_attribute_sets(self.test_pattern, self.cfg.model.image_size)
        metrics = {}
        for data in self.zero_shot_sets:
            result = evaluate_zeroshot(model, data, self.device, self.tokenizer, batch_size=self.cfg.eval.batch_size,
                                       max_tokens=self.cfg.data.max_tokens, progress=False)  # fmt: skip
            metrics[f"zs_{data.name}_top1"] = result["top1"]
            metrics[f"zs_{data.name}_mean_recall"] = result["mean_per_class_recall"]
        return metrics

    def state_dict(self) -> dict:
        return {"best": dict(self.best)}

    def load_state_dict(self, state: dict) -> None:
        self.best = dict(state.get("best", {}))
