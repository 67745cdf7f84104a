"""Zero-shot image classification with the contrastive features (CLIP's protocol, as DiHT evaluates).

A class's embedding is the mean of its prompts' L2-normalised text features, normalised again; an image is assigned
the classes of highest cosine similarity. Reported: top-1 and top-5 accuracy and the mean per-class recall (top-1
accuracy of each class, averaged over classes: what CLIP_benchmark calls mean_per_class_recall), in percent. A class
ranks above the true one when it scores at least as high (a tie counts as wrong, so a constant score earns nothing).

Prompts come in CLIP_benchmark's layout: a class-name file {dataset: [names]} (or a plain list) and a template file
{dataset: [templates with "{c}"]} (or a plain list); a dataset's templates may instead map each class name to its
own full prompts.

Under torch.distributed each rank encodes a contiguous share of the images; per-class counts are summed across ranks,
so every rank returns the full result.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Subset

from .classification_data import ClassificationSet
from .features import encode_captions, encode_images

TOP_K = (1, 5)


def load_prompt_file(path: str | Path, dataset: str | None = None):
    """A list of class names or templates, or a dataset's entry of a {dataset: ...} file (CLIP_benchmark's
    en_classnames.json / en_zeroshot_classification_templates.json)."""
    content = json.loads(Path(path).read_text())
    if isinstance(content, list):
        return content
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a list or a {{dataset: ...}} object")
    if dataset is None:
        if len(content) != 1:
            raise ValueError(f"{path} holds {len(content)} datasets; name one of {sorted(content)[:10]}")
        dataset = next(iter(content))
    if dataset not in content:
        raise KeyError(f"{path} has no dataset {dataset!r}; it has {sorted(content)[:10]}")
    return content[dataset]


def prompts_of(classname: str, templates: list[str] | dict[str, list[str]]) -> list[str]:
    if isinstance(templates, dict):
        if classname not in templates:
            raise KeyError(f"the class-specific templates have no prompts for {classname!r}")
        return list(templates[classname])
    return [template.replace("{c}", classname) for template in templates]


@torch.no_grad()
def class_embeddings(model, tokenizer, classnames, templates, device, max_tokens: int = 30, batch_size: int = 256):
    """[C, E] normalised class embeddings: per class, the renormalised mean of its prompts' normalised features."""
    prompts = [prompts_of(name, templates) for name in classnames]
    flat = [p for class_prompts in prompts for p in class_prompts]
    if not flat:
        raise ValueError("no prompt: give at least one template")
    _, text_feat, _ = encode_captions(model, tokenizer, flat, device, max_tokens, batch_size, progress=False)
    text_feat = F.normalize(text_feat.float(), dim=-1)
    sizes = torch.tensor([len(p) for p in prompts], device=text_feat.device)
    owner = torch.repeat_interleave(torch.arange(len(classnames), device=text_feat.device), sizes)
    sums = torch.zeros(len(classnames), text_feat.shape[1], device=text_feat.device).index_add_(0, owner, text_feat)
    return F.normalize(sums, dim=-1)


def true_class_ranks(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N] how many other classes score at least as high as the true one (0: correct at top-1)."""
    true = logits.gather(1, labels[:, None])
    return (logits >= true).sum(dim=1) - 1


def class_counts(ranks: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, 1 + len(TOP_K)]: per class, its images and how many are right within each top k."""
    columns = [torch.ones_like(ranks)] + [(ranks < k).long() for k in TOP_K]
    counts = torch.zeros(num_classes, len(columns), dtype=torch.long, device=ranks.device)
    return counts.index_add_(0, labels, torch.stack(columns, dim=1))


def metrics_from_counts(counts: torch.Tensor) -> dict[str, float]:
    counts = counts.double()
    total = counts[:, 0].sum().clamp(min=1)
    out = {f"top{k}": 100.0 * float(counts[:, 1 + i].sum() / total) for i, k in enumerate(TOP_K)}
    present = counts[:, 0] > 0
    out["mean_per_class_recall"] = 100.0 * float((counts[present, 1] / counts[present, 0]).mean())
    out["num_images"] = int(counts[:, 0].sum())
    return out


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def image_features(model, data: ClassificationSet, device, batch_size: int = 64, num_workers: int = 0,
                   progress: bool = True, rows: slice | None = None) -> torch.Tensor:  # fmt: skip
    """[N, E] normalised image features of data.images (or of the rows slice), in order."""
    images = data.images if rows is None else Subset(data.images, range(len(data.images))[rows])
    if len(images) == 0:
        return torch.empty(0, model.config.embed_dim, device=device)
    _, feats = encode_images(model, images, device, batch_size, num_workers, progress)
    return F.normalize(feats.float(), dim=-1)


@torch.no_grad()
def evaluate_zeroshot(model, data: ClassificationSet, device, tokenizer=None, *, batch_size: int = 64,
                      max_tokens: int = 30, num_workers: int = 0, progress: bool = True) -> dict:  # fmt: skip
    """{top1, top5, mean_per_class_recall, num_images, num_classes} of a ClassificationSet. Every rank of an
    initialised process group must call this."""
    if tokenizer is None:
        from gritvlp.data.text import load_tokenizer

        tokenizer = load_tokenizer(model.config.tokenizer, model.config.text_format)
    rank, world_size = _world()
    rows = slice(rank * len(data.labels) // world_size, (rank + 1) * len(data.labels) // world_size)
    was_training = model.training
    model.eval()
    try:
        classes = class_embeddings(model, tokenizer, data.classnames, data.templates, device, max_tokens)
        feats = image_features(model, data, device, batch_size, num_workers, progress and rank == 0, rows)
    finally:
        model.train(was_training)
    labels = data.labels[rows].to(classes.device)
    counts = class_counts(true_class_ranks(feats @ classes.T, labels), labels, data.num_classes)
    if world_size > 1:
        dist.all_reduce(counts)
    return {**metrics_from_counts(counts.cpu()), "num_classes": data.num_classes}
