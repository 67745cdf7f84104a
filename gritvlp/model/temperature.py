"""The learnable contrastive temperature, kept within its bounds without losing its gradient."""

from __future__ import annotations

import torch


class _BoundedTemperature(torch.autograd.Function):
    """Forward: the parameter clamped to [low, high]. Backward: the gradient passes while the parameter is within
    the bounds, and beyond a bound only when a descent step (parameter -= lr * grad) brings it back.

    A clamp in the graph has zero gradient at and beyond a bound, so a temperature that reaches 0.001 stays there
    for good; clamping the parameter in place (ALBEF) does not reach the fp32 master copy that ZeRO's optimizer
    updates. Here the value used is always within the bounds, the parameter strays at most a few optimizer steps
    beyond one, and any gradient pointing back inside moves it.
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
