"""gritvlp.kernels: the loss kernels the objectives call.

Dispatch: CUDA tensors use the fused Triton kernels when they are available, everything else the
PyTorch reference. GRITVLP_KERNELS=reference or =triton forces one path (triton on CPU tensors needs
TRITON_INTERPRET=1, set before import).
"""

from __future__ import annotations

import os

from . import reference
from .reference import ITCOutput

# The fused modules are imported here, before the dispatch functions below are defined: importing a submodule
# binds it as an attribute of this package, and `lm_loss` names both a submodule and a dispatch function. Bound
# now, the name is taken back by the function below; a later import finds the module loaded and binds nothing.
try:
    from . import itc as _fused_itc
    from . import lm_loss as _fused_lm
except ImportError:  # triton missing: the reference serves every call
    _fused_itc = _fused_lm = None

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
    if _fused_itc is None or _fused_lm is None:
        return None
    return _fused_itc, _fused_lm


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
