"""Exact roundings used by the reference quantizer: block scales to their 8-bit format, values to E2M1.

Everything here is plain PyTorch on float32 tensors, written so that each step rounds exactly once, in the
order of docs/numerics.md section 2 (the spec). This is the oracle the Triton kernels are tested against.
"""

from __future__ import annotations

import math

import torch

from .formats import E2M1_VALUES, ScaleFormat, ScaleRounding
from .philox import random_bytes

__all__ = [
    "round_to_scale_format",
    "power_of_two_scale",
    "e2m1_codes_nearest",
    "e2m1_codes_stochastic",
    "e2m1_values",
    "FLT_MAX",
]

FLT_MAX = torch.finfo(torch.float32).max

# Lower bounds of codes 1..7 under round-to-nearest-even (docs/numerics.md section 2.1). A magnitude reaches code
# c when it is above (strict: the tie goes to the even code below) or at least (the tie goes up) the bound.
_RNE_BOUNDS: tuple[tuple[float, bool], ...] = (
    (0.25, True),  # 0.25 is a tie between 0 and 0.5: goes to 0 (even)
    (0.75, False),  # 0.75 is a tie between 0.5 and 1: goes to 1
    (1.25, True),
    (1.75, False),
    (2.5, True),
    (3.5, False),
    (5.0, True),
)


def e2m1_magnitude(index: torch.Tensor) -> torch.Tensor:
    """The E2M1 magnitude of code index 0..7 (int tensor) as float32: ``0.5 * i`` up to 2, then 3, 4, 6.

    Computed rather than looked up, so no constant tensor is ever copied to the device (CUDA-graph capture
    forbids host copies, and tensors cached on first use would land in a graph's memory pool).
    """
    i = index.to(torch.float32)
    return torch.where(i <= 4, i * 0.5, torch.where(i == 7, torch.full_like(i, 6.0), i - 2))


def round_to_scale_format(x: torch.Tensor, fmt: ScaleFormat) -> torch.Tensor:
    """Round non-negative float32 ``x`` (already clamped to ``fmt.max_value``) to the nearest value of
    ``fmt``, ties to even, with subnormals; NaN stays NaN. Returns float32.

    Formats with a torch dtype use torch's conversion (round-to-nearest-even); the others are emulated by
    `round_to_float_format`, which the tests check against torch's conversion where both exist.
    """
    if fmt.torch_dtype is not None and not fmt.is_power_of_two:
        return x.to(fmt.torch_dtype).to(torch.float32)
    return round_to_float_format(x, fmt)


def round_to_float_format(x: torch.Tensor, fmt: ScaleFormat) -> torch.Tensor:
    """Emulate round-to-nearest-even into ``fmt`` (saturating at ``fmt.max_value``) on float32 ``x``."""
    ax = x.abs()
    # frexp gives ax = m * 2^e with m in [0.5, 1), so floor(log2(ax)) = e - 1 exactly.
    _, e = torch.frexp(ax)
    exponent = torch.clamp(e - 1, min=fmt.min_normal_exponent)
    quantum = torch.ldexp(torch.ones_like(ax), exponent - fmt.mantissa_bits)
    # Division by a power of two is exact; torch.round rounds half to even.
    rounded = torch.round(ax / quantum) * quantum
    rounded = torch.clamp(rounded, max=fmt.max_value)
    return torch.where(x < 0, -rounded, rounded)


