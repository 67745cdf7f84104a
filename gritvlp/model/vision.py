"""Image encoder: any timm Vision Transformer, optionally initialised from a local checkpoint."""

from __future__ import annotations

import logging

import timm
import torch
import torch.nn as nn

from .weights import load_state_dict_file

log = logging.getLogger("gritvlp.model")


class VisionEncoder(nn.Module):
    def __init__(self, name: str, image_size: int, kwargs: dict | None = None, weights: str | None = None):
        super().__init__()
        try:
            self.vit = timm.create_model(
                name, pretrained=False, num_classes=0, img_size=image_size, **(kwargs or {})
            )
        except RuntimeError as err:  # timm's "Unknown model" error
            raise ValueError(f"cannot build timm model '{name}': {err}") from err
        if not hasattr(self.vit, "forward_features") or not hasattr(self.vit, "pos_embed"):
            raise ValueError(f"'{name}' is not a timm Vision Transformer")
        self.width = self.vit.num_features
        if not all(m.fused_attn for m in self.vit.modules() if hasattr(m, "fused_attn")):
            log.warning("the ViT's fused attention is off (timm: TIMM_FUSED_ATTN=0 or exportable mode): every "
                        "block materialises its attention scores, slower and with more memory")  # fmt: skip
        if weights:
            self.load_weights(weights)

    def load_weights(self, path: str) -> None:
        """Loads a timm/DeiT checkpoint; position embeddings are interpolated to this image size."""
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = load_state_dict_file(path)
        state = checkpoint_filter_fn(state, self.vit)
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "head_dist.", "fc_norm."))}
        missing, unexpected = self.vit.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"vision weights {path} lack {len(missing)} tensors, e.g. {missing[:3]}")
        if unexpected:
            log.warning("vision weights %s: ignored %d unexpected tensors, e.g. %s", path, len(unexpected), unexpected[:3])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vit.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> tokens [B, 1 + patches, width], [CLS] first."""
        return self.vit.forward_features(images)
