"""The frozen concept teacher of DiHT's concept distillation: a timm image classifier from a local checkpoint.

Its class probabilities are the targets of the student's concept head (GritVLP.concept_head); the loss is the
objective's (gritvlp.objectives.distill). The teacher is never part of the student's state dict: it is not trained,
checkpointed or exported.
"""

from __future__ import annotations

import logging

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import create_transform, resolve_data_config

from .weights import load_state_dict_file

log = logging.getLogger("gritvlp.model")


class ConceptTeacher(nn.Module):
    """A frozen timm classifier. forward takes the training images (normalised with the student's mean and std,
    at the student's size) and feeds the teacher what it was trained on: its own size and normalisation."""

    def __init__(self, model: nn.Module, input_mean, input_std):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        config = teacher_data_config(model)
        self.size = tuple(config["input_size"][1:])
        shift = [(m - tm) / ts for m, tm, ts in zip(input_mean, config["mean"], config["std"])]
        scale = [s / ts for s, ts in zip(input_std, config["std"])]
        # x_teacher = (x * std + mean - teacher_mean) / teacher_std = x * scale + shift
        self.register_buffer("scale", torch.tensor(scale).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", torch.tensor(shift).view(1, 3, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: always in eval mode (no dropout, fixed norm statistics)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] student-normalised images -> [B, num_classes] logits (no gradient)."""
        x = images.to(self.scale.dtype) * self.scale + self.shift
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return self.model(x)


def build_teacher_model(name: str, weights: str, kwargs: dict | None = None) -> nn.Module:
    """The timm model `name` with the checkpoint's weights; its classifier takes the checkpoint's class count."""
    try:
        model = timm.create_model(name, pretrained=False, **(kwargs or {}))
    except RuntimeError as err:  # timm's "Unknown model" error
        raise ValueError(f"cannot build timm teacher '{name}': {err}") from err
    state = load_state_dict_file(weights)
    head = f"{model.pretrained_cfg.get('classifier', 'head')}.weight"
    if head in state and state[head].shape[0] != model.num_classes:
        model.reset_classifier(state[head].shape[0])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"teacher weights {weights} do not fit timm '{name}': missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    log.info("concept teacher %s from %s: %d classes", name, weights, model.num_classes)
    return model.eval().requires_grad_(False)


def teacher_data_config(model: nn.Module) -> dict:
    """timm's preprocessing of the model (mean, std, interpolation, crop), at the input size it was built for: a
    ViT built with img_size=... keeps its pretrained config's size, which it no longer accepts."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    args = {"input_size": (3, *size)} if size is not None else None
    return resolve_data_config(args=args, model=model)


def teacher_transform(model: nn.Module):
    """The teacher's own evaluation transform of a PIL image (resize, centre crop, its normalisation)."""
    return create_transform(**teacher_data_config(model), is_training=False)
