"""Few-shot linear probes on frozen, L2-normalised image features: k labelled images per class.

Two probes, both linear classifiers logits = x W^T + b in the joint embedding space:
- CLIP's linear probe: multinomial logistic regression from scratch (scikit-learn, L-BFGS), its L2 strength C
  chosen on held-out validation shots (CLIP sweeps C on a validation split).
- DiHT's zero-shot-initialised probe (Radenovic et al., CVPR 2023, arXiv 2301.02280, few-shot linear probing): the
  classifier starts as the zero-shot head (W0 = the class embeddings scaled by the model's logit scale 1/temp,
  b = 0) and is trained by projected gradient descent: after every gradient step on the cross-entropy of the
  shots, W is projected back onto the ball ||W - W0||_F <= r. r = 0 is the zero-shot classifier itself, a large r
  is an ordinary probe from a zero-shot start, so the probe bridges zero-shot and few-shot. r is chosen on the same
  validation shots, from a grid relative to ||W0||_F; ties go to the smaller r (the zero-shot prior).

Both probes see the same k training and k validation images per class (drawn from a labelled pool without overlap),
so each uses 2k labelled images per class; they are tested on a separate test set.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

LOGREG_COSTS = tuple(float(c) for c in np.logspace(-2, 4, 13))
RADII = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)  # x ||W0||_F


@dataclass
class LinearClassifier:
    weight: torch.Tensor  # [C, E]
    bias: torch.Tensor  # [C]
    chosen: float  # the hyper-parameter validation picked (C, or r relative to ||W0||_F)

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        return feats @ self.weight.T + self.bias

    def accuracy(self, feats: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 accuracy in percent; a tie with the true class counts as wrong."""
        logits = self.logits(feats)
        true = logits.gather(1, labels[:, None])
        return 100.0 * float(((logits >= true).sum(dim=1) == 1).float().mean())


def few_shot_split(labels: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of k training and k validation samples per class, disjoint, drawn with the seed. A class with fewer
    than 2k samples is an error: the probes would see unequal classes."""
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        if len(members) < 2 * k:
            raise ValueError(f"class {label} has {len(members)} samples, fewer than 2 x {k} shots")
        chosen = members[torch.randperm(len(members), generator=generator)[: 2 * k]]
        train.append(chosen[:k])
        val.append(chosen[k:])
    return torch.cat(train), torch.cat(val)


def logistic_regression_probe(train_x, train_y, val_x, val_y, num_classes: int, costs=LOGREG_COSTS) -> LinearClassifier:
    """CLIP's probe: scikit-learn's multinomial logistic regression, C picked by validation accuracy."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    best = None
    for cost in costs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            fit = LogisticRegression(C=cost, max_iter=1000).fit(train_x.numpy(), train_y.numpy())
        probe = _as_classifier(fit, num_classes, train_x.shape[1], cost)
        score = probe.accuracy(val_x, val_y)
        if best is None or score > best[0]:
            best = (score, probe)
    return best[1]


def _as_classifier(fit, num_classes: int, dim: int, cost: float) -> LinearClassifier:
    """scikit-learn's coefficients over all num_classes (a class absent from the shots never wins)."""
    weight = torch.zeros(num_classes, dim)
    bias = torch.full((num_classes,), -1e9)
    coef, intercept = torch.as_tensor(fit.coef_, dtype=torch.float32), torch.as_tensor(fit.intercept_, dtype=torch.float32)
    classes = torch.as_tensor(fit.classes_)
    if len(classes) == 2:  # binary: one row for classes_[1] against classes_[0]
        coef, intercept = torch.cat([-coef / 2, coef / 2]), torch.cat([-intercept / 2, intercept / 2])
    weight[classes], bias[classes] = coef, intercept
    return LinearClassifier(weight, bias, cost)


def projected_gradient_descent(train_x, train_y, weight0: torch.Tensor, radius: float, steps: int = 300,
                               lr: float | None = None) -> LinearClassifier:  # fmt: skip
    """Full-batch gradient descent on the shots' cross-entropy from (W0, 0), W projected onto ||W - W0||_F <= radius
    after every step. Default step size 1 / L, with L = max ||x||^2 / 2 a bound on the curvature of the mean
    cross-entropy in W (its Hessian in the logits is at most 1/2), a step size that cannot diverge."""
    if lr is None:
        lr = 2.0 / float(train_x.pow(2).sum(dim=1).max().clamp(min=1e-12))
    weight = weight0.clone().requires_grad_(True)
    bias = torch.zeros(weight0.shape[0], requires_grad=True)
    for _ in range(steps if radius > 0 else 0):
        loss = F.cross_entropy(train_x @ weight.T + bias, train_y)
        grad_w, grad_b = torch.autograd.grad(loss, (weight, bias))
        with torch.no_grad():
            weight -= lr * grad_w
            bias -= lr * grad_b
            offset = weight - weight0
            norm = float(offset.norm())
            if norm > radius:
                weight.copy_(weight0 + offset * (radius / norm))
    return LinearClassifier(weight.detach(), bias.detach(), radius)


def zero_shot_init_probe(train_x, train_y, val_x, val_y, class_embeddings: torch.Tensor, logit_scale: float,
                         radii=RADII, steps: int = 300) -> LinearClassifier:  # fmt: skip
    """DiHT's probe: the radius (relative to ||W0||_F) picked by validation accuracy, ties to the smaller one."""
    weight0 = logit_scale * F.normalize(class_embeddings.float(), dim=-1)
    scale = float(weight0.norm())
    best = None
    for radius in sorted(radii):
        probe = projected_gradient_descent(train_x, train_y, weight0, radius * scale, steps)
        probe.chosen = radius
        score = probe.accuracy(val_x, val_y)
        if best is None or score > best[0]:
            best = (score, probe)
    return best[1]
