"""Fused Triton kernels: tensor amax, block-scaled FP4 quantization and exact dequantization.

Spec: ../shared/docs/NVFP4.md section 2 (quantization, in FP32, in that order) and section 3 (the 16-point
random Hadamard transform). Every kernel here is bit-exact with `fp4compile.numerics.reference`:

* every division the spec needs correctly rounded is ``tl.div_rn`` (plain ``/`` is approximate in Triton);
* E4M3 / UE8M0 rounding is written in integer bit arithmetic, so it runs the same under ``TRITON_INTERPRET=1``
  (no libdevice, no inline PTX) and on the GPU;
* no multiply feeds an add, so FMA contraction cannot change a rounding (the Hadamard butterflies are adds,
  the 1/4 and the sign flips are exact);
* stochastic rounding draws ``tl.randint4x(seed, offset + i // 4)`` word ``i % 4`` for element ``i`` in
  row-major order of the quantized ``(rows, K)`` layout, exactly as `fp4compile.numerics.philox.uniform24`.

Two launches per quantization: a reduction for the tensor amax (the tensor scale must be known before any
block scale, spec step 2), then the quantize kernel. The input is addressed through its strides, so the
column-wise form ``quantize_triton(x.t(), ...)`` reads the row-major activation directly.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import triton
import triton.language as tl

from ..numerics.formats import E2M1_MAX, Fp4Format, Rounding, ScaleRounding
from ..numerics.qtensor import QuantizedTensor

__all__ = [
    "quantize_triton",
    "tensor_amax_triton",
    "dequantize_unscaled_triton",
    "is_supported",
    "SCALE_E4M3",
    "SCALE_E8M0_FLOOR",
    "SCALE_E8M0_CEIL",
]

logger = logging.getLogger(__name__)

# How a kernel rounds block scales (a constexpr switch).
SCALE_E4M3 = 0  # RNE into E4M3 (NVFP4, spec step 3)
SCALE_E8M0_FLOOR = 1  # OCP MX: 2^(floor(log2 amax_b) - 2)
SCALE_E8M0_CEIL = 2  # NV's MXFP4: the smallest power of two with 6 * d >= amax_b

_FLT_MAX = 3.4028234663852886e38
# Negative entries of the RHT sign vector (1,1,1,-1,1,-1,-1,-1,-1,-1,-1,1,-1,1,-1,-1) as a bit mask.
_RHT_NEG_MASK = sum(1 << j for j in (3, 5, 6, 7, 8, 9, 10, 12, 14, 15))
assert _RHT_NEG_MASK == 0xD7E8


# ----------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _e4m3_rne(x):
    """Round float32 ``x`` in [0, 448] to E4M3 (round half to even, subnormals): the byte and its value.

    Normal results (x >= 2^-6): round the 23-bit fp32 mantissa to 3 bits with the usual bias trick, a carry
    rolls into the exponent. Subnormal results: ``round_half_even(x * 2^9)`` is the byte itself (8 = 2^-6,
    the smallest normal, has byte 0x08 too), done as a rounded right shift of the 24-bit significand.
    """
    bits = x.to(tl.int32, bitcast=True)
    biased_exp = (bits >> 23) & 0xFF
    normal_byte = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - (120 << 3)
    significand = (bits & 0x7FFFFF) | 0x800000
    shift = tl.minimum(141 - biased_exp, 31)  # x * 2^9 = significand >> shift; >= 21 in the subnormal range
    shift = tl.maximum(shift, 1)
    sub_byte = (significand + (1 << (shift - 1)) - 1 + ((significand >> shift) & 1)) >> shift
    byte = tl.where(biased_exp >= 121, normal_byte, sub_byte)
    return byte, _e4m3_value(byte)


@triton.jit
def _e4m3_value(byte):
    """Float32 value of an E4M3 byte (0..0x7E, no sign): exact."""
    e = byte >> 3
    m = byte & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    subnormal = m.to(tl.float32) * 0.001953125  # m * 2^-9, exact
    return tl.where(e == 0, subnormal, normal)


@triton.jit
def _e8m0_scale(a, CEIL: tl.constexpr):
    """Power-of-two scale of a block whose scaled amax is ``a >= 0`` (see `rounding.power_of_two_scale`):
    the E8M0 byte (biased exponent) and its float32 value. fp32 subnormals and 0 give 2^-127."""
    bits = a.to(tl.int32, bitcast=True)
    biased_exp = (bits >> 23) & 0xFF
    floor_log2 = tl.where(biased_exp == 0, -127, biased_exp - 127)
    if CEIL:
        # 6 * 2^(f-2) = 1.5 * 2^f covers a up to 1.5 * 2^f, i.e. a mantissa field up to 2^22.
        k = tl.where((bits & 0x7FFFFF) <= 0x400000, floor_log2 - 2, floor_log2 - 1)
    else:
        k = floor_log2 - 2
    k = tl.minimum(tl.maximum(k, -127), 127)
    k = tl.where(a == 0, -127, k)
    value = tl.where(k == -127, (1 << 22), (k + 127) << 23).to(tl.float32, bitcast=True)
    return k + 127, value


@triton.jit
def _butterfly(v, N: tl.constexpr, H: tl.constexpr):
    """One Sylvester-Hadamard stage on runs of 16: pairs (a, b) at distance H become (a + b, a - b)."""
    w = tl.reshape(v, (N, 16 // (2 * H), 2, H))
    a, b = tl.split(tl.permute(w, (0, 1, 3, 2)))  # (N, 16/(2H), H) each
    w = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
    return tl.reshape(w, (N, 16))


@triton.jit
def _hadamard16(v, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SIGN_MASK: tl.constexpr):
    """The RHT of spec section 3 on each run of 16 along axis 1 of the float32 tile ``v``, in the reference's
    order: sign flips (exact), butterflies at distance 1, 2, 4, 8 (float32 adds), then * 1/4 (exact)."""
    N: tl.constexpr = BLOCK_R * BLOCK_K // 16
    w = tl.reshape(v, (N, 16))
    lane = tl.arange(0, 16)
    w = tl.where(((SIGN_MASK >> lane) & 1)[None, :] != 0, -w, w)
    w = _butterfly(w, N, 1)
    w = _butterfly(w, N, 2)
    w = _butterfly(w, N, 4)
    w = _butterfly(w, N, 8)
    return tl.reshape(w * 0.25, (BLOCK_R, BLOCK_K))


@triton.jit
def _load_tile(x_ptr, rows, cols, R, K, stride_r, stride_k, HADAMARD: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_K: tl.constexpr, SIGN_MASK: tl.constexpr):
    """A (BLOCK_R, BLOCK_K) float32 tile of the logical (R, K) matrix (zeros outside), RHT applied if asked."""
    mask = (rows < R)[:, None] & (cols < K)[None, :]
    ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_k
    v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HADAMARD:
        v = _hadamard16(v, BLOCK_R, BLOCK_K, SIGN_MASK)
    return v


@triton.jit
def _abs_bits(v):
    """|v| as int32 bits: ordered like the magnitudes, with NaN above +inf (so a max propagates NaN)."""
    return v.to(tl.int32, bitcast=True) & 0x7FFFFFFF


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _amax_kernel(x_ptr, amax_bits_ptr, R, K, stride_r, stride_k, num_tiles_k, num_programs,
                 TILES_PER_PROGRAM: tl.constexpr, HADAMARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SIGN_MASK: tl.constexpr):
    """Spec step 1: ``amax = max |x|`` (after the RHT where asked). A persistent loop over (BLOCK_R, BLOCK_K)
    tiles, one integer atomic max per program (|x| bits order like the values; NaN wins)."""
    pid = tl.program_id(0)
    best = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.int32)
    for i in range(TILES_PER_PROGRAM):  # constexpr trip count: the interpreter cannot loop to a runtime int
        tile = pid + i * num_programs  # past the last tile: rows >= R, the load is fully masked
        rows = (tile // num_tiles_k) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = (tile % num_tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
        v = _load_tile(x_ptr, rows, cols, R, K, stride_r, stride_k, HADAMARD, BLOCK_R, BLOCK_K, SIGN_MASK)
        best = tl.maximum(best, _abs_bits(v))
    tl.atomic_max(amax_bits_ptr, tl.max(tl.max(best, axis=1), axis=0))


@triton.jit
def _quantize_kernel(
    x_ptr, amax_bits_ptr, q_ptr, scale_ptr, decode_ptr, deq_ptr, seed, offset,
    R, K, stride_r, stride_k, num_tiles_k,
    HADAMARD: tl.constexpr, STOCHASTIC: tl.constexpr, SCALE_KIND: tl.constexpr, TENSOR_SCALE: tl.constexpr,
    SCALE_MAX: tl.constexpr, ENCODE_NUMERATOR: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    WRITE_DEQ: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SIGN_MASK: tl.constexpr,
    SEED_FROM_PTR: tl.constexpr,
):
    """Spec steps 2-5 on one (BLOCK_R, BLOCK_K) tile of the logical (R, K) matrix.

    Writes packed codes ``q`` (R, K/2), block scale bytes (R/BLOCK_ROWS, K/BLOCK_COLS), the tensor decode
    scale ``D`` (program 0), and with WRITE_DEQ the exact unscaled operand ``E2M1[c] * d_b`` (R, K).
    """
    pid = tl.program_id(0)
    rows = (pid // num_tiles_k) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % num_tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    v = _load_tile(x_ptr, rows, cols, R, K, stride_r, stride_k, HADAMARD, BLOCK_R, BLOCK_K, SIGN_MASK)

    # Step 2: S = min(6 * scale_max / amax, FLT_MAX), 1 where amax is 0 or non-finite or S underflows; D = 1/S.
    amax_bits = tl.load(amax_bits_ptr)
    amax = amax_bits.to(tl.float32, bitcast=True)
    one = tl.full((), 1.0, tl.float32)
    if TENSOR_SCALE:
        s = tl.minimum(tl.div_rn(tl.full((), ENCODE_NUMERATOR, tl.float32), amax), 3.4028234663852886e38)
        s = tl.where((amax == 0) | (s == 0) | (amax_bits >= 0x7F800000), one, s)
    else:
        s = one
    d_global = tl.div_rn(one, s)
    if pid == 0:
        tl.store(decode_ptr, d_global)

    # Step 3: block amax over BLOCK_ROWS x BLOCK_COLS, then the block decode scale d_b.
    NB_R: tl.constexpr = BLOCK_R // BLOCK_ROWS
    NB_K: tl.constexpr = BLOCK_K // BLOCK_COLS
    mag_bits = tl.reshape(_abs_bits(v), (NB_R, BLOCK_ROWS, NB_K, BLOCK_COLS))
    block_amax_bits = tl.max(tl.max(mag_bits, axis=3), axis=1)  # (NB_R, NB_K)
    block_amax = block_amax_bits.to(tl.float32, bitcast=True)
    block_is_finite = block_amax_bits < 0x7F800000
    if SCALE_KIND == 0:
        s_over_6 = s * 0.16666666666666666  # fp32(1/6): one product, rounded once
        scaled = tl.minimum(block_amax * s_over_6, SCALE_MAX)
        byte, d_block = _e4m3_rne(scaled)
        nan_byte = 0x7F
    else:
        byte, d_block = _e8m0_scale(block_amax * s, SCALE_KIND == 2)
        nan_byte = 0xFF
    byte = tl.where(block_is_finite, byte, nan_byte)

    # Step 4: e_b = min(1 / (d_b * D), FLT_MAX), correctly rounded.
    e_block = tl.minimum(tl.div_rn(tl.full((NB_R, NB_K), 1.0, tl.float32), d_block * d_global),
                         3.4028234663852886e38)

    # Step 5: v * e_b clamped to [-6, 6], rounded to E2M1 (codes in the (NB_R, BLOCK_ROWS, NB_K, BLOCK_COLS) view).
    v4 = tl.reshape(v, (NB_R, BLOCK_ROWS, NB_K, BLOCK_COLS))
    scaled_v = v4 * e_block[:, None, :, None]
    scaled_v = tl.minimum(tl.maximum(scaled_v, -6.0), 6.0)
    mag = tl.abs(scaled_v)
    if STOCHASTIC:
        col0 = (pid % num_tiles_k) * BLOCK_K
        if SEED_FROM_PTR:  # the key lives in device memory: no host read, so the launch can be graph-captured
            seed = tl.load(seed)
        code = _e2m1_stochastic(mag, rows, col0, K, seed, offset, NB_R, NB_K, BLOCK_R, BLOCK_K, BLOCK_ROWS,
                                BLOCK_COLS)
    else:
        # Round to nearest even: count the thresholds reached (ties 0.25, 1.25, 2.5, 5 go down, 0.75, 1.75, 3.5 up).
        code = ((mag > 0.25).to(tl.int32) + (mag >= 0.75).to(tl.int32) + (mag > 1.25).to(tl.int32)
                + (mag >= 1.75).to(tl.int32) + (mag > 2.5).to(tl.int32) + (mag >= 3.5).to(tl.int32)
                + (mag > 5.0).to(tl.int32))
    code = code | tl.where(scaled_v < 0, 8, 0)
    code = tl.where(block_is_finite[:, None, :, None], code, 0)  # non-finite blocks: code 0, NaN scale
    code = tl.reshape(code, (BLOCK_R, BLOCK_K))

    # Stores: packed codes (low nibble = even index), scale bytes, and the optional exact dequantized operand.
    lo, hi = tl.split(tl.reshape(code, (BLOCK_R, BLOCK_K // 2, 2)))
    half_cols = (pid % num_tiles_k) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    row_mask = rows < R
    q_ptrs = q_ptr + rows.to(tl.int64)[:, None] * (K // 2) + half_cols[None, :]
    tl.store(q_ptrs, (lo | (hi << 4)).to(tl.uint8), mask=row_mask[:, None] & (half_cols < K // 2)[None, :])

    block_rows = (pid // num_tiles_k) * NB_R + tl.arange(0, NB_R)
    block_cols = (pid % num_tiles_k) * NB_K + tl.arange(0, NB_K)
    nbk = K // BLOCK_COLS
    s_ptrs = scale_ptr + block_rows.to(tl.int64)[:, None] * nbk + block_cols[None, :]
    s_mask = (block_rows < tl.cdiv(R, BLOCK_ROWS))[:, None] & (block_cols < nbk)[None, :]
    tl.store(s_ptrs, byte.to(tl.uint8), mask=s_mask)

    if WRITE_DEQ:
        d_nan = tl.where(block_is_finite, d_block, float("nan"))
        vals = tl.reshape(_e2m1_value(code), (NB_R, BLOCK_ROWS, NB_K, BLOCK_COLS)) * d_nan[:, None, :, None]
        d_ptrs = deq_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :]
        tl.store(d_ptrs, tl.reshape(vals, (BLOCK_R, BLOCK_K)).to(deq_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & (cols < K)[None, :])


@triton.jit
def _e2m1_stochastic(mag, rows, col0, K, seed, offset, NB_R: tl.constexpr, NB_K: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                     BLOCK_COLS: tl.constexpr):
    """Unbiased stochastic E2M1 code magnitude of ``mag`` in [0, 6] (spec step 5).

    Element i = row * K + col draws word i % 4 of Philox4x32-10 at counter offset + i // 4. K is a multiple
    of 4, so each run of 4 columns shares one counter: draw on a (BLOCK_R, BLOCK_K / 4) grid and interleave.
    """
    group_cols = col0 // 4 + tl.arange(0, BLOCK_K // 4)  # the counter column of each run of 4
    counter = offset + rows.to(tl.int64)[:, None] * (K // 4) + group_cols.to(tl.int64)[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, counter)
    # join(join(w0, w2), join(w1, w3))[..., j, t] = w_(2j + t): flattening the last two axes gives w0 w1 w2 w3.
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_R, BLOCK_K))
    u = (words >> 8).to(tl.float32) * 5.960464477539063e-08  # 24 random bits * 2^-24, exact
    u = tl.reshape(u, (NB_R, BLOCK_ROWS, NB_K, BLOCK_COLS))
    # Grid point at or below mag (index lower), its value lo and the step to the next one (0 at 6).
    lower = ((mag >= 0.5).to(tl.int32) + (mag >= 1.0).to(tl.int32) + (mag >= 1.5).to(tl.int32)
             + (mag >= 2.0).to(tl.int32) + (mag >= 3.0).to(tl.int32) + (mag >= 4.0).to(tl.int32)
             + (mag >= 6.0).to(tl.int32))
    lo = tl.where(lower < 4, lower.to(tl.float32) * 0.5,
                  tl.where(lower == 4, 2.0, tl.where(lower == 5, 3.0, tl.where(lower == 6, 4.0, 6.0))))
    inv_step = tl.where(lower < 4, 2.0, tl.where(lower < 6, 1.0, tl.where(lower == 6, 0.5, 0.0)))
    p = (mag - lo) * inv_step  # exact: mag - lo is exact and the step is a power of two
    code = lower + (u < p).to(tl.int32)
    return tl.where(mag != mag, 0, code)


@triton.jit
def _e2m1_value(code):
    """Float32 value of an E2M1 code (0..15): the 3 magnitude bits placed at fp16 bits 9..11 read as an fp16
    number times 2^14 (code 1 lands on the fp16 subnormal 2^-15), with the sign at bit 15."""
    half_bits = ((code & 7) << 9) | ((code & 8) << 12)
    return half_bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 16384.0


@triton.jit
def _dequantize_kernel(q_ptr, scale_ptr, out_ptr, R, K, SCALE_KIND: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                       BLOCK_COLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """``E2M1[c] * d_b`` (exact where the output dtype can hold it: always for E4M3 scales in fp16/bf16)."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    half_cols = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    mask = (rows < R)[:, None] & (half_cols < K // 2)[None, :]
    packed = tl.load(q_ptr + rows.to(tl.int64)[:, None] * (K // 2) + half_cols[None, :], mask=mask, other=0)
    packed = packed.to(tl.int32)
    code = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_R, BLOCK_K))
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = (rows < R)[:, None] & (cols < K)[None, :]
    nbk = K // BLOCK_COLS
    s_ptrs = scale_ptr + (rows // BLOCK_ROWS).to(tl.int64)[:, None] * nbk + (cols // BLOCK_COLS)[None, :]
    byte = tl.load(s_ptrs, mask=col_mask, other=0).to(tl.int32)
    if SCALE_KIND == 0:
        d = tl.where(byte == 0x7F, float("nan"), _e4m3_value(byte))
    else:
        d = tl.where(byte == 0xFF, float("nan"),
                     tl.where(byte == 0, (1 << 22), byte << 23).to(tl.float32, bitcast=True))
    vals = _e2m1_value(code) * d
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], vals.to(out_ptr.dtype.element_ty),
             mask=col_mask)


