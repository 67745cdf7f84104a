"""Recall@K of image-text retrieval, with ALBEF's result names (txt_r1 ... img_r_mean, r_mean).

A query's rank is the 0-based position of its best-ranked correct candidate. Ties break against the correct
candidates (a wrong candidate scoring the same ranks first), so a constant score earns no recall.
"""

from __future__ import annotations

import torch

RECALL_AT = (1, 5, 10)


def positive_ranks(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """scores, positive [Q, C]: for each query, how many wrong candidates score at least its best correct one."""
    best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
    return ((scores >= best) & ~positive).sum(dim=1)


def ranks_in_chunks(scores: torch.Tensor, positive_of_rows, chunk: int = 1024) -> torch.Tensor:
    """positive_ranks over row chunks, so that no [Q, C] boolean temporaries beyond one chunk exist."""
    parts = []
    for start in range(0, scores.shape[0], chunk):
        rows = slice(start, start + chunk)
        parts.append(positive_ranks(scores[rows].float(), positive_of_rows(rows)))
    return torch.cat(parts)


def recalls(ranks: torch.Tensor, prefix: str) -> dict[str, float]:
    out = {f"{prefix}_r{k}": 100.0 * int((ranks < k).sum()) / len(ranks) for k in RECALL_AT}
    out[f"{prefix}_r_mean"] = sum(out.values()) / len(RECALL_AT)
    return out


def retrieval_metrics(score_i2t: torch.Tensor, score_t2i: torch.Tensor, txt2img: torch.Tensor) -> dict[str, float]:
    """score_i2t [N_img, N_txt], score_t2i [N_txt, N_img]; txt2img [N_txt] the image of each caption.

    Text retrieval (txt_*) counts an image's best-ranked caption; image retrieval (img_*) ranks each caption's image.
    """
    txt2img = txt2img.to(score_i2t.device)
    image_ids = torch.arange(score_i2t.shape[0], device=score_i2t.device)
    text_ranks = ranks_in_chunks(score_i2t, lambda rows: image_ids[rows, None] == txt2img[None, :])
    image_ranks = ranks_in_chunks(score_t2i, lambda rows: txt2img[rows, None] == image_ids[None, :])
    out = {**recalls(text_ranks, "txt"), **recalls(image_ranks, "img")}
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out
