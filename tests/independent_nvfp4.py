"""An independent implementation of NVFP4 quantization (docs/numerics.md section 2), in NumPy with ml_dtypes.

It shares no code with fp4compile: E4M3 rounding comes from ml_dtypes, E2M1 rounding is a nearest-grid-point
search with ties to the even code (instead of thresholds), and blocks are walked one at a time. Tests compare
the reference quantizer against it bit for bit.
"""

from __future__ import annotations

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


def quantize_nvfp4_1x16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """Return (codes uint8 (R, K), block scales as float32 (R, K // 16), D) for finite float32 x (R, K)."""
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
                codes[r, 16 * b + i] = _e2m1_nearest(v)
    return codes, scales, d_global


def dequantize(codes: np.ndarray, scales: np.ndarray, d_global: np.float32) -> np.ndarray:
    mag = GRID[codes & 7]
    vals = np.where(codes & 8, -mag, mag).astype(np.float32)
    d = np.repeat(scales, 16, axis=1)
    return (vals * d).astype(np.float32) * d_global
