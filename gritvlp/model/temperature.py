"""The learnable contrastive temperature, kept within its bounds without losing its gradient."""

from __future__ import annotations

import torch


class _BoundedTemperature(torch.autograd.Function):
    """Forward: the parameter clamped to [low, high]. Backward: the gradient passes while the parameter is within
    the bounds, and beyond a bound only when a descent step (parameter -= lr * grad) brings it back.

    A clamp in the graph has zero gradient beyond a bound, so a parameter past one could never come back. Training
    also clamps the stored value in place after every optimizer step, as ALBEF does at every forward
    (gritvlp.train.step.clamp_stored, the optimizer's fp32 master copy included). A low-precision copy may still sit
    just past a bound (bf16's nearest value to 0.001 is 0.00099945), and weights trained without that clamp far past
    one: the gradient pointing back inside still moves them.
    """

    @staticmethod
    def forward(ctx, raw: torch.Tensor, low: float, high: float) -> torch.Tensor:
        ctx.save_for_backward(raw)
        ctx.bounds = (low, high)
        return raw.clamp(low, high)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (raw,) = ctx.saved_tensors
        low, high = ctx.bounds
        inside = (raw >= low) & (raw <= high)
        back_inside = inside | ((raw < low) & (grad < 0)) | ((raw > high) & (grad > 0))
        return torch.where(back_inside, grad, torch.zeros_like(grad)), None, None


def bounded_temperature(raw: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """raw clamped to [low, high], with the gradient of _BoundedTemperature."""
    return _BoundedTemperature.apply(raw, low, high)
