"""gritvlp.kernels: the loss kernels the objectives call, with one signature for both implementations (the fused
Triton kernels and the PyTorch reference; kernels/dispatch.py chooses, kernels/spec.py states the math).
"""

from __future__ import annotations

if __name__ == "kernels":
    # Imported as a top-level package because the repository root is on sys.path (`python -m ...` run there): this
    # folder would shadow the PyPI package named `kernels` (Hugging Face's, which transformers imports).
    from ._top_level import hand_over_to_installed_package

    hand_over_to_installed_package()
else:
    from .dispatch import BACKENDS, ITCTerms, backend_for, itc_terms, lm_loss, reference

    __all__ = ["BACKENDS", "ITCTerms", "itc_terms", "lm_loss", "backend_for", "reference"]