# ----------------------------------------------------------------------------------------------------------
# Host wrappers
# ----------------------------------------------------------------------------------------------------------


def _scale_kind(fmt: Fp4Format) -> Optional[int]:
    """The kernels' scale rounding for ``fmt``, or None where only the reference handles it."""
    name = fmt.scale_format.name
    if name == "e4m3" and fmt.scale_rounding is ScaleRounding.NEAREST:
        return SCALE_E4M3
    if name == "e8m0" and fmt.scale_rounding is ScaleRounding.FLOOR:
        return SCALE_E8M0_FLOOR
    if name == "e8m0" and fmt.scale_rounding is ScaleRounding.CEIL:
        return SCALE_E8M0_CEIL
    return None


def is_supported(fmt: Fp4Format) -> bool:
    """Whether the Triton kernels implement ``fmt`` (E4M3 round-to-nearest or UE8M0 floor/ceil scales)."""
    return _scale_kind(fmt) is not None


def _as_2d_view(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``x`` as a logical (rows, K) matrix with strides, without copying where the leading axes collapse."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    try:
        x2 = x.view(rows, k)
    except RuntimeError:
        x2 = x.reshape(rows, k)  # leading axes that do not collapse into one stride: copy
    return x2, rows, k


#: Tile and warps of the quantize kernel on CUDA, (BLOCK_R, BLOCK_K, num_warps); tuned on the H100 with
#: benchmarks/bench_kernels.py (override per call with ``_tile=`` when measuring).
QUANTIZE_TILE_CUDA: tuple[int, int, int] = (32, 128, 4)


def _tile_shape(rows: int, k: int, block: tuple[int, int], on_cuda: bool,
                override: Optional[tuple[int, int, int]] = None) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_K, num_warps) of the quantize kernel, multiples of the block shape, no larger than
    needed for small tensors (fewer interpreted programs on CPU)."""
    br, bc = block
    tile_r, tile_k, warps = override or (QUANTIZE_TILE_CUDA if on_cuda else (32, 64, 4))
    block_k = max(bc, 16, min(tile_k, triton.next_power_of_2(k)))
    block_r = max(br, min(tile_r, triton.next_power_of_2(max(rows, 1))))
    return block_r, block_k, warps


def _int_arg(v: "int | torch.Tensor") -> int:
    return int(v.item()) if isinstance(v, torch.Tensor) else int(v)


def tensor_amax_triton(x: torch.Tensor, hadamard: bool = False) -> torch.Tensor:
    """``max |x|`` over the tensor viewed as (rows, K) (after the 16-point RHT along K where ``hadamard``),
    as a float32 0-dim tensor; NaN if any element is NaN. A Triton reduction kernel."""
    x2, rows, k = _as_2d_view(x)
    return _amax_bits(x2, rows, k, hadamard).view(torch.float32).reshape(())


def _amax_bits(x2: torch.Tensor, rows: int, k: int, hadamard: bool) -> torch.Tensor:
    amax_bits = torch.zeros(1, dtype=torch.int32, device=x2.device)
    if rows == 0 or k == 0:
        return amax_bits
    block_r, block_k = 32, max(16, min(256, triton.next_power_of_2(k)))
    num_tiles_k = triton.cdiv(k, block_k)
    num_tiles = triton.cdiv(rows, block_r) * num_tiles_k
    # About 4 programs per SM, each looping over a power-of-two number of tiles (few compiled variants).
    target = 4 * torch.cuda.get_device_properties(x2.device).multi_processor_count if x2.is_cuda else 4
    tiles_per_program = triton.next_power_of_2(triton.cdiv(num_tiles, target))
    programs = triton.cdiv(num_tiles, tiles_per_program)
    _amax_kernel[(programs,)](
        x2, amax_bits, rows, k, x2.stride(0), x2.stride(1), num_tiles_k, programs,
        TILES_PER_PROGRAM=tiles_per_program, HADAMARD=hadamard, BLOCK_R=block_r, BLOCK_K=block_k, SIGN_MASK=_RHT_NEG_MASK, num_warps=8,
    )
    return amax_bits


def quantize_triton(
    x: torch.Tensor,
    fmt: Fp4Format,
    block: tuple[int, int],
    rounding: Rounding,
    seed: "int | torch.Tensor" = 0,
    offset: "int | torch.Tensor" = 0,
    hadamard: bool = False,
    dequantized_dtype: Optional[torch.dtype] = None,
    amax: Optional[torch.Tensor] = None,
    _tile: Optional[tuple[int, int, int]] = None,
) -> "QuantizedTensor | tuple[QuantizedTensor, torch.Tensor]":
    """Quantize ``x`` along its last axis with Triton kernels, bit-exact with `quantize_reference`.

    Arguments as `fp4compile.numerics.reference.quantize_reference` (already validated by
    `fp4compile.quantize`). ``x`` may be any strided view: ``quantize_triton(x.t(), ...)`` reads a row-major
    activation column-wise through its strides (no transpose copy). Formats other than E4M3 round-to-nearest
    and UE8M0 floor/ceil scales fall back to the reference (logged).

    With ``dequantized_dtype`` (float16 or bfloat16) the same kernel also writes the exact unscaled operand
    ``E2M1[c] * d_b`` in the logical (rows, K) layout and the call returns ``(qt, operand)``.
    ``amax``: the tensor amax (float32 0-dim, after the RHT where ``hadamard``) if already known, e.g. from
    `tensor_amax_triton`; the reduction kernel is skipped. It must be exact for bit-exact results.
    """
    scale_kind = _scale_kind(fmt)
    if scale_kind is None or not x.is_cuda and not _interpreting():
        from ..numerics.reference import quantize_reference

        logger.info("quantize_triton: falling back to the reference for format %s on %s (%s)", fmt.spec,
                    x.device, "scale format not implemented in Triton" if scale_kind is None else
                    "not a CUDA tensor and TRITON_INTERPRET is not set")
        qt = quantize_reference(x, fmt, block, rounding, seed, offset, hadamard)
        if dequantized_dtype is None:
            return qt
        return qt, qt.dequantize_unscaled().reshape(-1, x.shape[-1]).to(dequantized_dtype)

    lead, k = x.shape[:-1], x.shape[-1]
    x2, rows, _ = _as_2d_view(x)
    device = x.device
    br, bc = block
    qdata = torch.empty((rows, k // 2), dtype=torch.uint8, device=device)
    n_scales_r = rows // br if br > 1 else rows
    scale_bytes = torch.empty((n_scales_r, k // bc), dtype=torch.uint8, device=device)
    d_global = torch.ones((), dtype=torch.float32, device=device)
    deq = (torch.empty((rows, k), dtype=dequantized_dtype, device=device) if dequantized_dtype is not None
           else torch.empty(1, dtype=torch.float16, device=device))
    if rows and k:
        amax_bits = (_amax_bits(x2, rows, k, hadamard) if amax is None
                     else amax.reshape(1).to(torch.float32).view(torch.int32))
        stochastic = rounding is Rounding.STOCHASTIC
        seed_from_ptr = isinstance(seed, torch.Tensor) and seed.device == device
        seed_arg = seed.reshape(1).to(torch.int64) if seed_from_ptr else _int_arg(seed)
        block_r, block_k, warps = _tile_shape(rows, k, block, x.is_cuda and not _interpreting(), _tile)
        num_tiles_k = triton.cdiv(k, block_k)
        grid = (triton.cdiv(rows, block_r) * num_tiles_k,)
        _quantize_kernel[grid](
            x2, amax_bits, qdata, scale_bytes, d_global, deq, seed_arg, _int_arg(offset),
            rows, k, x2.stride(0), x2.stride(1), num_tiles_k,
            HADAMARD=hadamard, STOCHASTIC=stochastic, SCALE_KIND=scale_kind, TENSOR_SCALE=fmt.tensor_scale,
            SCALE_MAX=float(fmt.scale_max), ENCODE_NUMERATOR=float(E2M1_MAX * fmt.scale_max),
            BLOCK_ROWS=br, BLOCK_COLS=bc, WRITE_DEQ=dequantized_dtype is not None,
            BLOCK_R=block_r, BLOCK_K=block_k, SIGN_MASK=_RHT_NEG_MASK, SEED_FROM_PTR=seed_from_ptr, num_warps=warps,
        )
    scale_shape = (*lead, k // bc) if br == 1 else (n_scales_r, k // bc)
    qt = QuantizedTensor(
        qdata=qdata.reshape(*lead, k // 2),
        scale=scale_bytes.view(fmt.scale_format.storage_dtype).reshape(scale_shape),
        per_tensor_scale=d_global,
        format=fmt,
        block=block,
        hadamard=hadamard,
        orig_dtype=x.dtype,
    )
    if dequantized_dtype is None:
        return qt
    return qt, deq


def dequantize_unscaled_triton(qt: QuantizedTensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The exact unscaled operand ``E2M1[c] * d_b`` of ``qt`` as a (rows, K) ``dtype`` matrix (spec section 2,
    exactness fact: exact in float16 and bfloat16 for E4M3 scales). NaN where the block scale is NaN."""
    scale_kind = _scale_kind(qt.format)
    k = qt.shape[-1]
    rows = qt.qdata.numel() * 2 // k if k else 0
    if scale_kind is None or not qt.qdata.is_cuda and not _interpreting():
        return qt.dequantize_unscaled().reshape(rows, k).to(dtype)
    out = torch.empty((rows, k), dtype=dtype, device=qt.qdata.device)
    if rows and k:
        br, bc = qt.block
        block_r, block_k = 32, max(bc, min(256, triton.next_power_of_2(k)))
        grid = (triton.cdiv(rows, block_r), triton.cdiv(k, block_k))
        _dequantize_kernel[grid](
            qt.qdata.reshape(rows, k // 2), qt.scale.view(torch.uint8).reshape(-1), out, rows, k,
            SCALE_KIND=scale_kind, BLOCK_ROWS=br, BLOCK_COLS=bc, BLOCK_R=block_r, BLOCK_K=block_k,
        )
    return out


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"
