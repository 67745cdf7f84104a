"""gritvlp.kernels: the loss kernels the objectives call.

Dispatch: CUDA tensors use the fused Triton kernels when they are available, everything else the
PyTorch reference. GRITVLP_KERNELS=reference or =triton forces one path (triton on CPU tensors needs
TRITON_INTERPRET=1, set before import).
"""

from __future__ import annotations

import os

from . import reference
from .reference import ITCOutput

__all__ = ["ITCOutput", "itc_loss", "lm_loss", "backend_for", "reference"]


def backend_for(tensor) -> str:
    forced = os.environ.get("GRITVLP_KERNELS", "auto").lower()
    if forced not in ("auto", "reference", "triton"):
        raise ValueError(f"GRITVLP_KERNELS must be auto, reference or triton, got {forced!r}")
    if forced != "auto":
        return forced
    return "triton" if tensor.is_cuda and _triton_available() else "reference"


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return _fused_modules() is not None


def _fused_modules():
    """The fused implementations, or None while they are not part of this build."""
    try:
        from . import itc as fused_itc  # noqa: F401
        from . import lm_loss as fused_lm  # noqa: F401
    except ImportError:
        return None
    return fused_itc, fused_lm


def itc_loss(image_feat, text_feat, temp, **kwargs) -> ITCOutput:
    if backend_for(image_feat) == "triton":
        fused_itc, _ = _fused_modules()
        return fused_itc.itc_loss(image_feat, text_feat, temp, **kwargs)
    return reference.itc_loss(image_feat, text_feat, temp, **kwargs)


def lm_loss(hidden, weight, bias, labels, **kwargs):
    if backend_for(hidden) == "triton":
        _, fused_lm = _fused_modules()
        return fused_lm.lm_loss(hidden, weight, bias, labels, **kwargs)
    return reference.lm_loss(hidden, weight, bias, labels, **kwargs)
