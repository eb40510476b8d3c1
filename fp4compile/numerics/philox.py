"""Philox4x32-10 in plain PyTorch: the counter-based generator behind stochastic rounding.

It reproduces ``triton.language.randint4x(seed, offset)`` bit for bit (counter ``(offset_lo, offset_hi, 0, 0)``,
key ``(seed_lo, seed_hi)``, ten rounds), so the Triton kernels and this reference draw the same bits.
Arithmetic runs on int64 tensors holding uint32 values, so it works on any device.
"""

from __future__ import annotations

import torch

__all__ = ["philox4x32", "uniform24"]

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUNDS = 10


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for a uint32 constant ``a`` and uint32 values ``b`` (int64 tensor).

    The full product needs 64 unsigned bits, so split ``b`` into 16-bit halves to stay inside int64.
    """
    b_hi, b_lo = b >> 16, b & 0xFFFF
    upper = a * b_hi  # < 2^48
    lower = a * b_lo  # < 2^48
    hi = (upper + (lower >> 16)) >> 16
    lo = (((upper & 0xFFFF) << 16) + lower) & _MASK32
    return hi, lo


def philox4x32(counter: torch.Tensor, seed: "int | torch.Tensor") -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of 64-bit ``counter`` values (int64 tensor) under a 64-bit ``seed``.

    Returns four int64 tensors of uint32 words, like ``tl.randint4x(seed, counter)``.
    """
    if isinstance(seed, torch.Tensor):
        seed = seed.to(device=counter.device, dtype=torch.int64)
    c0 = counter & _MASK32
    c1 = (counter >> 32) & _MASK32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def uniform24(seed: "int | torch.Tensor", offset: "int | torch.Tensor", n: int, device: torch.device) -> torch.Tensor:
    """``n`` float32 uniforms in [0, 1) with 24 random bits each, element ``i`` from word ``i % 4`` of
    Philox4x32-10 at counter ``offset + i // 4``. A call consumes ``ceil(n / 4)`` counters."""
    groups = (n + 3) // 4
    counter = torch.arange(groups, dtype=torch.int64, device=device)
    counter = counter + (offset.to(device) if isinstance(offset, torch.Tensor) else offset)
    words = torch.stack(philox4x32(counter, seed), dim=-1).reshape(-1)[:n]
    # The top 24 bits of a word as an integer below 2^24 convert to float32 exactly.
    return (words >> 8).to(torch.float32) * (2.0**-24)
