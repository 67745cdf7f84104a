"""A pseudo-random permutation of range(n) evaluated at chosen positions, without materialising it.

Each rank needs only its own share of an epoch's random order; torch.randperm(n) would make every rank hold all
of it (400M samples: 3.2 GB). A Feistel network over the smallest even number of bits covering n is a bijection
of [0, 2^bits); walking the cycle of any value that lands at or beyond n (applying the network again) restricts
it to a bijection of [0, n). The result is a pure function of (n, key).
"""

from __future__ import annotations

import torch

_ROUNDS = 4
# splitmix64's multipliers as signed int64 (torch has no uint64 arithmetic; products wrap around)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (logical shifts emulated by masking after the arithmetic shift)."""
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * _MIX1
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * _MIX2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def _round_keys(key: int) -> list[int]:
    keys, state = [], torch.tensor([key & ((1 << 63) - 1)], dtype=torch.long)
    for _ in range(_ROUNDS):
        state = _mix(state + _GOLDEN)
        keys.append(int(state))
    return keys


def _feistel(x: torch.Tensor, half_bits: int, keys: list[int]) -> torch.Tensor:
    mask = (1 << half_bits) - 1
    left, right = x >> half_bits, x & mask
    for key in keys:
        left, right = right, left ^ (_mix(right + key) & mask)
    return (left << half_bits) | right


def permute(positions: torch.Tensor, n: int, key: int) -> torch.Tensor:
    """pi(positions) for the permutation pi of range(n) keyed by `key` (int64 CPU tensor in, same shape out)."""
    if n <= 1:
        return torch.zeros_like(positions)
    half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
    keys = _round_keys(key)
    out = _feistel(positions.to(torch.long), half_bits, keys)
    outside = out >= n
    while bool(outside.any()):  # cycle-walking: at most a few rounds, the domain is under 4 n
        out[outside] = _feistel(out[outside], half_bits, keys)
        outside = out >= n
    return out
