"""Fused Triton kernels: tensor amax, block-scaled FP4 quantization and exact dequantization.

Spec: docs/numerics.md section 2 (quantization, in FP32, in that order) and section 3.3 (the 16-point
random Hadamard transform), called "the spec" below; "spec step N" is step N of its section 2. Every kernel
here is bit-exact with `fp4compile.numerics.reference`:

* every division the spec needs correctly rounded is ``tl.div_rn`` (plain ``/`` is approximate in Triton);
* E4M3 / UE8M0 rounding is written in integer bit arithmetic, so it runs the same under ``TRITON_INTERPRET=1``
  (no libdevice, no inline PTX) and on the GPU;
* no multiply feeds an add unless the product is exact (a power-of-two scaling), so FMA contraction cannot
  change a rounding (the Hadamard butterflies are adds, the 1/4 and the sign flips are exact);
* stochastic rounding takes 8 random bits per element, as Blackwell's ``cvt.rs`` (docs/numerics.md, "Stochastic
  rounding"): element ``i`` in row-major order of the quantized ``(rows, K)`` layout takes byte ``i % 4`` of word
  ``(i % 16) // 4`` of ``tl.randint4x(seed, offset + i // 16)``, exactly as `fp4compile.numerics.philox.random_bytes`
  (`_philox4x32` is the same Philox4x32-10, one call per 16 elements, in the thread that holds them).

Speed (docs/benchmarks.md has the H100 numbers): each thread holds whole blocks (and whole RHT runs)
in registers, so block maxima, scales and the packing of 8 codes into an int32 word need no data exchange;
E2M1 round-to-nearest-even is one float add (`_e2m1_rne`) and stochastic rounding one truncating fp16 conversion and
three integer operations (`_e2m1_stochastic`) instead of chains of threshold compares; stores go through shared
memory into whole-line layouts (Triton's conversion).

Two launches per quantization: a reduction for the tensor amax (the tensor scale must be known before any
block scale, spec step 2), then the quantize kernel. The input is addressed through its strides, so the
column-wise form ``quantize_triton(x.t(), ...)`` reads the row-major activation directly.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import triton
import triton.language as tl

from ..numerics.formats import E2M1_MAX, Fp4Format, Rounding, ScaleRounding
from ..numerics.qtensor import QuantizedTensor
from . import interpreting, traceable

__all__ = [
    "quantize_triton",
    "tensor_amax_triton",
    "tensor_amaxes_triton",
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
# Kernels defined under TRITON_INTERPRET=1 run in Triton's interpreter (decided when `triton.jit` decorates them,
# i.e. at import, as here); a few numerics differ there and are worked around only there.
_INTERPRETED = tl.constexpr(interpreting())
# Negative entries of the RHT sign vector (1,1,1,-1,1,-1,-1,-1,-1,-1,-1,1,-1,1,-1,-1) as a bit mask.
_RHT_NEG_MASK = sum(1 << j for j in (3, 5, 6, 7, 8, 9, 10, 12, 14, 15))
assert _RHT_NEG_MASK == 0xD7E8


# ----------------------------------------------------------------------------------------------------------
# Device functions
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
def _butterfly(w, N: tl.constexpr, H: tl.constexpr):
    """One Sylvester-Hadamard stage on the runs of 16 of ``w`` (N, 16): pairs (a, b) at distance H become
    (a + b, a - b). A run lies in one thread's registers, so the reshapes and permutes move no data."""
    w = tl.reshape(w, (N, 16 // (2 * H), 2, H))
    a, b = tl.split(tl.permute(w, (0, 1, 3, 2)))  # (N, 16/(2H), H) each
    w = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
    return tl.reshape(w, (N, 16))


@triton.jit
def _hadamard16(v, BLOCK_R: tl.constexpr, NB_K: tl.constexpr, NCH: tl.constexpr, SIGN_MASK: tl.constexpr,
                QUARTER: tl.constexpr):
    """The RHT of spec section 3 on each run of 16 consecutive elements along K of the (BLOCK_R, NB_K, NCH, 8)
    float32 tile ``v``, in the reference's order: sign flips (exact), butterflies at distance 1, 2, 4, 8 (float32
    adds), then * 1/4 if QUARTER (exact unless subnormal; rounding is monotonic, so the amax kernel applies it to
    the maximum instead). Triton's ``-w`` is ``0 - w``: a zero may come out +0 where the reference has -0, which
    changes no code, scale or operand (both are code 0)."""
    N: tl.constexpr = BLOCK_R * NB_K * NCH // 2
    w = tl.reshape(v, (N, 16))
    lane = tl.arange(0, 16)
    w = tl.where(((SIGN_MASK >> lane) & 1)[None, :] != 0, -w, w)
    w = _butterfly(w, N, 1)
    w = _butterfly(w, N, 2)
    w = _butterfly(w, N, 4)
    w = _butterfly(w, N, 8)
    if QUARTER:
        w = w * 0.25
    return tl.reshape(w, (BLOCK_R, NB_K, NCH, 8))


@triton.jit
def _tile_cols(col0, NB_K: tl.constexpr, NCH: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Columns of a (1, NB_K, NCH, 8) tile view: block b, chunk h, element c is column col0 + b BLOCK_COLS + 8 h + c."""
    b = tl.arange(0, NB_K)[None, :, None, None]
    h = tl.arange(0, NCH)[None, None, :, None]
    c = tl.arange(0, 8)[None, None, None, :]
    return col0 + b * BLOCK_COLS + h * 8 + c


@triton.jit
def _tile_rows(row0, BLOCK_R: tl.constexpr, ROW_VEC: tl.constexpr):
    """Rows row0 .. row0 + BLOCK_R - 1, written so that Triton sees runs of only ROW_VEC contiguous rows: a
    column-wise read (stride_r = 1) then gives each thread ROW_VEC rows (ROW_VEC * 2 bytes of bf16) per load."""
    a = tl.arange(0, BLOCK_R)
    return row0 + (a // ROW_VEC) * ROW_VEC + a % ROW_VEC


@triton.jit
def _load_raw(x_ptr, rows, cols, R, K, stride_r, stride_k):
    """Elements (rows, cols) of the logical (R, K) matrix in x's dtype, zeros outside; ``rows`` and ``cols``
    broadcast against each other (a (BLOCK_R, 1, 1, 1) and a (1, NB_K, NCH, 8) tile view, or 2D).

    With the tile view, Triton gives the load its threads along the contiguous axis first (up to 16 bytes per
    thread), then along the other axes in order, so the chunk axis (last in that order) stays in each thread's
    registers while the row and block axes have threads enough: a thread holds whole blocks (and whole RHT runs),
    for row-major (stride_k = 1) and column-wise (stride_r = 1) reads alike.
    """
    mask = (rows < R) & (cols < K)
    return tl.load(x_ptr + rows.to(tl.int64) * stride_r + cols.to(tl.int64) * stride_k, mask=mask, other=0.0)


@triton.jit
def _widen(v):
    """A loaded tile as float32. bf16 is the top half of an fp32: shifted in, exact for subnormals too (the
    interpreter's cast is not)."""
    if v.dtype == tl.bfloat16:
        return (v.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    return v.to(tl.float32)


@triton.jit
def _abs_bits(v):
    """|v| as int32 bits: ordered like the magnitudes, with NaN above +inf (so a max propagates NaN)."""
    return v.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _e2m1_rne(mag):
    """E2M1 code (0..7) of float32 ``mag`` in [0, 6], round half to even (spec section 2 step 5), and its value.

    One float add does the rounding: with E = max(floor(log2 mag), 0), E2M1's step in mag's binade is 2^(E-1)
    (0.5 below 2, 1 in [2, 4), 2 in [4, 6]), which is the ulp of C = 2^(E+22); so ``r = mag + C`` (fp32, RNE) is C
    plus k steps, k = bits(r) - bits(C) (0..4), and the code is k + 2E. Ties go to the even k, i.e. the even code.
    """
    e = tl.maximum(mag.to(tl.int32, bitcast=True) >> 23, 127)  # biased exponent of the binade, >= 1.0's
    c = ((e + 22) << 23).to(tl.float32, bitcast=True)
    r = mag + c  # no product feeds this add (mag comes from a min): no FMA contraction
    code = r.to(tl.int32, bitcast=True) - (e * 0x7FFFFE + (22 << 23) + 254)  # bits(r) - bits(C) + 2 (e - 127)
    return code, r - c


@triton.jit
def _e2m1_stochastic(mag, words):
    """Stochastic E2M1 code (0..7) of float32 magnitudes ``mag >= 0`` (clamped to 6 here) with 8 random bits per
    element, as Blackwell's ``cvt.rs`` (docs/numerics.md, "Stochastic rounding"): up iff ``t + r >= 256``, ``t`` the 8
    bits truncated below E2M1's last kept bit, ``r`` byte ``c % 4`` of ``words`` for element ``c`` of the last axis
    (8 consecutive elements).

    E2M1 is fp16 with 9 fewer mantissa bits and an exponent bias 14 lower: ``mag * 2^-14`` (exact) truncated to fp16
    has the bits ``H = 512 lo_code + floor(f * 512)`` over the whole range, fp16's subnormals lining up with E2M1's
    (0.5 * 2^-14 = 2^-15). So ``t = (H >> 1) & 255`` and the code is ``(H + 2 r) >> 9``, computed next to the byte
    where it sits in the word (H shifted up to it, the word masked): a conversion and three integer operations, no
    branch on the binade.
    """
    y = tl.minimum(mag * 6.103515625e-05, 0.0003662109375)  # mag * 2^-14, clamped to 6 * 2^-14
    if _INTERPRETED:  # its fp16 conversion mishandles fp32 subnormals; all of them truncate to fp16 0 anyway
        y = tl.maximum(y, 9.313225746154785e-10)
    half_bits = y.to(tl.float16, fp_downcast_rounding="rtz").to(tl.uint16, bitcast=True).to(tl.uint32)
    j = tl.arange(0, 8) % 4  # the byte of each element; a constant per register, so the selects below fold
    byte = words & (0xFF << (8 * j)).to(tl.uint32)  # r << 8j (uint32: shifts are logical)
    # (H + 2r) >> 9 with H moved up to the byte rather than the byte down to H, where H << (8j - 1) fits in 32 bits.
    h_up = tl.where(j == 1, 7, tl.where(j == 2, 15, 0)).to(tl.uint32)
    r_down = tl.where(j == 0, byte << 1, tl.where(j == 3, byte >> 23, byte))
    code = ((half_bits << h_up) + r_down) >> tl.where(j == 1, 16, tl.where(j == 2, 24, 9)).to(tl.uint32)
    return code.to(tl.int32)


@triton.jit
def _philox4x32(seed, counter):
    """``tl.randint4x(seed, counter)`` (Philox4x32-10, counter (lo, hi, 0, 0), key (seed lo, seed hi)), bit for bit,
    with each round's two 32x32-bit products taken as one 64-bit product (high and low words in one multiply)."""
    seed = tl.zeros((), tl.int64) + seed  # an int argument, a constexpr (Triton specializes 1) or a loaded key
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = counter.to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    for _ in tl.static_range(10):
        prod_b = c2.to(tl.uint64) * 0xCD9E8D57
        prod_a = c0.to(tl.uint64) * 0xD2511F53
        c0, c1, c2, c3 = ((prod_b >> 32).to(tl.uint32) ^ c1 ^ k0, prod_b.to(tl.uint32),
                          (prod_a >> 32).to(tl.uint32) ^ c3 ^ k1, prod_a.to(tl.uint32))
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _philox_tile_words(seed, offset, rows, col0, K, zero, BLOCK_R: tl.constexpr, NB_K: tl.constexpr,
                       NCH: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """For each element of the (BLOCK_R, NB_K, NCH, 8) tile (rows ``rows``, columns from ``col0``), the Philox word
    that holds its random byte: element ``i = row * K + col`` takes word ``(i % 16) // 4`` of
    ``tl.randint4x(seed, offset + i // 16)`` (spec section 2 step 5; byte ``i % 4`` is `_e2m1_stochastic`'s).

    One Philox call per 16 elements, in the thread that holds them. ``zero``: a (BLOCK_R, NB_K) int32 tensor of
    zeros reduced from the tile (so in its layout, per block in the thread of the block), added to the counters so
    that Triton lays the Philox rounds out where the words are used instead of moving the words through shared
    memory; LLVM proves it zero (bit 31 of |x| bits is clear) and drops the add. Blocks of 8 (NCH == 1) take one
    call per chunk of 8,
    since a 16-element group may straddle two rows (K % 16 == 8) or two threads.
    """
    h = tl.arange(0, NCH)[None, None, :, None]
    c = tl.arange(0, 8)[None, None, None, :]
    if NCH == 2:  # blocks of 16: one group per block; element (h, c) takes word 2h + c // 4
        counter = offset + rows.to(tl.int64)[:, None] * (K // 16) + (col0 // 16 + tl.arange(0, NB_K))[None, :] + zero
        w0, w1, w2, w3 = _philox4x32(seed, counter)  # (BLOCK_R, NB_K)
        lower = tl.where(c < 4, w0[:, :, None, None], w1[:, :, None, None])
        upper = tl.where(c < 4, w2[:, :, None, None], w3[:, :, None, None])
        return tl.where(h == 0, lower, upper)  # constant conditions per register: no selects remain
    elif NCH % 2 == 0:  # blocks of 32 and more: NCH / 2 groups per block
        G: tl.constexpr = NCH // 2
        group = col0 // 16 + tl.arange(0, NB_K)[:, None] * (BLOCK_COLS // 16) + tl.arange(0, G)[None, :]
        counter = offset + rows.to(tl.int64)[:, None, None] * (K // 16) + group[None, :, :] + zero[:, :, None]
        w0, w1, w2, w3 = _philox4x32(seed, counter)  # (BLOCK_R, NB_K, G)
        # join(join(w0, w2), join(w1, w3))[..., p, q] = w_(2p + q): chunk 2g + p, elements 4q .. 4q + 3.
        words = tl.join(tl.join(w0, w2), tl.join(w1, w3))
        words = tl.broadcast_to(words[:, :, :, :, :, None], (BLOCK_R, NB_K, G, 2, 2, 4))
        return tl.reshape(words, (BLOCK_R, NB_K, NCH, 8))
    else:  # blocks of 8: one call per chunk, which is the first or the second half of its group
        first = rows.to(tl.int64)[:, None] * K + (col0 + tl.arange(0, NB_K) * 8)[None, :]
        w0, w1, w2, w3 = _philox4x32(seed, offset + first // 16 + zero)  # (BLOCK_R, NB_K)
        second_half = ((first & 8) != 0)[:, :, None, None]
        lower = tl.where(c < 4, w0[:, :, None, None], w1[:, :, None, None])
        upper = tl.where(c < 4, w2[:, :, None, None], w3[:, :, None, None])
        return tl.where(second_half, upper, lower)


@triton.jit
def _e2m1_value(code):
    """Float32 value of an E2M1 code (0..15): the 3 magnitude bits placed at fp16 bits 9..11 read as an fp16
    number times 2^14 (code 1 lands on the fp16 subnormal 2^-15), with the sign at bit 15."""
    half_bits = ((code & 7) << 9) | ((code & 8) << 12)
    return half_bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 16384.0


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _amax_tile(x_ptr, tile, num_tiles_k, R, K, stride_r, stride_k, HADAMARD: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_K: tl.constexpr, ROW_VEC: tl.constexpr):
    """Tile ``tile`` (row-tile major) of the amax kernel, raw: in the (row, block, chunk, element) view when the RHT
    needs whole runs of 16 in a thread, else as a plain (BLOCK_R, BLOCK_K) tile (a warp reads whole lines)."""
    rows = _tile_rows((tile // num_tiles_k) * BLOCK_R, BLOCK_R, ROW_VEC)
    col0 = (tile % num_tiles_k) * BLOCK_K
    if HADAMARD:
        raw = _load_raw(x_ptr, rows[:, None, None, None], _tile_cols(col0, BLOCK_K // 16, 2, 16), R, K, stride_r,
                        stride_k)
    else:
        raw = _load_raw(x_ptr, rows[:, None], col0 + tl.arange(0, BLOCK_K)[None, :], R, K, stride_r, stride_k)
    return raw


@triton.jit
def _amax_kernel(x_ptr, amax_bits_ptr, R, K, stride_r, stride_k, num_tiles_k, num_programs,
                 TILES_PER_PROGRAM: tl.constexpr, HADAMARD: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_K: tl.constexpr, ROW_VEC: tl.constexpr, SIGN_MASK: tl.constexpr, WITH_PLAIN: tl.constexpr):
    """Spec step 1: ``amax = max |x|`` (after the RHT where asked). A persistent loop over (BLOCK_R, BLOCK_K)
    tiles that loads tile i + 1 before reducing tile i, one integer atomic max per program (|x| bits order like
    the values; NaN wins). With HADAMARD and WITH_PLAIN, ``max |x|`` before the RHT too, into
    ``amax_bits_ptr[1]``, from the same loads: the two quantizations of one activation (row-wise for its forward
    GEMM, through the RHT for the weight gradient) need one read for both tensor amaxes."""
    pid = tl.program_id(0)
    raw = _amax_tile(x_ptr, pid, num_tiles_k, R, K, stride_r, stride_k, HADAMARD, BLOCK_R, BLOCK_K, ROW_VEC)
    best = tl.zeros((BLOCK_R, BLOCK_K // 16), dtype=tl.int32) if HADAMARD else tl.zeros((BLOCK_R, BLOCK_K),
                                                                                       dtype=tl.int32)
    best_plain = tl.zeros((BLOCK_R, BLOCK_K // 16), dtype=tl.int32)
    for i in range(TILES_PER_PROGRAM):  # constexpr trip count: the interpreter cannot loop to a runtime int
        v = _widen(raw)
        # Past the last tile rows >= R: the load is fully masked.
        raw = _amax_tile(x_ptr, pid + (i + 1) * num_programs, num_tiles_k, R, K, stride_r, stride_k, HADAMARD,
                         BLOCK_R, BLOCK_K, ROW_VEC)
        if HADAMARD:
            if WITH_PLAIN:
                best_plain = tl.maximum(best_plain, tl.max(tl.max(_abs_bits(v), axis=3), axis=2))
            v = _hadamard16(v, BLOCK_R, BLOCK_K // 16, 2, SIGN_MASK, False)
            best = tl.maximum(best, tl.max(tl.max(_abs_bits(v), axis=3), axis=2))  # in-thread axes
        else:
            best = tl.maximum(best, _abs_bits(v))
    amax_bits = tl.max(tl.max(best, axis=1), axis=0)
    if HADAMARD:  # the RHT's * 1/4, on the maximum
        amax_bits = _abs_bits(amax_bits.to(tl.float32, bitcast=True) * 0.25)
        if WITH_PLAIN:
            tl.atomic_max(amax_bits_ptr + 1, tl.max(tl.max(best_plain, axis=1), axis=0))
    tl.atomic_max(amax_bits_ptr, amax_bits)


@triton.jit
def _quantize_kernel(
    x_ptr, amax_bits_ptr, q_ptr, scale_ptr, decode_ptr, deq_ptr, seed, offset,
    R, K, stride_r, stride_k,
    HADAMARD: tl.constexpr, STOCHASTIC: tl.constexpr, SCALE_KIND: tl.constexpr, TENSOR_SCALE: tl.constexpr,
    SCALE_MAX: tl.constexpr, ENCODE_NUMERATOR: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    WRITE_DEQ: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ROW_VEC: tl.constexpr,
    SIGN_MASK: tl.constexpr, SEED_FROM_PTR: tl.constexpr,
):
    """Spec steps 2-5 on the (BLOCK_R, BLOCK_K) tile (program_id(0), program_id(1)) of the logical (R, K) matrix,
    held in the (row, block, chunk of 8, element) view of `_load_raw`.

    Writes packed codes ``q`` as (R, K/8) int32 words, block scale bytes (R/BLOCK_ROWS, K/BLOCK_COLS), the tensor
    decode scale ``D`` (program (0, 0)), and with WRITE_DEQ the exact unscaled operand ``E2M1[c] * d_b`` (R, K).
    """
    NB_K: tl.constexpr = BLOCK_K // BLOCK_COLS
    NCH: tl.constexpr = BLOCK_COLS // 8
    row0 = tl.program_id(0) * BLOCK_R
    col0 = tl.program_id(1) * BLOCK_K
    rows = _tile_rows(row0, BLOCK_R, ROW_VEC)
    cols = _tile_cols(col0, NB_K, NCH, BLOCK_COLS)
    v = _widen(_load_raw(x_ptr, rows[:, None, None, None], cols, R, K, stride_r, stride_k))
    if HADAMARD:
        v = _hadamard16(v, BLOCK_R, NB_K, NCH, SIGN_MASK, True)

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
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(decode_ptr, d_global)
    if STOCHASTIC and SEED_FROM_PTR:  # the key lives in device memory: no host read, so the launch can be captured
        seed = tl.load(seed)
    _quantize_tile(v, row0, rows, col0, cols, s, d_global, q_ptr, scale_ptr, deq_ptr, seed, offset, R, K, STOCHASTIC,
                   SCALE_KIND, SCALE_MAX, BLOCK_ROWS, BLOCK_COLS, WRITE_DEQ, BLOCK_R, BLOCK_K)


@triton.jit
def _quantize_tile(v, row0, rows, col0, cols, s, d_global, q_ptr, scale_ptr, deq_ptr, seed, offset, R, K,
                   STOCHASTIC: tl.constexpr, SCALE_KIND: tl.constexpr, SCALE_MAX: tl.constexpr,
                   BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, WRITE_DEQ: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Spec steps 3-5 and the stores of one float32 (BLOCK_R, NB_K, NCH, 8) tile (rows ``rows`` from ``row0``,
    columns ``cols`` from ``col0``), given the tensor scales: block reductions and code packing stay in a thread.

    Codes and the operand are stored through plain 2D views: Triton moves them through shared memory into a
    layout where a warp writes whole lines (a thread's own 8 or 16 bytes per row would leave half-written
    sectors: the fp16 operand cost 1.4x more time that way on the H100).
    """
    NB_K: tl.constexpr = BLOCK_K // BLOCK_COLS
    NCH: tl.constexpr = BLOCK_COLS // 8
    NB_R: tl.constexpr = BLOCK_R // BLOCK_ROWS

    # Step 3: block amax (in-thread over the chunk and element axes; over BLOCK_ROWS rows for 2D blocks), then d_b.
    row_block_amax_bits = tl.max(tl.max(_abs_bits(v), axis=3), axis=2)  # (BLOCK_R, NB_K)
    block_amax_bits = row_block_amax_bits
    if BLOCK_ROWS > 1:
        block_amax_bits = tl.max(tl.reshape(block_amax_bits, (NB_R, BLOCK_ROWS, NB_K)), axis=1)  # (NB_R, NB_K)
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
    block_rows = row0 // BLOCK_ROWS + tl.arange(0, NB_R)
    block_cols = col0 // BLOCK_COLS + tl.arange(0, NB_K)
    nbk = K // BLOCK_COLS
    s_ptrs = scale_ptr + block_rows.to(tl.int64)[:, None] * nbk + block_cols[None, :]
    s_mask = (block_rows < tl.cdiv(R, BLOCK_ROWS))[:, None] & (block_cols < nbk)[None, :]
    tl.store(s_ptrs, byte.to(tl.uint8), mask=s_mask)

    # Step 4: e_b = min(1 / (d_b * D), FLT_MAX), correctly rounded; per row of the tile for 2D blocks.
    e_block = tl.minimum(tl.div_rn(tl.full((NB_R, NB_K), 1.0, tl.float32), d_block * d_global),
                         3.4028234663852886e38)
    d_nan = tl.where(block_is_finite, d_block, float("nan"))
    if BLOCK_ROWS > 1:
        e_block = tl.reshape(tl.broadcast_to(e_block[:, None, :], (NB_R, BLOCK_ROWS, NB_K)), (BLOCK_R, NB_K))
        block_is_finite = tl.reshape(tl.broadcast_to(block_is_finite[:, None, :], (NB_R, BLOCK_ROWS, NB_K)),
                                     (BLOCK_R, NB_K))
        d_nan = tl.reshape(tl.broadcast_to(d_nan[:, None, :], (NB_R, BLOCK_ROWS, NB_K)), (BLOCK_R, NB_K))

    # Step 5: x * e_b, clamped to [-6, 6] (as a magnitude: the sign is kept apart), rounded to E2M1.
    scaled_v = v * e_block[:, :, None, None]
    if STOCHASTIC:
        zero = row_block_amax_bits >> 31  # the sign bit of |x| bits: 0, in the layout of the tile's blocks
        words = _philox_tile_words(seed, offset, rows, col0, K, zero, BLOCK_R, NB_K, NCH, BLOCK_COLS)
        code = _e2m1_stochastic(tl.abs(scaled_v), words)
    else:
        code, grid = _e2m1_rne(tl.minimum(tl.abs(scaled_v), 6.0))
    negative = scaled_v < 0  # -0.0 keeps code 0, as the reference's sign test
    code = code | tl.where(negative, 8, 0)

    # Stores: 8 codes per int32 word (the lower index in the lower nibble; non-finite blocks all zero), and the
    # optional exact dequantized operand.
    word = tl.sum(code << (4 * tl.arange(0, 8))[None, None, None, :], axis=3)  # disjoint nibbles: the sum is an or
    word = tl.where(block_is_finite[:, :, None], word, 0)
    row_mask = rows < R
    wcols = col0 // 8 + tl.arange(0, BLOCK_K // 8)[None, :]
    tl.store(q_ptr + rows.to(tl.int64)[:, None] * (K // 8) + wcols, tl.reshape(word, (BLOCK_R, BLOCK_K // 8)),
             mask=row_mask[:, None] & (wcols < K // 8))

    if WRITE_DEQ:
        if STOCHASTIC:
            value = _e2m1_value(code)
        else:
            value = grid * tl.where(negative, -1.0, 1.0)  # E2M1[c] itself, -0.0 for code 8 (Triton's -x is 0 - x)
        vals = (value * d_nan[:, :, None, None]).to(deq_ptr.dtype.element_ty)
        dcols = col0 + tl.arange(0, BLOCK_K)[None, :]
        tl.store(deq_ptr + rows.to(tl.int64)[:, None] * K + dcols, tl.reshape(vals, (BLOCK_R, BLOCK_K)),
                 mask=row_mask[:, None] & (dcols < K))


@triton.jit
def _dequantize_kernel(q_ptr, scale_ptr, out_ptr, R, K, SCALE_KIND: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                       BLOCK_COLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """``E2M1[c] * d_b`` of the (BLOCK_R, BLOCK_K) tile (program_id(0), program_id(1)) of a (R, K) code matrix
    (exact where the output dtype can hold it: always for E4M3 scales in fp16/bf16, spec section 2).

    The tile is viewed as (rows, groups of 16, 2 words, 8 codes): a thread loads a group's two int32 code words
    (the quantize kernel's packing: lower index in the lower nibble) and the group's one scale byte, and expands
    them in registers; the values are stored through a plain 2D view (whole lines per warp, as the quantize
    kernel stores its operand). One scale load per 16 outputs, not one per output.
    """
    NG: tl.constexpr = BLOCK_K // 16  # 16-element groups per tile row; a group lies in one block (16 or 32 wide)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    groups = tl.program_id(1) * NG + tl.arange(0, NG)
    row_ok = rows < R
    group_ok = groups < K // 16
    words_per_row = K // 8
    wcols = groups[None, :, None] * 2 + tl.arange(0, 2)[None, None, :]
    words = tl.load(q_ptr + rows.to(tl.int64)[:, None, None] * words_per_row + wcols,
                    mask=row_ok[:, None, None] & group_ok[None, :, None], other=0)
    code = (words[:, :, :, None] >> (4 * tl.arange(0, 8))[None, None, None, :]) & 0xF  # (BLOCK_R, NG, 2, 8)
    s_ptrs = scale_ptr + (rows // BLOCK_ROWS).to(tl.int64)[:, None] * (K // BLOCK_COLS) + (groups * 16 // BLOCK_COLS)[None, :]
    byte = tl.load(s_ptrs, mask=row_ok[:, None] & group_ok[None, :], other=0).to(tl.int32)
    if SCALE_KIND == 0:
        d = tl.where(byte == 0x7F, float("nan"), _e4m3_value(byte))
    else:
        d = tl.where(byte == 0xFF, float("nan"),
                     tl.where(byte == 0, (1 << 22), byte << 23).to(tl.float32, bitcast=True))
    vals = (_e2m1_value(code) * d[:, :, None, None]).to(out_ptr.dtype.element_ty)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], tl.reshape(vals, (BLOCK_R, BLOCK_K)),
             mask=row_ok[:, None] & (cols < K)[None, :])


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


#: Tiles of the quantize kernel on CUDA, (BLOCK_R, BLOCK_K, num_warps, ROW_VEC), for row-major reads (stride 1
#: along K) and for column-wise reads (``x.t()`` of a row-major tensor: stride 1 along the rows), tuned on the
#: H100 with benchmarks/bench_kernels.py --tiles (override per call with ``_tile=``).
QUANTIZE_TILE_CUDA: tuple = (16, 256, 4, 8)
QUANTIZE_TILE_CUDA_COLUMNS: tuple = (64, 64, 4, 2)
#: Tiles of the amax kernel on CUDA, (BLOCK_R, BLOCK_K, num_warps, ROW_VEC, programs per SM), likewise.
AMAX_TILE_CUDA: tuple = (16, 256, 4, 8, 16)
AMAX_TILE_CUDA_COLUMNS: tuple = (128, 64, 4, 4, 4)
#: Tile of the dequantize kernel on CUDA, (BLOCK_R, BLOCK_K, num_warps).
DEQUANTIZE_TILE_CUDA: tuple = (8, 512, 4)
#: On CPU (the interpreter): small tiles, few programs.
_TILE_CPU: tuple = (32, 64, 4, 8, 1)


def _tile_config(default: tuple, override: Optional[tuple]) -> tuple:
    return (tuple(override) + default[len(override):]) if override else default


def _sm_count(t: torch.Tensor) -> int:
    return _cuda_sm_count(t.device.index) if t.is_cuda and not interpreting() else 1


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: Optional[int]) -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index).multi_processor_count


def _int_arg(v: "int | torch.Tensor") -> int:
    return int(v.item()) if isinstance(v, torch.Tensor) else int(v)


def tensor_amax_triton(x: torch.Tensor, hadamard: bool = False,
                       _tile: Optional[tuple[int, ...]] = None) -> torch.Tensor:
    """``max |x|`` over the tensor viewed as (rows, K) (after the 16-point RHT along K where ``hadamard``),
    as a float32 0-dim tensor; NaN if any element is NaN. A Triton reduction kernel."""
    x2, rows, k = _as_2d_view(x)
    return _amax_bits(x2, rows, k, hadamard, _tile).view(torch.float32).reshape(())


def tensor_amaxes_triton(x: torch.Tensor, hadamard: bool = True,
                         _tile: Optional[tuple[int, ...]] = None) -> torch.Tensor:
    """``[tensor_amax_triton(x, hadamard), max |x|]`` as a float32 (2,) tensor, from one read of ``x``.

    The amaxes of an activation's two quantizations: through the RHT along the token axis for the weight
    gradient (``x`` the ``(features, tokens)`` view) and plain for its forward or input-gradient GEMM.
    """
    x2, rows, k = _as_2d_view(x)
    if not hadamard:
        return _amax_bits(x2, rows, k, False, _tile).view(torch.float32).repeat(2)
    return _amax_bits(x2, rows, k, True, _tile, with_plain=True).view(torch.float32)


def _amax_bits(x2: torch.Tensor, rows: int, k: int, hadamard: bool,
               _tile: Optional[tuple[int, ...]] = None, with_plain: bool = False) -> torch.Tensor:
    amax_bits = torch.zeros(2 if with_plain else 1, dtype=torch.int32, device=x2.device)
    if rows == 0 or k == 0:
        return amax_bits
    on_cuda = x2.is_cuda and not interpreting()
    default = (AMAX_TILE_CUDA_COLUMNS if x2.stride(1) != 1 else AMAX_TILE_CUDA) if on_cuda else _TILE_CPU
    tile_r, tile_k, warps, row_vec, per_sm = _tile_config(default, _tile)
    block_k = max(16, min(tile_k, triton.next_power_of_2(k)))
    block_r = min(tile_r, triton.next_power_of_2(rows))
    num_tiles_k = triton.cdiv(k, block_k)
    num_tiles = triton.cdiv(rows, block_r) * num_tiles_k
    # A few programs per SM, each looping over a power-of-two number of tiles (few compiled variants).
    tiles_per_program = triton.next_power_of_2(triton.cdiv(num_tiles, per_sm * _sm_count(x2)))
    programs = triton.cdiv(num_tiles, tiles_per_program)
    traceable(_amax_kernel)[(programs,)](
        x2, amax_bits, rows, k, x2.stride(0), x2.stride(1), num_tiles_k, programs,
        TILES_PER_PROGRAM=tiles_per_program, HADAMARD=hadamard, BLOCK_R=block_r, BLOCK_K=block_k,
        ROW_VEC=min(row_vec, block_r), SIGN_MASK=_RHT_NEG_MASK, WITH_PLAIN=with_plain, num_warps=warps,
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
    _tile: Optional[tuple[int, ...]] = None,
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
    if scale_kind is None or not x.is_cuda and not interpreting():
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
    # Codes are written as int32 words (8 per word) into a buffer of that dtype: a traced kernel (a
    # ``triton_op`` body, `fp4compile.ops.triton_ops`) must mutate whole tensors, not dtype views of them.
    code_words = torch.empty((rows, k // 8), dtype=torch.int32, device=device)
    n_scales_r = rows // br if br > 1 else rows
    scale_bytes = torch.empty((n_scales_r, k // bc), dtype=torch.uint8, device=device)
    # D: written by the kernel, 1 for an empty tensor (no launch).
    d_global = (torch.empty if rows and k else torch.ones)((), dtype=torch.float32, device=device)
    deq = (torch.empty((rows, k), dtype=dequantized_dtype, device=device) if dequantized_dtype is not None
           else torch.empty(1, dtype=torch.float16, device=device))
    if rows and k:
        if amax is not None:
            amax_bits = amax.reshape(1).to(torch.float32).view(torch.int32)
        elif fmt.tensor_scale:
            amax_bits = _amax_bits(x2, rows, k, hadamard)
        else:  # no tensor scale (MXFP4): the kernel reads no amax, so no reduction is launched for one
            amax_bits = torch.zeros(1, dtype=torch.int32, device=device)
        stochastic = rounding is Rounding.STOCHASTIC
        seed_from_ptr = isinstance(seed, torch.Tensor) and seed.device == device
        seed_arg = seed.reshape(1).to(torch.int64) if seed_from_ptr else _int_arg(seed)
        on_cuda = x.is_cuda and not interpreting()
        default = (QUANTIZE_TILE_CUDA_COLUMNS if x2.stride(1) != 1 else QUANTIZE_TILE_CUDA) if on_cuda else _TILE_CPU
        tile_r, tile_k, warps, row_vec = _tile_config(default[:4], _tile)
        # Tiles: multiples of the block shape, no larger than needed for small tensors.
        block_k = max(bc, 16, min(tile_k, triton.next_power_of_2(k)))
        block_r = max(br, min(tile_r, triton.next_power_of_2(rows)))
        traceable(_quantize_kernel)[(triton.cdiv(rows, block_r), triton.cdiv(k, block_k))](
            x2, amax_bits, code_words, scale_bytes, d_global, deq, seed_arg, _int_arg(offset),
            rows, k, x2.stride(0), x2.stride(1),
            HADAMARD=hadamard, STOCHASTIC=stochastic, SCALE_KIND=scale_kind, TENSOR_SCALE=fmt.tensor_scale,
            SCALE_MAX=float(fmt.scale_max), ENCODE_NUMERATOR=float(E2M1_MAX * fmt.scale_max),
            BLOCK_ROWS=br, BLOCK_COLS=bc, WRITE_DEQ=dequantized_dtype is not None,
            BLOCK_R=block_r, BLOCK_K=block_k, ROW_VEC=min(row_vec, block_r), SIGN_MASK=_RHT_NEG_MASK,
            SEED_FROM_PTR=seed_from_ptr, num_warps=warps,
        )
    scale_shape = (*lead, k // bc) if br == 1 else (n_scales_r, k // bc)
    qt = QuantizedTensor(
        qdata=code_words.view(torch.uint8).reshape(*lead, k // 2),
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


def dequantize_unscaled_triton(qt: QuantizedTensor, dtype: torch.dtype = torch.float16,
                               _tile: Optional[tuple[int, ...]] = None) -> torch.Tensor:
    """The exact unscaled operand ``E2M1[c] * d_b`` of ``qt`` as a (rows, K) ``dtype`` matrix (spec section 2,
    exactness fact: exact in float16 and bfloat16 for E4M3 scales). NaN where the block scale is NaN."""
    scale_kind = _scale_kind(qt.format)
    k = qt.shape[-1]
    rows = qt.qdata.numel() * 2 // k if k else 0
    if scale_kind is None or not qt.qdata.is_cuda and not interpreting():
        return qt.dequantize_unscaled().reshape(rows, k).to(dtype)
    out = torch.empty((rows, k), dtype=dtype, device=qt.qdata.device)
    if rows and k:
        br, bc = qt.block
        on_cuda = qt.qdata.is_cuda and not interpreting()
        tile_r, tile_k, warps = _tile_config(DEQUANTIZE_TILE_CUDA if on_cuda else _TILE_CPU[:3], _tile)
        block_r, block_k = max(br, min(tile_r, triton.next_power_of_2(rows))), max(bc, 16, min(tile_k, triton.next_power_of_2(k)))
        codes = qt.qdata.reshape(rows, k // 2)
        if not codes.is_contiguous() or codes.storage_offset() % 4:
            codes = codes.contiguous()  # read as int32 words
        traceable(_dequantize_kernel)[(triton.cdiv(rows, block_r), triton.cdiv(k, block_k))](
            codes.view(torch.int32), qt.scale.view(torch.uint8).reshape(-1), out, rows, k,
            SCALE_KIND=scale_kind, BLOCK_ROWS=br, BLOCK_COLS=bc, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=warps,
        )
    return out

