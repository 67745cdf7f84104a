"""Zero-shot / fine-tuned image-text retrieval as ALBEF evaluates it.

1. Encode every image and caption once; rank all candidates of each query by ITC similarity (computed in
   chunks of queries, keeping only each query's top k).
2. Re-rank each query's top k with the fusion encoder + ITM head: a top-k candidate scores its ITM match
   logit, every other candidate -100 (ALBEF's score matrices). rerank_score="itm+itc" adds the candidate's
   cosine similarity to the logit (BLIP's protocol), so a matching head that has not learned yet leaves the
   ITC order as it is instead of scrambling it.
3. Recall@1/5/10 both ways (gritvlp.eval.metrics). k_test = 0 skips step 2: the ITC ranking is the result, for a
   model whose ITM head was not trained.

Under torch.distributed every rank encodes the whole set, re-ranks a contiguous slice of the queries, and
the slices are summed into the full result on every rank. Each rank runs the same number of ITM batches,
so parameter-gathering wrappers (ZeRO-3) see matching collective calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from .data import RetrievalSet, from_samples
from .features import EncodedSet, encode_set
from .metrics import positive_ranks, recalls, retrieval_metrics

ALBEF_K_TEST = {"coco": 256, "flickr30k": 128}
# The largest share of a test set ALBEF re-ranks: 128 of Flickr30k's 1,000 images (COCO: 256 of 5,000)
MAX_K_TEST_SHARE = (128, 1000)
RERANK_SCORES = ("itm", "itm+itc")
NOT_IN_TOP_K = -100.0


def default_k_test(dataset: str, num_images: int) -> int:
    """The dataset's k_test, but never more than ALBEF's largest share of the test images (12.8%): on a small test
    set (the demo's 423 images) a top 256 would be most of the set, left to the ITM head alone to order."""
    share, of = MAX_K_TEST_SHARE
    return max(1, min(ALBEF_K_TEST[dataset], num_images * share // of))


@dataclass
class TopK:
    """The re-ranked top k of every query: candidate ids and their ITM scores, [Q, k] each."""

    indices: torch.Tensor
    scores: torch.Tensor

    def dense(self, num_candidates: int) -> torch.Tensor:
        """[Q, C] scores: ITM scores at the top k, -100 elsewhere."""
        out = torch.full((self.indices.shape[0], num_candidates), NOT_IN_TOP_K, dtype=torch.float32)
        return out.scatter_(1, self.indices.cpu(), self.scores.float().cpu())


def topk_similarity(query_feat, candidate_feat, k: int, chunk_size: int = 1024):
    """(values, indices) [Q, k] of each query's k most similar candidates, never holding more than
    chunk_size x C similarities."""
    candidates = candidate_feat.float()
    values, indices = [], []
    for start in range(0, query_feat.shape[0], chunk_size):
        sims = query_feat[start : start + chunk_size].float() @ candidates.T
        top = sims.topk(k, dim=1)
        values.append(top.values)
        indices.append(top.indices)
    if not values:
        return candidates.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long, device=candidates.device)
    return torch.cat(values), torch.cat(indices)


@torch.no_grad()
def itm_match_scores(
    model, encoded: EncodedSet, image_idx, text_idx, batch_size: int, num_batches=None, *, progress=False, desc="ITM"
):
    """ITM match logits (index 1 of the head) of the (image, caption) pairs, batch_size pairs at a time.

    A num_batches beyond the batches needed runs extra batches of the last pair, whose scores are dropped."""
    num_pairs = len(image_idx)
    num_batches = math.ceil(num_pairs / batch_size) if num_batches is None else num_batches
    image_idx = _pad(image_idx, num_batches * batch_size)
    text_idx = _pad(text_idx, num_batches * batch_size)
    scores = []
    for b in tqdm(range(num_batches), desc=desc, unit="batch", disable=not progress):
        pairs = slice(b * batch_size, (b + 1) * batch_size)
        images, texts = image_idx[pairs], text_idx[pairs]
        logits = model.itm_logits(encoded.image_tokens[images], encoded.text_hidden[texts], encoded.attention_mask[texts])  # fmt: skip
        scores.append(logits[:, 1].float())
    return torch.cat(scores)[:num_pairs] if scores else torch.zeros(0, device=image_idx.device)


def _pad(idx: torch.Tensor, length: int) -> torch.Tensor:
    if len(idx) >= length:
        return idx
    fill = idx[-1:] if len(idx) else idx.new_zeros(1)
    return torch.cat([idx, fill.expand(length - len(idx))])


def query_slice(num_queries: int, rank: int, world_size: int) -> slice:
    """The contiguous queries rank re-ranks: sizes differ by at most one."""
    return slice(rank * num_queries // world_size, (rank + 1) * num_queries // world_size)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rerank(
    model, encoded: EncodedSet, image_queries: bool, k: int, *, itm_batch_size=256, chunk_size=1024, progress=True,
    rerank_score: str = "itm",
) -> TopK:
    """Top-k by ITC, re-scored by ITM (rerank_score "itm") or by ITM + ITC ("itm+itc"), for every image query
    (image_queries) or every caption query."""
    if rerank_score not in RERANK_SCORES:
        raise ValueError(f"rerank_score must be one of {RERANK_SCORES}, got {rerank_score!r}")
    query_feat, candidate_feat = (
        (encoded.image_feat, encoded.text_feat) if image_queries else (encoded.text_feat, encoded.image_feat)
    )
    num_queries, k = query_feat.shape[0], min(k, candidate_feat.shape[0])
    rank, world_size = _world()
    rows = query_slice(num_queries, rank, world_size)
    top_sim, top_idx = topk_similarity(query_feat[rows], candidate_feat, k, chunk_size)
    query_idx = torch.arange(rows.start, rows.stop, device=top_idx.device)[:, None].expand_as(top_idx).flatten()
    image_idx, text_idx = (query_idx, top_idx.flatten()) if image_queries else (top_idx.flatten(), query_idx)
    largest_slice = math.ceil(num_queries / world_size) * k
    num_batches = math.ceil(largest_slice / itm_batch_size)
    desc = "re-ranking texts per image" if image_queries else "re-ranking images per text"
    scores = itm_match_scores(
        model, encoded, image_idx, text_idx, itm_batch_size, num_batches, progress=progress and rank == 0, desc=desc
    )
    scores = scores.view(-1, k)
    if rerank_score == "itm+itc":
        scores = scores + top_sim
    return _combine(TopK(top_idx, scores), rows, num_queries)


def _combine(local: TopK, rows: slice, num_queries: int) -> TopK:
    """Every rank's slice in one [Q, k] result on every rank (a sum: other ranks' rows are zero here)."""
    _, world_size = _world()
    if world_size == 1:
        return local
    k = local.indices.shape[1]
    indices = torch.zeros(num_queries, k, dtype=torch.long, device=local.indices.device)
    scores = torch.zeros(num_queries, k, dtype=torch.float32, device=local.scores.device)
    indices[rows] = local.indices
    scores[rows] = local.scores.float()
    dist.all_reduce(indices)
    dist.all_reduce(scores)
    return TopK(indices, scores)


@torch.no_grad()
def score_matrices(
    model, encoded: EncodedSet, k_test: int, *, itm_batch_size=256, chunk_size=1024, progress=True, rerank_score="itm"
):
    """ALBEF's score_matrix_i2t [N_img, N_txt] and score_matrix_t2i [N_txt, N_img], on the CPU."""
    options = dict(itm_batch_size=itm_batch_size, chunk_size=chunk_size, progress=progress, rerank_score=rerank_score)
    i2t = rerank(model, encoded, True, k_test, **options)
    t2i = rerank(model, encoded, False, k_test, **options)
    return i2t.dense(encoded.text_feat.shape[0]), t2i.dense(encoded.image_feat.shape[0])


def as_retrieval_set(data, num_workers: int = 0, progress: bool = True) -> RetrievalSet:
    """A RetrievalSet as it is; a DataLoader's dataset or a caption dataset (ShardDataset's items) converted."""
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, RetrievalSet):
        return data
    return from_samples(data, num_workers=num_workers, progress=progress)


@torch.no_grad()
def evaluate_retrieval(
    model,
    data,
    k_test: int,
    device,
    tokenizer=None,
    *,
    batch_size: int = 64,
    text_batch_size: int = 256,
    itm_batch_size: int = 256,
    max_tokens: int = 30,
    num_workers: int = 0,
    progress: bool = True,
    rerank_score: str = "itm",
) -> dict:
    """TR/IR@1/5/10, their means and r_mean (ALBEF's names, percentages) plus the set's size.

    model: a GritVLP (or anything with encode_image, encode_text, itm_logits) already on device.
    data: a RetrievalSet, a caption dataset such as ShardDataset's test split, or a DataLoader over one.
    rerank_score: "itm" (ALBEF) or "itm+itc" (BLIP), see the module docstring; the ITC ranking alone is
    reported too (itc_*). k_test = 0: no re-ranking, the re-ranked keys hold the ITC ranking's figures.
    tokenizer: defaults to the model config's. Every rank of an initialised process group must call this.
    """
    if tokenizer is None:
        from gritvlp.data.text import load_tokenizer

        tokenizer = load_tokenizer(model.config.tokenizer, model.config.text_format)
    rank, _ = _world()
    show = progress and rank == 0
    data = as_retrieval_set(data, num_workers, show)
    was_training = model.training
    model.eval()
    try:
        encoded = encode_set(
            model, data, tokenizer, device, batch_size=batch_size, text_batch_size=text_batch_size,
            max_tokens=max_tokens, num_workers=num_workers, progress=show,
        )  # fmt: skip
        if k_test > 0:
            score_i2t, score_t2i = score_matrices(
                model, encoded, k_test, itm_batch_size=itm_batch_size, progress=show, rerank_score=rerank_score
            )
    finally:
        model.train(was_training)
    itc = itc_metrics(encoded, data.txt2img)
    if k_test > 0:
        result = {**retrieval_metrics(score_i2t, score_t2i, data.txt2img), **itc}
    else:
        result = {**{key[len("itc_") :]: value for key, value in itc.items()}, **itc}
    return {**result, "num_images": data.num_images, "num_captions": len(data.captions), "k_test": k_test}


def itc_metrics(encoded: EncodedSet, txt2img: torch.Tensor, chunk_size: int = 1024) -> dict[str, float]:
    """Recall of the ITC similarity alone, before the ITM re-ranking (itc_txt_r1 ... itc_r_mean): what the
    contrastive features learned, apart from the matching head."""
    image_feat, text_feat = encoded.image_feat.float(), encoded.text_feat.float()
    txt2img = txt2img.to(image_feat.device)
    image_ids = torch.arange(image_feat.shape[0], device=image_feat.device)

    def ranks(queries, candidates, positive_of):
        parts = []
        for start in range(0, queries.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            parts.append(positive_ranks(queries[rows] @ candidates.T, positive_of(rows)))
        return torch.cat(parts)

    text_ranks = ranks(image_feat, text_feat, lambda rows: image_ids[rows, None] == txt2img[None, :])
    image_ranks = ranks(text_feat, image_feat, lambda rows: txt2img[rows, None] == image_ids[None, :])
    out = {**recalls(text_ranks, "itc_txt"), **recalls(image_ranks, "itc_img")}
    out["itc_r_mean"] = (out["itc_txt_r_mean"] + out["itc_img_r_mean"]) / 2
    return out
