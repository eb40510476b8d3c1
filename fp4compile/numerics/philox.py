"""Philox4x32-10 in plain PyTorch: the counter-based generator behind stochastic rounding.

It reproduces ``triton.language.randint4x(seed, offset)`` bit for bit (counter ``(offset_lo, offset_hi, 0, 0)``,
key ``(seed_lo, seed_hi)``, ten rounds), so the Triton kernels and this reference draw the same bits.
Arithmetic runs on int64 tensors holding uint32 values, so it works on any device.

Stochastic rounding takes one random byte per element, 16 bytes from one Philox call (docs/numerics.md,
"Stochastic rounding"; ../shared/docs/NVFP4.md section 2 step 5): `random_bytes`.
"""

from __future__ import annotations

import torch

__all__ = ["philox4x32", "random_bytes", "ELEMENTS_PER_COUNTER"]

#: Elements served by one Philox4x32-10 call (one counter): four 32-bit words of four bytes.
ELEMENTS_PER_COUNTER = 16

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


def random_bytes(seed: "int | torch.Tensor", offset: "int | torch.Tensor", n: int, device: torch.device) -> torch.Tensor:
    """``n`` random bytes (int64 values 0..255) for stochastic rounding: element ``i`` takes byte ``i % 4`` (least
    significant first) of word ``(i % 16) // 4`` of Philox4x32-10 at counter ``offset + i // 16``, keyed by
    ``seed``. A call consumes ``ceil(n / 16)`` counters."""
    groups = (n + ELEMENTS_PER_COUNTER - 1) // ELEMENTS_PER_COUNTER
    counter = torch.arange(groups, dtype=torch.int64, device=device)
    counter = counter + (offset.to(device) if isinstance(offset, torch.Tensor) else offset)
    words = torch.stack(philox4x32(counter, seed), dim=-1)  # (groups, 4): word w of group g
    # Python-int shifts, not a constant tensor: nothing is copied from the host (CUDA-graph capture forbids it).
    per_byte = torch.stack([(words >> shift) & 0xFF for shift in (0, 8, 16, 24)], dim=-1)  # (groups, 4, 4)
    return per_byte.reshape(-1)[:n]
