"""ALBEF's RandomAugment on a [B, 3, S, S] uint8 batch on any device, from the choices drawn on the host
(gritvlp.data.encoded_images).

Each of the N draws is one pass over the batch, in order; a sample applies at most one operation per draw, so the
samples of a draw are grouped by operation. Colour operations become per-sample, per-channel lookup tables applied
in one gather: AutoContrast from the channels' minima and maxima, Equalize from batched histograms, Brightness one
table. Sharpness runs the CPU path's own function on its group; every geometric operation of a draw is one batched
warp with the CPU path's matrices (transforms.affine_forward / warp_theta / warp_batch: bilinear, grey fill). The
tables use the CPU path's arithmetic (float64 AutoContrast, float32 Brightness, integer Equalize), so on identical
pixels the outputs are identical.
"""

from __future__ import annotations

import numpy as np
import torch

from gritvlp.data.transforms import (
    ALBEF_OPS,
    GEOMETRIC_OPS,
    affine_forward,
    brightness_table,
    sharpness,
    warp_batch,
    warp_theta,
)

_GEOMETRIC = {ALBEF_OPS.index(op) for op in GEOMETRIC_OPS}


def augment_batch(pixels: torch.Tensor, ops: torch.Tensor, applied: torch.Tensor, signs: torch.Tensor, level: float):
    """pixels [B, 3, S, S] uint8 (updated in place and returned); ops / applied / signs [B, N] host tensors as in
    EncodedBatch."""
    for slot in range(ops.shape[1]):
        chosen = torch.where(applied[:, slot], ops[:, slot], -1).tolist()
        _tables_pass(pixels, chosen, level)
        rows = _rows(chosen, {ALBEF_OPS.index("Sharpness")}, pixels.device)
        if rows is not None:
            pixels[rows] = sharpness(pixels[rows], level)
        _geometric_pass(pixels, chosen, signs[:, slot].tolist(), level)
    return pixels


def _rows(chosen: list[int], ops: set[int], device) -> torch.Tensor | None:
    rows = [row for row, op in enumerate(chosen) if op in ops]
    return torch.tensor(rows, device=device) if rows else None


def _tables_pass(pixels: torch.Tensor, chosen: list[int], level: float) -> None:
    makers = {"AutoContrast": autocontrast_tables, "Equalize": equalize_tables}
    makers["Brightness"] = lambda group: _brightness_tables(group, level)
    tables, rows = [], []
    for name, make in makers.items():
        group = _rows(chosen, {ALBEF_OPS.index(name)}, pixels.device)
        if group is not None:
            tables.append(make(pixels[group]))
            rows.append(group)
    if rows:
        rows = torch.cat(rows)
        pixels[rows] = apply_tables(pixels[rows], torch.cat(tables))


def apply_tables(pixels: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """[k, 3, H, W] uint8 through per-sample, per-channel tables [k, 3, 256] uint8, in one gather (int32 indices)."""
    k, channels = pixels.shape[:2]
    offsets = torch.arange(k * channels, device=pixels.device, dtype=torch.int32).mul_(256)
    return tables.reshape(-1)[pixels.int() + offsets.view(k, channels, 1, 1)]


def autocontrast_tables(pixels: torch.Tensor) -> torch.Tensor:
    """transforms._autocontrast_table per channel: [min, max] stretched to [0, 255] (float64, truncated)."""
    low = pixels.amin(dim=(-2, -1)).double()[..., None]
    high = pixels.amax(dim=(-2, -1)).double()[..., None]
    scale = 255 / (high - low).clamp_min(1)
    values = torch.arange(256, dtype=torch.float64, device=pixels.device)
    table = (values * scale - low * scale).clamp_(0, 255).to(torch.uint8)
    return torch.where(high > low, table, values.to(torch.uint8))


def equalize_tables(pixels: torch.Tensor) -> torch.Tensor:
    """transforms._equalize_table per channel (PIL's equalisation), from one bincount over the whole group."""
    k, channels = pixels.shape[:2]
    flat = pixels.reshape(k * channels, -1)
    offsets = torch.arange(k * channels, device=pixels.device, dtype=torch.int32).mul_(256)
    histogram = torch.bincount((flat.int() + offsets[:, None]).view(-1), minlength=k * channels * 256)
    histogram = histogram.view(k * channels, 256)
    last_used = histogram.gather(1, flat.amax(dim=1).long()[:, None])[:, 0]  # count of the highest value present
    step = (flat.shape[1] - last_used) // 255
    cumulative = torch.cat([torch.zeros_like(histogram[:, :1]), histogram[:, :-1].cumsum(1)], 1)
    table = ((cumulative + (step // 2)[:, None]) // step.clamp_min(1)[:, None]).clamp_(0, 255).to(torch.uint8)
    identity = torch.arange(256, device=pixels.device, dtype=torch.uint8)
    return torch.where((step > 0)[:, None], table, identity).view(k, channels, 256)


def _brightness_tables(pixels: torch.Tensor, level: float) -> torch.Tensor:
    table = torch.from_numpy(brightness_table(level)).to(pixels.device)
    return table.expand(*pixels.shape[:2], 256)


def _geometric_pass(pixels: torch.Tensor, chosen: list[int], signs: list[int], level: float) -> None:
    rows = [row for row, op in enumerate(chosen) if op in _GEOMETRIC]
    if not rows:
        return
    height, width = pixels.shape[-2:]
    thetas = [
        warp_theta(affine_forward(ALBEF_OPS[chosen[row]], signs[row] * level, width, height), width, height)
        for row in rows
    ]
    theta = torch.from_numpy(np.stack(thetas)).to(device=pixels.device, dtype=torch.float32)
    index = torch.tensor(rows, device=pixels.device)
    pixels[index] = warp_batch(pixels[index], theta)