def power_of_two_scale(a: torch.Tensor, rounding: ScaleRounding, fmt: ScaleFormat) -> torch.Tensor:
    """The power-of-two decode scale of a block whose (scaled) amax is ``a`` (float32, >= 0).

    ``FLOOR``: ``2^(floor(log2(a)) - 2)`` (OCP MX: E2M1's largest exponent is 2, so the block max may saturate
    to 6). ``CEIL``: the smallest ``2^k`` with ``6 * 2^k >= a``. Exponents clamp to the format's range;
    ``a == 0`` gives the smallest scale.
    """
    _, e = torch.frexp(a)
    floor_log2 = e - 1  # a in [2^f, 2^(f+1))
    if rounding is ScaleRounding.FLOOR:
        k = floor_log2 - 2
    elif rounding is ScaleRounding.CEIL:
        # 6 * 2^(f-2) = 1.5 * 2^f covers a up to 1.5 * 2^f; above that 2^(f-1) is needed (3 * 2^f > a).
        threshold = torch.ldexp(torch.full_like(a, 1.5), floor_log2)
        k = torch.where(a <= threshold, floor_log2 - 2, floor_log2 - 1)
    else:
        raise ValueError(f"power-of-two scales take 'floor' or 'ceil' rounding, got {rounding.value!r}")
    min_exp, max_exp = int(math.log2(fmt.min_value)), int(math.log2(fmt.max_value))
    k = torch.where(a == 0, torch.full_like(k, min_exp), k.clamp(min_exp, max_exp))
    return torch.ldexp(torch.ones_like(a), k)


def e2m1_codes_nearest(v: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, 0..15) of float32 ``v`` (already clamped to [-6, 6]), round-to-nearest-even.

    The sign bit is set for ``v < 0``, so values that round to zero from below give code 8 (-0); +-0.0 and
    NaN give code 0.
    """
    mag = v.abs()
    code = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for bound, strict in _RNE_BOUNDS:
        code += (mag > bound if strict else mag >= bound).to(torch.uint8)
    return code | ((v < 0).to(torch.uint8) << 3)


def e2m1_codes_stochastic(v: torch.Tensor, seed: "int | torch.Tensor", offset: "int | torch.Tensor") -> torch.Tensor:
    """E2M1 codes of float32 ``v`` (clamped to [-6, 6]) with stochastic rounding as Blackwell's
    ``cvt.rs.satfinite.e2m1x4.f32`` does it: 8 random bits per element (docs/numerics.md, "Stochastic rounding").

    With ``lo <= |v| < hi`` the neighbouring grid points, ``f = (|v| - lo) / (hi - lo)`` and ``t = floor(f * 256)``
    (the 8 bits the conversion truncates below E2M1's last kept bit), the magnitude rounds up to ``hi`` iff
    ``t + r >= 256`` for a random byte ``r`` (docs/numerics.md section 2.2): ``P(up) = t / 256``, below ``f`` by less than 1/256. Element ``i``
    of ``v`` in row-major order takes its byte from `philox.random_bytes` (Philox4x32-10 at counter
    ``offset + i // 16``), so a call consumes ``ceil(numel / 16)`` counters.
    """
    mag = v.abs()
    # Index of the grid point at or below mag: count the grid points 0.5..6 that mag reaches.
    lower = torch.zeros(v.shape, dtype=torch.int64, device=v.device)
    for g in E2M1_VALUES[1:]:
        lower += (mag >= g).to(torch.int64)
    upper = torch.clamp(lower + 1, max=len(E2M1_VALUES) - 1)
    lo, hi = e2m1_magnitude(lower), e2m1_magnitude(upper)
    step = hi - lo
    # mag - lo is exact (lo <= mag < 2 lo, or lo == 0) and step is a power of two: f and f * 256 are exact, so t is
    # exactly the 8 truncated bits. mag == 6 has no grid point above (step 0): t = 0, it stays at 6.
    f = torch.where(step > 0, (mag - lo) / torch.where(step > 0, step, torch.ones_like(step)), torch.zeros_like(mag))
    t = torch.floor(torch.nan_to_num(f) * 256).to(torch.int64)
    r = random_bytes(seed, offset, v.numel(), v.device).reshape(v.shape)
    code = (lower + (t + r >= 256).to(torch.int64)).to(torch.uint8)
    code = torch.where(torch.isnan(v), torch.zeros_like(code), code)
    return code | ((v < 0).to(torch.uint8) << 3)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """Float32 values of E2M1 codes (uint8, 0..15)."""
    mag = e2m1_magnitude(codes & 7)
    return torch.where((codes & 8) != 0, -mag, mag)
