"""Concept distillation (DiHT): the student's concept head on the image [CLS] token matches a frozen teacher's class
distribution.

Loss (Hinton et al.'s soft targets): T^2 * KL(p_T || softmax(z / T)) per image, averaged over the images that have
a target, with p_T the teacher's distribution at temperature T and z the student's logits; the T^2 keeps the
gradient's scale independent of T. Targets come either from the teacher run on the batch (p_T = softmax(teacher
logits / T)) or precomputed (scripts/precompute_concepts.py: the teacher's top-k classes and their probabilities at
T = 1, carried by the batch as concept_ids / concept_probs [B, K]). A precomputed distribution is tempered as
p_T ∝ p^(1/T), which equals softmax(logits / T) restricted to the stored classes; rows whose probabilities are all
0 (a sample without a target) are left out. With precomputed targets in the batch the teacher is not run.

Attributes (model.num_attributes > 0): a second, multi-label head on the same token, trained with binary
cross-entropy (with logits) against multi-hot or soft targets in [0, 1], always precomputed (KEY.json "concepts"
"attributes", carried by the batch as attribute_targets [B, A] and attribute_mask [B]): the mean over the attributes
of a row, averaged over the rows that have labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CONCEPT_KEYS = ("concept_ids", "concept_probs")
ATTRIBUTE_KEYS = ("attribute_targets", "attribute_mask")


def teacher_targets(teacher, images: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C] tempered teacher distributions and [B] row weights (all 1)."""
    with torch.no_grad():
        logits = teacher(images).float()
    return torch.softmax(logits / temperature, dim=1), torch.ones(logits.shape[0], device=logits.device)


def precomputed_targets(ids: torch.Tensor, probs: torch.Tensor, num_concepts: int, temperature: float):
    """Dense [B, C] tempered distributions from top-k ids / probabilities [B, K] (zero-padded), and [B] row weights:
    1 where the row has a target. scatter_add, so a padding entry (id 0, probability 0) adds nothing to class 0."""
    probs = probs.float().clamp(min=0) ** (1.0 / temperature)
    total = probs.sum(dim=1, keepdim=True)
    weights = (total.squeeze(1) > 0).float()
    normalised = probs / total.clamp(min=torch.finfo(probs.dtype).tiny)
    dense = torch.zeros(ids.shape[0], num_concepts, device=probs.device)
    return dense.scatter_add_(1, ids.long(), normalised), weights


def distill_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, temperature: float):
    """T^2 * KL(targets || softmax(logits / T)), the weighted mean over rows (0 when no row has a target, still
    connected to the graph so every rank runs the same backward)."""
    log_student = torch.log_softmax(logits.float() / temperature, dim=1)
    kl = (torch.xlogy(targets, targets) - targets * log_student).sum(dim=1)
    return temperature**2 * (kl * weights).sum() / weights.sum().clamp(min=1)


def attribute_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of [B, A] logits against [B, A] targets in [0, 1], the mean over the attributes of each
    row, then over the rows with labels (mask [B]); 0 when no row has any, still connected to the graph."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none").mean(dim=1)
    mask = mask.float()
    return (bce * mask).sum() / mask.sum().clamp(min=1)
