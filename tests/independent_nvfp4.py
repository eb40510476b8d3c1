"""An independent implementation of NVFP4 quantization (docs/numerics.md section 2), in NumPy with ml_dtypes.

It shares no code with fp4compile: E4M3 rounding comes from ml_dtypes, E2M1 rounding is a nearest-grid-point
search with ties to the even code (instead of thresholds), stochastic rounding finds the grid neighbours by
search and draws its bytes from a NumPy Philox4x32-10 written from the Random123 description (uint64 products),
and blocks are walked one at a time. Tests compare the reference quantizer against it bit for bit.
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np

GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
F32 = np.float32
FLT_MAX = np.finfo(np.float32).max


def _e2m1_nearest(v: np.float32) -> int:
    mag = abs(v)
    dist = np.abs(GRID - mag)
    best = np.flatnonzero(dist == dist.min())
    code = int(best[0]) if len(best) == 1 else int(best[best % 2 == 0][0])  # tie -> even code
    return code | (8 if v < 0 else 0)


@functools.lru_cache(maxsize=4096)
def philox4x32_10(counter: int, key: int) -> tuple[int, ...]:
    """The four 32-bit output words of Philox4x32-10 for a 64-bit counter (words 0, 1; words 2, 3 zero) and a
    64-bit key (Random123: multipliers 0xD2511F53 and 0xCD9E8D57, Weyl increments 0x9E3779B9, 0xBB67AE85)."""
    mask = np.uint64(0xFFFFFFFF)
    c = [np.uint64(counter & 0xFFFFFFFF), np.uint64(counter >> 32), np.uint64(0), np.uint64(0)]
    k = [np.uint64(key & 0xFFFFFFFF), np.uint64((key >> 32) & 0xFFFFFFFF)]
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]  # < 2^64: exact in uint64
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k[0], p1 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k[1], p0 & mask]
        k = [(k[0] + np.uint64(0x9E3779B9)) & mask, (k[1] + np.uint64(0xBB67AE85)) & mask]
    return tuple(int(w) for w in c)


def sr_byte(i: int, seed: int, offset: int) -> int:
    """The random byte of the i-th element in quantization order: byte i % 4 of word (i % 16) // 4 at counter
    offset + i // 16."""
    word = philox4x32_10(offset + i // 16, seed)[(i % 16) // 4]
    return (word >> (8 * (i % 4))) & 0xFF


def _e2m1_stochastic(v: np.float32, r: int) -> int:
    mag = float(abs(v))  # float64 holds every float32 and the differences below exactly
    up_idx = int(np.searchsorted(GRID.astype(np.float64), mag, side="right"))
    if up_idx >= len(GRID):  # mag == 6
        code = len(GRID) - 1
    else:
        lo, hi = float(GRID[up_idx - 1]), float(GRID[up_idx])
        t = int(np.floor((mag - lo) / (hi - lo) * 256))
        code = up_idx - 1 + (1 if t + r >= 256 else 0)
    return code | (8 if v < 0 else 0)


def quantize_nvfp4_1x16(x: np.ndarray, stochastic: bool = False, seed: int = 0,
                        offset: int = 0) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """Return (codes uint8 (R, K), block scales as float32 (R, K // 16), D) for finite float32 x (R, K), rounded
    to nearest, or stochastically with Philox key ``seed`` and first counter ``offset``."""
    x = x.astype(np.float32)
    rows, k = x.shape
    amax = F32(np.max(np.abs(x))) if x.size else F32(0)
    with np.errstate(divide="ignore", over="ignore"):
        s = F32(min(F32(2688.0) / amax, FLT_MAX)) if amax != 0 else F32(1)
    if s == 0:
        s = F32(1)
    d_global = F32(F32(1) / s)
    sixth = F32(1.0 / 6.0)
    codes = np.zeros((rows, k), dtype=np.uint8)
    scales = np.zeros((rows, k // 16), dtype=np.float32)
    for r in range(rows):
        for b in range(k // 16):
            blk = x[r, 16 * b : 16 * b + 16]
            amax_b = F32(np.max(np.abs(blk)))
            scaled = F32(min(F32(amax_b * F32(s * sixth)), F32(448)))
            d_b = F32(np.array(scaled, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
            scales[r, b] = d_b
            with np.errstate(divide="ignore", over="ignore"):
                e_b = F32(min(F32(F32(1) / F32(d_b * d_global)), FLT_MAX))
            for i, xi in enumerate(blk):
                with np.errstate(over="ignore"):
                    v = F32(np.clip(F32(xi * e_b), -6, 6))
                col = 16 * b + i
                codes[r, col] = (_e2m1_stochastic(v, sr_byte(r * k + col, seed, offset)) if stochastic
                                 else _e2m1_nearest(v))
    return codes, scales, d_global


def dequantize(codes: np.ndarray, scales: np.ndarray, d_global: np.float32) -> np.ndarray:
    mag = GRID[codes & 7]
    vals = np.where(codes & 8, -mag, mag).astype(np.float32)
    d = np.repeat(scales, 16, axis=1)
    return (vals * d).astype(np.float32) * d_global
