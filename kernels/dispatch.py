"""Which implementation serves a kernel call: `itc_terms` and `lm_loss` check their arguments once (kernels/spec.py,
which also states the math) and run either the fused Triton kernel or the PyTorch reference. Dispatch: CUDA tensors
use the fused kernels when Triton is available, everything else the reference. `backend=` or the environment variable
GRITVLP_KERNELS (auto | reference | triton) forces one; triton on CPU tensors needs TRITON_INTERPRET=1, set before
import.
"""

from __future__ import annotations

import os

import torch

from . import reference
from .spec import ITCTerms, itc_inputs, lm_inputs

# Importing a submodule binds it as an attribute of the package, and `lm_loss` names both a submodule and a function
# there: the package's __init__ imports this module (and so the fused modules) first and binds the functions after,
# so the name ends as the function; a later import finds the module loaded and binds nothing.
try:
    from . import itc as _fused_itc
    from . import lm_loss as _fused_lm
except ImportError:  # triton missing: the reference serves every call
    _fused_itc = _fused_lm = None

__all__ = ["ITCTerms", "itc_terms", "lm_loss", "backend_for", "reference"]
BACKENDS = ("auto", "reference", "triton")


def backend_for(tensor: torch.Tensor, backend: str | None = None) -> str:
    """'triton' or 'reference' for a call on `tensor`; `backend` (else GRITVLP_KERNELS) may force one."""
    chosen = (backend or os.environ.get("GRITVLP_KERNELS", "auto")).lower()
    if chosen not in BACKENDS:
        raise ValueError(f"the kernel backend must be one of {BACKENDS}, got {chosen!r}")
    if chosen != "auto":
        return chosen
    return "triton" if tensor.is_cuda and _fused_itc is not None else "reference"


def itc_terms(image_feat, text_feat, temp, *, backend: str | None = None, **kwargs) -> ITCTerms:
    """ITC terms of both directions and the ITM negatives; keyword arguments as spec.itc_inputs."""
    inputs = itc_inputs(image_feat, text_feat, temp, **kwargs)
    if backend_for(image_feat, backend) == "triton":
        return _fused_itc.itc_terms(inputs)
    return reference.itc_terms(inputs)


def lm_loss(hidden, weight, bias, labels, *, backend: str | None = None, **kwargs) -> torch.Tensor:
    """Masked-token cross-entropy; keyword arguments (ignore_index, label_smoothing) as spec.lm_inputs."""
    inputs = lm_inputs(hidden, weight, bias, labels, **kwargs)
    if backend_for(hidden, backend) == "triton":
        return _fused_lm.lm_loss(inputs)
    return reference.lm_loss(inputs)
