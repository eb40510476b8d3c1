"""The NVFP4 GEMM on Hopper: exact emulation through fp16 tensor cores, and the choice among its paths.

``C = (D_a * D_b) * (A_u @ B_u^T) (+ bias)``, FP32 accumulation (docs/numerics.md section 2.4;
the same semantics as `fp4compile.numerics.gemm.gemm_reference`). ``A_u = E2M1[c] * d_b`` is exact in float16
(docs/numerics.md section 2.5), so any fp16 tensor-core GEMM with an FP32 accumulator computes the NVFP4
product up to FP32 summation order; the per-tensor scales are the alpha of the epilogue.

Paths (names recorded by the backend; see `choose_gemm_path`):

``"cublas_dequant"``
    exact fp16 operands (written by the quantize kernel or `dequantize_unscaled_triton`) into cuBLAS
    (``torch.mm(..., out_dtype=float32)``), then a one-pass Triton epilogue ``C * alpha + bias``.
``"triton_dequant"``
    the same fp16 operands into a Triton tensor-core GEMM whose epilogue applies alpha (read on the device,
    no host sync) and the bias: `gemm_dense`, on Hopper a persistent TMA kernel (`_dense_tma_kernel`), else the
    pointer-load `_gemm_kernel`.
``"triton_packed"``
    a Triton GEMM that loads packed E2M1 codes and E4M3 scale bytes and dequantizes them in registers.
``"triton_fused_quant"``
    `gemm_quantize_a`: A arrives in high precision and is quantized (1x16, round to nearest, bit-identical to
    `quantize_triton`) in the GEMM prologue; the tensor amax comes from the reduction kernel beforehand.
``"native_fp4"``
    compute capability 10.x only: ``torch._scaled_mm`` on NVFP4 operands. UNTESTED (no such GPU here); any
    failure falls back to ``"triton_dequant"`` with a logged reason.

The three training layouts: forward ``x (M, K) . W (N, K)``; input gradient ``dy (M, N) . W`` with ``W``
stored ``(N, K)`` in 16x16 tiles and used as a ``(K', N')`` operand (``b_transposed=True``); weight
gradient ``dy^T (N, M) . x^T (K, M)``, both quantized along the token axis M.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..numerics.formats import Fp4Format
from ..numerics.gemm import check_gemm_operands, gemm_reference
from ..numerics.qtensor import QuantizedTensor
from . import interpreting
from .quantize import (
    SCALE_E4M3,
    _abs_bits,
    _e2m1_value,
    _e4m3_rne,
    _e4m3_value,
    _amax_bits,
    _as_2d_view,
    _cuda_sm_count,
    _scale_kind,
    dequantize_unscaled_triton,
)

__all__ = [
    "gemm",
    "gemm_quantize_a",
    "choose_gemm_path",
    "GEMM_PATHS",
    "native_fp4_available",
    "MEASURED_PATH_TABLE",
    "gemm_dense",
    "DenseConfig",
    "DENSE_CONFIG_TABLE",
    "dense_tma_supported",
]

logger = logging.getLogger(__name__)

GEMM_PATHS = ("cublas_dequant", "triton_dequant", "triton_packed", "triton_fused_quant", "native_fp4")

# Operand load modes of the Triton GEMM kernel (constexpr switches).
_DENSE = 0  # an fp16/bf16 matrix (the exact dequantized operand), any strides
_PACKED = 1  # packed E2M1 codes + E4M3 scale bytes, dequantized in registers
_QUANTIZE = 2  # (A only) a high-precision matrix quantized in the prologue (NVFP4, 1x16, round to nearest)


# ----------------------------------------------------------------------------------------------------------
# Operand loaders: each returns the fp16 (BLOCK_M, BLOCK_K) A tile or (BLOCK_K, BLOCK_N) B tile of step k0.
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _e4m3_to_f16(byte):
    """An E4M3 scale byte as fp16 (exact: 2^-9..448 fit), NaN for the NaN byte 0x7F."""
    return tl.where(byte == 0x7F, float("nan"), _e4m3_value(byte)).to(tl.float16)


@triton.jit
def _unpack_last(packed, R: tl.constexpr, C: tl.constexpr):
    """(R, C/2) packed bytes -> (R, C) int32 codes, low nibble first along axis 1."""
    p = packed.to(tl.int32)
    return tl.reshape(tl.join(p & 0xF, p >> 4), (R, C))


@triton.jit
def _load_a(a_ptr, sa_ptr, rm, k0, M, K, stride_am, stride_ak, s_a, MODE: tl.constexpr, A_BLOCK_ROWS: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rk = k0 + tl.arange(0, BLOCK_K)
    mask = (rm < M)[:, None] & (rk < K)[None, :]
    if MODE == 0:
        ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :] * stride_ak
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float16)
    elif MODE == 1:
        # Packed (M, K/2) codes; scale bytes (M / A_BLOCK_ROWS, K / 16).
        rk2 = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(a_ptr + rm.to(tl.int64)[:, None] * (K // 2) + rk2[None, :],
                         mask=(rm < M)[:, None] & (rk2 < K // 2)[None, :], other=0)
        codes = _unpack_last(packed, BLOCK_M, BLOCK_K)
        rkb = k0 // 16 + tl.arange(0, BLOCK_K // 16)
        sbyte = tl.load(sa_ptr + (rm // A_BLOCK_ROWS).to(tl.int64)[:, None] * (K // 16) + rkb[None, :],
                        mask=(rm < M)[:, None] & (rkb < K // 16)[None, :], other=0).to(tl.int32)
        vals = tl.reshape(_e2m1_value(codes).to(tl.float16), (BLOCK_M, BLOCK_K // 16, 16))
        return tl.reshape(vals * _e4m3_to_f16(sbyte)[:, :, None], (BLOCK_M, BLOCK_K))
    else:
        # Spec section 2 steps 3-5 on the tile, as in `quantize._quantize_kernel` (NVFP4, 1x16, nearest).
        ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :] * stride_ak
        v = tl.reshape(tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), (BLOCK_M, BLOCK_K // 16, 16))
        block_amax_bits = tl.max(_abs_bits(v), axis=2)
        block_amax = block_amax_bits.to(tl.float32, bitcast=True)
        scaled = tl.minimum(block_amax * (s_a * 0.16666666666666666), 448.0)
        _, d_block = _e4m3_rne(scaled)
        # s_a is passed as (S, D): D recomputed as div_rn(1, S) equals the stored tensor decode scale.
        d_global = tl.div_rn(tl.full((), 1.0, tl.float32), s_a)
        e_block = tl.minimum(tl.div_rn(tl.full((BLOCK_M, BLOCK_K // 16), 1.0, tl.float32), d_block * d_global),
                             3.4028234663852886e38)
        sv = tl.minimum(tl.maximum(v * e_block[:, :, None], -6.0), 6.0)
        mag = tl.abs(sv)
        code = ((mag > 0.25).to(tl.int32) + (mag >= 0.75).to(tl.int32) + (mag > 1.25).to(tl.int32)
                + (mag >= 1.75).to(tl.int32) + (mag > 2.5).to(tl.int32) + (mag >= 3.5).to(tl.int32)
                + (mag > 5.0).to(tl.int32))
        code = code | tl.where(sv < 0, 8, 0)
        d_nan = tl.where(block_amax_bits < 0x7F800000, d_block, float("nan"))
        vals = _e2m1_value(code).to(tl.float16) * d_nan.to(tl.float16)[:, :, None]
        return tl.reshape(vals, (BLOCK_M, BLOCK_K))


@triton.jit
def _load_b(b_ptr, sb_ptr, n0, k0, N, K, stride_bk, stride_bn, MODE: tl.constexpr, B_T: tl.constexpr,
            B_BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = n0 + tl.arange(0, BLOCK_N)
    rk = k0 + tl.arange(0, BLOCK_K)
    if MODE == 0:
        ptrs = b_ptr + rk.to(tl.int64)[:, None] * stride_bk + rn.to(tl.int64)[None, :] * stride_bn
        return tl.load(ptrs, mask=(rk < K)[:, None] & (rn < N)[None, :], other=0.0).to(tl.float16)
    elif B_T:
        # Stored (K, N): codes packed along N, (K/16, N/16) tile scales.
        rn2 = n0 // 2 + tl.arange(0, BLOCK_N // 2)
        packed = tl.load(b_ptr + rk.to(tl.int64)[:, None] * (N // 2) + rn2[None, :],
                         mask=(rk < K)[:, None] & (rn2 < N // 2)[None, :], other=0)
        codes = _unpack_last(packed, BLOCK_K, BLOCK_N)
        sbyte = tl.load(sb_ptr + (rk // 16).to(tl.int64)[:, None] * (N // 16) + (rn // 16)[None, :],
                        mask=(rk < K)[:, None] & (rn < N)[None, :], other=0).to(tl.int32)
        return _e2m1_value(codes).to(tl.float16) * _e4m3_to_f16(sbyte)
    else:
        # Stored (N, K): codes packed along K, scales (N / B_BLOCK_ROWS, K / 16). Build the (BLOCK_N, BLOCK_K)
        # tile, then transpose it to (BLOCK_K, BLOCK_N).
        rk2 = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(b_ptr + rn.to(tl.int64)[:, None] * (K // 2) + rk2[None, :],
                         mask=(rn < N)[:, None] & (rk2 < K // 2)[None, :], other=0)
        codes = _unpack_last(packed, BLOCK_N, BLOCK_K)
        rkb = k0 // 16 + tl.arange(0, BLOCK_K // 16)
        sbyte = tl.load(sb_ptr + (rn // B_BLOCK_ROWS).to(tl.int64)[:, None] * (K // 16) + rkb[None, :],
                        mask=(rn < N)[:, None] & (rkb < K // 16)[None, :], other=0).to(tl.int32)
        vals = tl.reshape(_e2m1_value(codes).to(tl.float16), (BLOCK_N, BLOCK_K // 16, 16))
        return tl.trans(tl.reshape(vals * _e4m3_to_f16(sbyte)[:, :, None], (BLOCK_N, BLOCK_K)))


@triton.jit
def _tile_mn(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M row tiles walk the column tiles together (their B columns stay in L2)."""
    width = GROUP_M * num_pid_n
    first_m = (tile // width) * GROUP_M
    rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % width) % rows, (tile % width) // rows


@triton.jit
def _gemm_kernel(
    a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, bias_ptr, da_ptr, db_ptr, amax_a_ptr,
    M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    A_MODE: tl.constexpr, B_MODE: tl.constexpr, B_T: tl.constexpr, A_BLOCK_ROWS: tl.constexpr,
    B_BLOCK_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, K_STATIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[M, N] = (D_a * D_b) * sum_k A_u[:, k] B_u[k, :] (+ bias), fp16 tensor-core products, FP32 accumulator.

    Grouped launch order (GROUP_M row tiles share the B columns in L2), as in the Triton matmul tutorial.
    """
    pid_m, pid_n = _tile_mn(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

    if A_MODE == 2:
        # Spec step 2 from the precomputed amax: S, then D_a = 1 / S (both correctly rounded).
        amax_bits = tl.load(amax_a_ptr)
        amax = amax_bits.to(tl.float32, bitcast=True)
        one = tl.full((), 1.0, tl.float32)
        s_a = tl.minimum(tl.div_rn(tl.full((), 2688.0, tl.float32), amax), 3.4028234663852886e38)
        s_a = tl.where((amax == 0) | (s_a == 0) | (amax_bits >= 0x7F800000), one, s_a)
        d_a = tl.div_rn(one, s_a)
    else:
        s_a = tl.full((), 1.0, tl.float32)
        d_a = tl.load(da_ptr)
    alpha = d_a * tl.load(db_ptr)  # one fp32 product, as the reference's D_a * D_b

    # K_STATIC > 0 (the interpreter only) makes the trip count a Python int: Triton 3.6's interpreter cannot
    # loop to a runtime int under NumPy 2.4. Compiled kernels loop to the runtime K.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_STATIC if K_STATIC > 0 else K, BLOCK_K):
        a = _load_a(a_ptr, sa_ptr, rm, k0, M, K, stride_am, stride_ak, s_a, A_MODE, A_BLOCK_ROWS, BLOCK_M, BLOCK_K)
        b = _load_b(b_ptr, sb_ptr, pid_n * BLOCK_N, k0, N, K, stride_bk, stride_bn, B_MODE, B_T, B_BLOCK_ROWS, BLOCK_N, BLOCK_K)
        acc = tl.dot(a, b, acc)

    # Epilogue in the reference's order: (acc * alpha) rounded, then + bias, then the output dtype.
    c = acc * alpha
    if HAS_BIAS:
        c = c + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, c.to(c_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _scale_bias_kernel(c_ptr, out_ptr, bias_ptr, da_ptr, db_ptr, M, N, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The cuBLAS path's epilogue, one pass: out = (c * (D_a * D_b)) + bias in the output dtype."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    c = tl.load(c_ptr + offs, mask=mask, other=0.0) * (tl.load(da_ptr) * tl.load(db_ptr))
    if HAS_BIAS:
        c = c + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, c.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Tile configurations
# ----------------------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages), tried by the autotuner on CUDA.
_CUDA_CONFIGS = (
    (128, 256, 64, 8, 8, 3),
    (128, 128, 64, 8, 4, 4),
    (128, 128, 64, 8, 8, 3),
    (64, 128, 64, 8, 4, 4),
    (128, 64, 64, 8, 4, 4),
)
_INTERPRET_CONFIG = (32, 32, 32, 4, 4, 1)


@functools.lru_cache(maxsize=None)
def _tuned_kernel():
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}, num_warps=w, num_stages=s)
        for bm, bn, bk, g, w, s in _CUDA_CONFIGS
    ]
    return triton.autotune(configs=configs, key=["M", "N", "K", "A_MODE", "B_MODE", "B_T", "HAS_BIAS"],
                           restore_value=[])(_gemm_kernel)


def _launch_gemm(a_arg, sa, b_arg, sb, out, bias, d_a, d_b, amax_a, m, n, k, a_strides, b_strides, a_mode, b_mode,
                 b_t, a_block_rows, b_block_rows):
    has_bias = bias is not None
    bias_arg = bias if has_bias else out
    common = dict(A_MODE=a_mode, B_MODE=b_mode, B_T=b_t, A_BLOCK_ROWS=a_block_rows, B_BLOCK_ROWS=b_block_rows,
                  HAS_BIAS=has_bias, K_STATIC=k if interpreting() else 0)
    args = (a_arg, sa, b_arg, sb, out, bias_arg, d_a, d_b, amax_a, m, n, k, *a_strides, *b_strides,
            out.stride(0), out.stride(1))
    if out.is_cuda and not interpreting():
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _tuned_kernel()[grid](*args, **common)
    else:
        bm, bn, bk, g, w, s = _INTERPRET_CONFIG
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _gemm_kernel[grid](*args, **common, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, num_warps=w)


# ----------------------------------------------------------------------------------------------------------
# Dense GEMM on Hopper: TMA tensor descriptors, a persistent grid, the epilogue fused (``gemm_dense``)
# ----------------------------------------------------------------------------------------------------------
#
# The "triton_dequant" product of two exact fp16 operands, written for sm_90: A (M, K) row-major and B stored
# either (N, K) row-major (forward and weight gradient: read transposed) or (K, N) row-major (input gradient),
# both read through host-side TMA descriptors (the bulk tensor copy engine; out-of-bounds rows and columns read
# as zeros and are clipped on the store, so no masks), the C tile written by a TMA store in the output dtype.
# Three schedules (`DenseConfig.schedule`):
#   * "dp" (data-parallel): NUM_PROGS persistent programs walk the output tiles in grouped order, each tile's
#     whole K; the programs at work at any moment hold neighbouring tiles at the same k, so A and B come from L2.
#   * "split": for few-tile, long-K shapes (weight gradients: 36-144 tiles of 128x128 on 132 SMs), the whole waves
#     of tiles run data-parallel and the R tiles left over are cut into S k-chunks (S = NUM_PROGS // R: one more
#     wave of short units, all programs at the same k-chunk at once). The unit holding a tile's last chunk waits
#     for the S - 1 FP32 partial tiles of the others (workspace, in L2), then adds them to its own in chunk order.
#   * "headtail": T < NUM_PROGS tiles: T programs take the first K_HEAD k-steps of one tile each, the others take
#     the remaining k-steps of T / (NUM_PROGS - T) tiles each; the head waits for its tail's partial and adds it.
# Both cut schedules are deterministic (fixed order of the adds; atomics only on the per-tile flags) and wait
# only on units that never wait, so they cannot deadlock while all NUM_PROGS programs are resident (NUM_PROGS is
# at most the number of SMs and one program fits on an SM).
# Epilogue in the reference's order for all: (acc * (D_a * D_b)) rounded to FP32, + bias in FP32, the cast.


@triton.jit
def _dense_step(a_desc, b_desc, acc, off_m, off_n, ki, B_KN: tl.constexpr, BLOCK_K: tl.constexpr):
    off_k = ki * BLOCK_K
    a = a_desc.load([off_m, off_k])
    if B_KN:
        b = b_desc.load([off_k, off_n])
    else:
        b = b_desc.load([off_n, off_k]).T
    return tl.dot(a, b, acc)


@triton.jit
def _dense_mma(a_desc, b_desc, acc, off_m, off_n, k_lo, k_hi, B_KN: tl.constexpr, BLOCK_K: tl.constexpr,
               INTERP: tl.constexpr):
    """acc += A[off_m:, k] B[k, off_n:] over k-steps k_lo..k_hi-1 (fp16 operands, FP32 accumulator).

    INTERP (the interpreter only): a while loop, since Triton 3.6's interpreter cannot take a runtime loop bound
    under NumPy 2.4 (compiled kernels need the for loop: only it is software-pipelined)."""
    if INTERP:
        ki = k_lo
        while ki < k_hi:
            acc = _dense_step(a_desc, b_desc, acc, off_m, off_n, ki, B_KN, BLOCK_K)
            ki += 1
    else:
        for ki in range(k_lo, k_hi):
            acc = _dense_step(a_desc, b_desc, acc, off_m, off_n, ki, B_KN, BLOCK_K)
    return acc


@triton.jit
def _dense_store(c_desc, acc, alpha, bias_ptr, off_m, off_n, N, HAS_BIAS: tl.constexpr, WIDTH: tl.constexpr):
    c = acc * alpha
    if HAS_BIAS:
        rn = off_n + tl.arange(0, WIDTH)
        c = c + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_desc.store([off_m, off_n], c.to(c_desc.dtype))


@triton.jit
def _dense_epilogue(c_desc, acc, alpha, bias_ptr, off_m, off_n, N, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, EPI_SPLIT: tl.constexpr):
    """C tile = (acc * alpha) (+ bias) in the output dtype; EPI_SPLIT stores it as two (BLOCK_M, BLOCK_N/2)
    halves (half the shared-memory staging of the TMA store)."""
    if EPI_SPLIT:
        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        _dense_store(c_desc, left, alpha, bias_ptr, off_m, off_n, N, HAS_BIAS, BLOCK_N // 2)
        _dense_store(c_desc, right, alpha, bias_ptr, off_m, off_n + BLOCK_N // 2, N, HAS_BIAS, BLOCK_N // 2)
    else:
        _dense_store(c_desc, acc, alpha, bias_ptr, off_m, off_n, N, HAS_BIAS, BLOCK_N)


_FLAG_STRIDE = tl.constexpr(32)  # int32 flags 128 bytes apart: pollers of one tile do not share a line


@triton.jit
def _put_partial(ws_ptr, flag_ptr, slot, tile, acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Write an FP32 partial tile to workspace slot `slot` (L2), then count it on the tile's flag (release)."""
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(ws_ptr + slot.to(tl.int64) * (BLOCK_M * BLOCK_N) + offs, acc, cache_modifier=".cg")
    tl.debug_barrier()
    tl.atomic_add(flag_ptr + tile * _FLAG_STRIDE, 1, sem="release", scope="gpu")


@triton.jit
def _add_partial(ws_ptr, slot, acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    return acc + tl.load(ws_ptr + slot.to(tl.int64) * (BLOCK_M * BLOCK_N) + offs, cache_modifier=".cg")


@triton.jit
def _wait_partials(flag_ptr, tile, count):
    """Spin until the tile's flag reaches `count`, zeroing it then for the next launch: a compare-and-swap
    (acquire), issued by one thread of the program (a scalar atomic), on a flag alone in its 128-byte line."""
    while tl.atomic_cas(flag_ptr + tile * _FLAG_STRIDE, count, 0, sem="acquire", scope="gpu") != count:
        pass
    tl.debug_barrier()


@triton.jit
def _dense_tma_kernel(
    a_desc, b_desc, c_desc, bias_ptr, da_ptr, db_ptr, ws_ptr, flag_ptr, M, N, K, DP_TILES, K_HEAD,
    B_KN: tl.constexpr, HAS_BIAS: tl.constexpr, SCHEDULE: tl.constexpr, SPLIT_K: tl.constexpr,
    FLATTEN: tl.constexpr, EPI_SPLIT: tl.constexpr, NUM_PROGS: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The dense GEMM on TMA descriptors: launched with host-side descriptors (`_launch_dense_tma`, the eager
    ``fp4compile::gemm`` op), and called as a function by `fp4compile.codegen.gemm_device_tma`'s kernel with
    descriptors made on the device: the same tiles and k order, so both give the same bits.

    C[M, N] = (D_a * D_b) * (A @ B) (+ bias), A and B exact fp16 operands read by TMA, FP32 accumulator.

    SCHEDULE 0 "dp": tiles [0, num_tiles) whole. 1 "split": tiles [0, DP_TILES) whole, the others in SPLIT_K
    k-chunks. 2 "headtail": k-steps [0, K_HEAD) of tile t on program NUM_PROGS - num_tiles + t, the rest of the
    tiles' k-steps on programs [0, NUM_PROGS - num_tiles) (tails first in program order: the interpreter runs the
    programs one after the other). INTERP: run under the interpreter (while loops in place of the runtime-bounded
    for loops, see `_dense_mma`).
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    alpha = tl.load(da_ptr) * tl.load(db_ptr)  # one fp32 product, as the reference's D_a * D_b

    if SCHEDULE != 2:
        dp_tiles = num_tiles if SCHEDULE == 0 else DP_TILES
        if INTERP:
            tile = pid
            while tile < dp_tiles:
                pid_m, pid_n = _tile_mn(tile, num_pid_m, num_pid_n, GROUP_M)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                acc = _dense_mma(a_desc, b_desc, acc, pid_m * BLOCK_M, pid_n * BLOCK_N, 0, k_tiles, B_KN, BLOCK_K,
                                 INTERP)
                _dense_epilogue(c_desc, acc, alpha, bias_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, N, HAS_BIAS,
                                BLOCK_M, BLOCK_N, EPI_SPLIT)
                tile += NUM_PROGS
        else:
            # The epilogue's tile index is a second counter (as in Triton's persistent-matmul tutorial): with the
            # loop flattened, the epilogue of one tile and the loads of the next share an iteration.
            tile_c = pid - NUM_PROGS
            for tile in tl.range(pid, dp_tiles, NUM_PROGS, flatten=FLATTEN):
                pid_m, pid_n = _tile_mn(tile, num_pid_m, num_pid_n, GROUP_M)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                acc = _dense_mma(a_desc, b_desc, acc, pid_m * BLOCK_M, pid_n * BLOCK_N, 0, k_tiles, B_KN, BLOCK_K,
                                 INTERP)
                tile_c += NUM_PROGS
                pid_m, pid_n = _tile_mn(tile_c, num_pid_m, num_pid_n, GROUP_M)
                _dense_epilogue(c_desc, acc, alpha, bias_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, N, HAS_BIAS,
                                BLOCK_M, BLOCK_N, EPI_SPLIT)
        if SCHEDULE == 1:
            # Unit v = s * rest + r: chunk s of tile DP_TILES + r. Programs take units in increasing v and a last
            # chunk waits only on smaller v of its tile, never waiting themselves.
            rest = num_tiles - DP_TILES
            chunk = tl.cdiv(k_tiles, SPLIT_K)
            v = pid
            while v < rest * SPLIT_K:
                s = v // rest
                r = v % rest
                tile = DP_TILES + r
                pid_m, pid_n = _tile_mn(tile, num_pid_m, num_pid_n, GROUP_M)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                acc = _dense_mma(a_desc, b_desc, acc, pid_m * BLOCK_M, pid_n * BLOCK_N, s * chunk,
                                 tl.minimum(s * chunk + chunk, k_tiles), B_KN, BLOCK_K, INTERP)
                if s < SPLIT_K - 1:
                    _put_partial(ws_ptr, flag_ptr, r * (SPLIT_K - 1) + s, tile, acc, BLOCK_M, BLOCK_N)
                else:
                    _wait_partials(flag_ptr, tile, SPLIT_K - 1)
                    for q in range(SPLIT_K - 1):  # own chunk + chunks 0, 1, ..: a fixed order
                        acc = _add_partial(ws_ptr, r * (SPLIT_K - 1) + q, acc, BLOCK_M, BLOCK_N)
                    _dense_epilogue(c_desc, acc, alpha, bias_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, N, HAS_BIAS,
                                    BLOCK_M, BLOCK_N, EPI_SPLIT)
                v += NUM_PROGS
    else:
        n_tail = NUM_PROGS - num_tiles  # programs [0, n_tail) do tails; the host makes sure num_tiles < NUM_PROGS
        if pid >= n_tail:
            tile = pid - n_tail
            pid_m, pid_n = _tile_mn(tile, num_pid_m, num_pid_n, GROUP_M)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc = _dense_mma(a_desc, b_desc, acc, pid_m * BLOCK_M, pid_n * BLOCK_N, 0, K_HEAD, B_KN, BLOCK_K, INTERP)
            _wait_partials(flag_ptr, tile, 1)
            acc = _add_partial(ws_ptr, tile, acc, BLOCK_M, BLOCK_N)
            _dense_epilogue(c_desc, acc, alpha, bias_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, N, HAS_BIAS,
                            BLOCK_M, BLOCK_N, EPI_SPLIT)
        else:
            tile = pid
            while tile < num_tiles:
                pid_m, pid_n = _tile_mn(tile, num_pid_m, num_pid_n, GROUP_M)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                acc = _dense_mma(a_desc, b_desc, acc, pid_m * BLOCK_M, pid_n * BLOCK_N, K_HEAD, k_tiles, B_KN,
                                 BLOCK_K, INTERP)
                _put_partial(ws_ptr, flag_ptr, tile, tile, acc, BLOCK_M, BLOCK_N)
                tile += n_tail


_SCHEDULES = {"dp": 0, "split": 1, "headtail": 2}


@dataclasses.dataclass(frozen=True)
class DenseConfig:
    """A tile configuration and schedule of `_dense_tma_kernel` (see the schedules above; ``split_k`` 0: the
    host picks S = programs // leftover tiles)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 4
    schedule: str = "dp"
    epi_split: bool = False
    flatten: bool = True
    split_k: int = 0

    def name(self) -> str:
        s = f"{self.block_m}x{self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages}"
        if self.group_m != 8:
            s += f" g{self.group_m}"
        if self.schedule != "dp":
            s += f" {self.schedule}" + (f"{self.split_k}" if self.split_k else "")
        return s + (" epi/2" if self.epi_split else "") + (" flat" if self.flatten else "")


#: Measured on the H100 (benchmarks/bench_gemm_dense.py --sweep, 2026-11-23, bf16 output): the fastest configuration
#: per (M, N, K, B stored (K, N)) for the GPT-2-small training GEMMs (8192 tokens) and 8192^3. The weight gradients
#: stay under 85% of cuBLAS bf16 (73-86%): their cut schedules pay for FP32 partial tiles moved by scalar stores.
DENSE_CONFIG_TABLE: dict[tuple[int, int, int, bool], DenseConfig] = {
    (8192, 2304, 768, False): DenseConfig(128, 128, 64, 8, 4, 5),  # qkv forward
    (8192, 768, 768, False): DenseConfig(128, 128, 64, 8, 4, 5),  # proj forward
    (8192, 3072, 768, False): DenseConfig(128, 256, 64, 8, 8, 4, epi_split=True),  # fc1 forward
    (8192, 768, 3072, False): DenseConfig(128, 128, 64, 4, 4, 4),  # fc2 forward
    (8192, 768, 2304, True): DenseConfig(128, 128, 64, 8, 4, 5),  # qkv input grad
    (8192, 768, 3072, True): DenseConfig(128, 128, 64, 4, 4, 4),  # fc1 input grad
    (8192, 3072, 768, True): DenseConfig(128, 256, 64, 8, 8, 4, epi_split=True),  # fc2 input grad
    (2304, 768, 8192, False): DenseConfig(128, 128, 64, 8, 4, 5),  # qkv weight grad
    (3072, 768, 8192, False): DenseConfig(128, 256, 64, 8, 8, 4, schedule="headtail", epi_split=True),  # fc1 wgrad
    (768, 3072, 8192, False): DenseConfig(128, 256, 64, 8, 8, 4, schedule="headtail", epi_split=True),  # fc2 wgrad
    (768, 768, 8192, False): DenseConfig(128, 128, 64, 8, 8, 4, schedule="split"),  # proj weight grad
    (8192, 8192, 8192, False): DenseConfig(128, 256, 64, 8, 8, 4, epi_split=True),
}


def _fit_output(cfg: DenseConfig, out_dtype: torch.dtype) -> DenseConfig:
    """`cfg` with its shared memory within the 227 KB of an sm_90 block for a 4-byte output: the C tile's staging
    for the TMA store doubles, so the 128x256 tiles store in halves with 3 stages and 128x128 keep 4 stages."""
    if torch.empty((), dtype=out_dtype).element_size() <= 2:
        return cfg
    if cfg.block_m * cfg.block_n > 128 * 128:
        return dataclasses.replace(cfg, epi_split=True, num_stages=min(cfg.num_stages, 3))
    return dataclasses.replace(cfg, num_stages=min(cfg.num_stages, 4))


def _default_dense_config(m: int, n: int, k: int, b_kn: bool, num_progs: int) -> DenseConfig:
    """The configuration for a shape not in `DENSE_CONFIG_TABLE`: 128x256 tiles where they give several waves,
    a cut schedule where 128x128 tiles leave a large part of the last wave idle and K is long, else 128x128."""
    if (m, n, k, b_kn) in DENSE_CONFIG_TABLE:
        return DENSE_CONFIG_TABLE[(m, n, k, b_kn)]
    tiles128 = triton.cdiv(m, 128) * triton.cdiv(n, 128)
    waves = tiles128 / num_progs
    if k >= 2048 and tiles128 < 4 * num_progs and waves / math.ceil(waves) < 0.9:
        return DenseConfig(128, 128, 64, 8, 8, 4, schedule="split")
    if triton.cdiv(m, 128) * triton.cdiv(n, 256) >= 4 * num_progs:
        return DenseConfig(128, 256, 64, 8, 8, 4, epi_split=True)
    return DenseConfig(128, 128, 64, 8, 4, 5)


def _schedule_args(cfg: DenseConfig, tiles: int, k_tiles: int, num_progs: int) -> tuple[int, int, int, int, int]:
    """(SCHEDULE, SPLIT_K, DP_TILES, K_HEAD, workspace slots) for `cfg` on this problem; a cut schedule that does
    not apply (no leftover tiles, a single chunk) runs as "dp"."""
    if cfg.schedule == "headtail" and tiles < num_progs and k_tiles > 1:
        rounds = triton.cdiv(tiles, num_progs - tiles)
        k_head = min(triton.cdiv(rounds * k_tiles, rounds + 1), k_tiles - 1)
        return 2, 1, 0, k_head, tiles
    if cfg.schedule in ("split", "headtail"):
        dp_tiles = tiles // num_progs * num_progs
        rest = tiles - dp_tiles
        split = min(cfg.split_k or (num_progs // rest if rest else 1), k_tiles)
        if rest and split > 1:
            return 1, split, dp_tiles, 0, rest * (split - 1)
    return 0, 1, 0, 0, 0


_GL_DTYPES = (torch.float16, torch.bfloat16)


def _tma_ok(t: torch.Tensor) -> bool:
    """A 2-D view TMA can read: last stride 1, 16-byte aligned base and row stride."""
    size = t.element_size()
    return (t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * size) % 16 == 0
            and t.stride(0) >= t.shape[1])


def dense_tma_supported(a16: torch.Tensor, b_kn: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether `gemm_dense` takes the TMA kernel: a CUDA device of compute capability 9.0 or newer (not the
    interpreter), fp16/bf16 operands of one dtype, A row-major and B stored row-major as (K, N) or (N, K), all
    16-byte aligned, and an output row of whole 16-byte units."""
    if interpreting() or not a16.is_cuda or not _sm90_or_newer(a16.device.index):
        return False
    if a16.dtype not in _GL_DTYPES or b_kn.dtype != a16.dtype or out_dtype not in (*_GL_DTYPES, torch.float32):
        return False
    n = b_kn.shape[1]
    if a16.shape[1] == 0 or (n * torch.empty((), dtype=out_dtype).element_size()) % 16:
        return False
    return _tma_ok(a16) and (_tma_ok(b_kn) or _tma_ok(b_kn.t()))


_FLAGS: dict = {}


def _tile_flags(device: torch.device, count: int) -> torch.Tensor:
    """Per-device int32 tile flags of the cut schedules, zero between launches (each launch leaves them zero).

    Shared by every launch on the device: two launches with a cut schedule must not run concurrently on
    different streams of one device.
    """
    count *= _FLAG_STRIDE.value
    flags = _FLAGS.get(device)
    if flags is None or flags.numel() < count:
        flags = torch.zeros(max(count, 4096 * _FLAG_STRIDE.value), dtype=torch.int32, device=device)
        _FLAGS[device] = flags
    return flags


def _launch_dense_tma(a16, b_kn, out, bias, d_a, d_b, cfg: DenseConfig, num_progs: Optional[int] = None) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k = a16.shape
    n = b_kn.shape[1]
    b_is_kn = _tma_ok(b_kn)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    a_desc = TensorDescriptor(a16, [m, k], [a16.stride(0), 1], [bm, bk])
    if b_is_kn:
        b_desc = TensorDescriptor(b_kn, [k, n], [b_kn.stride(0), 1], [bk, bn])
    else:
        b_nk = b_kn.t()
        b_desc = TensorDescriptor(b_nk, [n, k], [b_nk.stride(0), 1], [bn, bk])
    c_desc = TensorDescriptor(out, [m, n], [out.stride(0), 1], [bm, bn // 2 if cfg.epi_split else bn])
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    if num_progs is None:
        num_progs = _cuda_sm_count(out.device.index) if out.is_cuda else 4
    schedule, split, dp_tiles, k_head, slots = _schedule_args(cfg, tiles, triton.cdiv(k, bk), num_progs)
    if schedule:
        ws = torch.empty(slots * bm * bn, dtype=torch.float32, device=out.device)
        flags = _tile_flags(out.device, tiles)
    else:
        num_progs = min(num_progs, tiles)
        ws = flags = out
    interpret = interpreting()
    _dense_tma_kernel[(num_progs,)](
        a_desc, b_desc, c_desc, bias if bias is not None else out, d_a, d_b, ws, flags, m, n, k, dp_tiles, k_head,
        B_KN=b_is_kn, HAS_BIAS=bias is not None, SCHEDULE=schedule, SPLIT_K=split, FLATTEN=cfg.flatten,
        EPI_SPLIT=cfg.epi_split, NUM_PROGS=num_progs, INTERP=interpret,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.group_m,
        **({} if interpret else dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)),
    )


def gemm_dense(
    a16: torch.Tensor,
    b_kn: torch.Tensor,
    d_a: torch.Tensor,
    d_b: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: Optional[DenseConfig] = None,
    out: Optional[torch.Tensor] = None,
    _force_tma: bool = False,
    _num_progs: Optional[int] = None,
) -> torch.Tensor:
    """``((D_a * D_b) * (A @ B)) (+ bias)`` in ``out_dtype``: the "triton_dequant" product of two exact fp16
    operands with FP32 accumulation and the epilogue fused, in the reference's order.

    Args:
        a16: ``(M, K)`` exact operand.
        b_kn: the logical ``(K, N)`` operand: a row-major ``(K, N)`` tensor or the ``.t()`` view of a row-major
            ``(N, K)`` one.
        d_a, d_b: the per-tensor decode scales, float32 scalars on the device (read there: no host sync).
        bias: optional ``(N,)``, added in float32 after alpha.
        config: a `DenseConfig` (default: `DENSE_CONFIG_TABLE`, else `_default_dense_config`).
        out: optional contiguous ``(M, N)`` result tensor of ``out_dtype`` to write into.

    On Hopper (`dense_tma_supported`) the TMA kernel runs; elsewhere, and under the interpreter, the
    pointer-load `_gemm_kernel` (same numerics). ``_force_tma``/``_num_progs`` run the TMA kernel under the
    interpreter (tests).
    """
    m, k = a16.shape
    if b_kn.shape[0] != k:
        raise ValueError(f"gemm_dense: K differs: a {tuple(a16.shape)}, b {tuple(b_kn.shape)}")
    n = b_kn.shape[1]
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=a16.device)
    elif out.shape != (m, n) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"gemm_dense: out must be a contiguous ({m}, {n}) {out_dtype} tensor")
    if m == 0 or n == 0:
        return out
    if bias is not None:
        bias = bias.contiguous()
    if _force_tma or dense_tma_supported(a16, b_kn, out_dtype):
        if config is None:
            num = _cuda_sm_count(a16.device.index) if a16.is_cuda else 4
            config = _fit_output(_default_dense_config(m, n, k, _tma_ok(b_kn), num), out_dtype)
        _launch_dense_tma(a16, b_kn, out, bias, d_a, d_b, config, _num_progs)
    else:
        _launch_gemm(a16, a16, b_kn, b_kn, out, bias, d_a, d_b, d_a, m, n, k, a16.stride(), b_kn.stride(), _DENSE,
                     _DENSE, False, 1, 1)
    return out


# ----------------------------------------------------------------------------------------------------------
# Path choice
# ----------------------------------------------------------------------------------------------------------

#: Shapes (M, N, K) where a measurement overrides `choose_gemm_path`'s rule; empty: on the H100 the rule picked
#: the faster path at every GPT-2-small training shape and at 8192^3 (benchmarks/bench_gemm_dense.py,
#: 2026-11-23, docs/benchmarks.md "Kernels").
MEASURED_PATH_TABLE: dict[tuple[int, int, int], str] = {}


@functools.lru_cache(maxsize=None)
def native_fp4_available(device_index: int = 0) -> bool:
    """Whether the GPU has native FP4 tensor cores (compute capability 10.x)."""
    if not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device_index)
    return major == 10


def choose_gemm_path(m: int, n: int, k: int, fmt: Optional[Fp4Format] = None, device: "torch.device | str" = "cuda",
                     high_precision_a: bool = False) -> str:
    """The GEMM path for an (M, N, K) product of quantized operands, from measurements on the H100.

    ``high_precision_a``: A is still in high precision and nothing else needs its quantized form (the forward
    activation), so `gemm_quantize_a` is allowed. Returns one of `GEMM_PATHS`; record it.
    """
    if fmt is not None and _scale_kind(fmt) != SCALE_E4M3:
        return "reference"
    dev = torch.device(device)
    if dev.type == "cuda" and native_fp4_available(dev.index or 0):
        return "native_fp4"
    if (m, n, k) in MEASURED_PATH_TABLE:
        return MEASURED_PATH_TABLE[(m, n, k)]
    # On sm_90+ the TMA GEMM with its epilogue fused (bf16 out) beats cuBLAS's fp32 product plus the epilogue's
    # pass over C wherever the output is not small next to the reduction: 86-95% of cuBLAS bf16 at the forward
    # and input-gradient shapes of GPT-2 small and at 8192^3. When K exceeds both output sides (the weight
    # gradients: tokens are the reduction) cuBLAS's fp32 product is faster (639-650 vs 519-590 TFLOP/s) and the
    # epilogue pass over the small C costs little.
    if dev.type == "cuda" and _sm90_or_newer(dev.index) and k <= max(m, n):
        return "triton_dequant"
    return "cublas_dequant"


@functools.lru_cache(maxsize=None)
def _sm90_or_newer(device_index: Optional[int]) -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device_index or 0)[0] >= 9


# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------


def _operand_2d(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    k = qt.shape[-1]
    rows = qt.qdata.numel() * 2 // k if k else 0
    return qt.qdata.reshape(rows, k // 2), qt.scale.view(torch.uint8).reshape(-1), rows, k


def gemm(
    a: QuantizedTensor,
    b: QuantizedTensor,
    b_transposed: bool = False,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.float32,
    path: Optional[str] = None,
    a_dequantized: Optional[torch.Tensor] = None,
    b_dequantized: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``C = (D_a * D_b) * (A_u @ B_u^T) (+ bias)`` with FP32 accumulation, as `gemm_reference`.

    Args:
        a: ``(..., K)`` quantized along K (1x16 or 16x16 blocks).
        b: ``(N, K)`` quantized along K; with ``b_transposed`` stored ``(K, N)`` in square 2D blocks.
        bias: optional ``(N,)``, added after alpha in float32.
        out_dtype: result dtype; shape ``(..., N)``.
        path: one of `GEMM_PATHS` (not ``"triton_fused_quant"``, see `gemm_quantize_a`), or None to take
            `choose_gemm_path`'s answer.
        a_dequantized, b_dequantized: the exact fp16/bf16 operands ``E2M1[c] * d_b`` in the stored 2D layout
            (as `quantize_triton(..., dequantized_dtype=...)` writes them), to skip dequantizing here.
    """
    m, n, k = check_gemm_operands(a, b, b_transposed)
    lead = a.shape[:-1]
    device = a.qdata.device
    if path is None:
        path = choose_gemm_path(m, n, k, a.format, device)
    supported = (_scale_kind(a.format) == SCALE_E4M3 and _scale_kind(b.format) == SCALE_E4M3
                 and a.format.block_size == 16 and b.format.block_size == 16)
    if path == "reference" or not supported or not (a.qdata.is_cuda or interpreting()):
        if path != "reference":
            logger.info("gemm: reference path for formats %s/%s on %s", a.format.spec, b.format.spec, device)
        return gemm_reference(a, b, b_transposed, bias, out_dtype)
    if path == "native_fp4":
        try:
            return _native_fp4_gemm(a, b, b_transposed, bias, out_dtype)
        except Exception as exc:  # untested hardware path: never fail the step for it
            logger.warning("gemm: native FP4 path failed (%s); using triton_dequant", exc)
            path = "triton_dequant"

    out = torch.empty((m, n), dtype=out_dtype, device=device)
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    if bias is not None:
        bias = bias.contiguous()
    if path == "triton_packed":
        qa, sa, _, _ = _operand_2d(a)
        qb, sb, _, _ = _operand_2d(b)
        _launch_gemm(qa, sa, qb, sb, out, bias, a.per_tensor_scale, b.per_tensor_scale, a.per_tensor_scale,
                     m, n, k, (0, 0), (0, 0), _PACKED, _PACKED, b_transposed, a.block[0], b.block[0])
        return out.reshape(*lead, n)

    a16 = a_dequantized if a_dequantized is not None else dequantize_unscaled_triton(a, torch.float16)
    b16 = b_dequantized if b_dequantized is not None else dequantize_unscaled_triton(b, torch.float16)
    a16 = a16.reshape(m, k)
    b16 = b16.reshape(b.qdata.numel() * 2 // b.shape[-1], b.shape[-1])
    b_kn = b16 if b_transposed else b16.t()  # the logical (K, N) operand, a view
    if path == "cublas_dequant":
        if a16.is_cuda:
            acc = torch.mm(a16, b_kn, out_dtype=torch.float32)
        else:  # the interpreter tests: fp16 values are exact in fp32, so this is the same product
            acc = a16.float() @ b_kn.float()
        bm, bn = 32, 128
        _scale_bias_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            acc, out, bias if bias is not None else out, a.per_tensor_scale, b.per_tensor_scale, m, n,
            HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn,
        )
    elif path == "triton_dequant":
        # Hopper: the TMA kernel; elsewhere (and under the interpreter) the pointer-load kernel. Same numerics.
        gemm_dense(a16, b_kn, a.per_tensor_scale, b.per_tensor_scale, bias, out_dtype, out=out)
    else:
        raise ValueError(f"gemm: unknown path {path!r}; expected one of {GEMM_PATHS}")
    return out.reshape(*lead, n)


def gemm_quantize_a(
    x: torch.Tensor,
    b: QuantizedTensor,
    b_transposed: bool = False,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.float32,
    b_dequantized: Optional[torch.Tensor] = None,
    amax: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``gemm(quantize(x, "nvfp4"), b, ...)`` with x quantized (1x16 along K, round to nearest) inside the GEMM
    prologue: the same codes and scales as `quantize_triton`, never written to memory.

    The tensor amax must be known before the first block scale (docs/numerics.md section 2, step 2): pass
    ``amax`` (float32 0-dim, e.g. from `tensor_amax_triton`) or it is computed here by the reduction kernel. B is
    loaded packed (or from ``b_dequantized``, its exact fp16 operand in the stored layout).
    """
    k = x.shape[-1]
    lead = x.shape[:-1]
    x2, m, _ = _as_2d_view(x)
    if b_transposed:
        n = b.shape[-1]
        if b.shape[-2] != k:
            raise ValueError(f"gemm_quantize_a: K differs: x {tuple(x.shape)}, b {tuple(b.shape)} (transposed)")
    else:
        n = b.shape[-2]
        if b.shape[-1] != k:
            raise ValueError(f"gemm_quantize_a: K differs: x {tuple(x.shape)}, b {tuple(b.shape)}")
    if k % 16 or _scale_kind(b.format) != SCALE_E4M3 or not (x.is_cuda or interpreting()):
        from .quantize import quantize_triton
        from ..numerics.formats import NVFP4, Rounding

        qa = quantize_triton(x, NVFP4, (1, 16), Rounding.NEAREST)
        return gemm(qa, b, b_transposed, bias, out_dtype)
    amax_bits = (amax.reshape(1).to(torch.float32).view(torch.int32) if amax is not None
                 else _amax_bits(x2, m, k, False))
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    if bias is not None:
        bias = bias.contiguous()
    if b_dequantized is not None:
        b16 = b_dequantized.reshape(b.qdata.numel() * 2 // b.shape[-1], b.shape[-1])
        b_kn = b16 if b_transposed else b16.t()
        b_args, b_strides, b_mode = (b_kn, b_kn), b_kn.stride(), _DENSE
    else:
        qb, sb, _, _ = _operand_2d(b)
        b_args, b_strides, b_mode = (qb, sb), (0, 0), _PACKED
    _launch_gemm(x2, x2, b_args[0], b_args[1], out, bias, b.per_tensor_scale, b.per_tensor_scale, amax_bits,
                 m, n, k, x2.stride(), b_strides, _QUANTIZE, b_mode, b_transposed, 1, b.block[0])
    return out.reshape(*lead, n)


# ----------------------------------------------------------------------------------------------------------
# Native FP4 (compute capability 10.x): UNTESTED, no such GPU was available.
# ----------------------------------------------------------------------------------------------------------


def _to_blocked(scales: torch.Tensor) -> torch.Tensor:
    """Rearrange (rows, cols) block scales into cuBLAS's 128x4 tiled layout (rows padded to 128, cols to 4)."""
    rows, cols = scales.shape
    nr, nc = triton.cdiv(rows, 128), triton.cdiv(cols, 4)
    padded = torch.zeros((nr * 128, nc * 4), dtype=scales.dtype, device=scales.device)
    padded[:rows, :cols] = scales
    blocks = padded.view(nr, 128, nc, 4).permute(0, 2, 1, 3).reshape(-1, 4, 32, 4)
    return blocks.transpose(1, 2).reshape(-1, 32, 16).flatten()


def _native_fp4_gemm(a: QuantizedTensor, b: QuantizedTensor, b_transposed: bool, bias, out_dtype) -> torch.Tensor:
    """NVFP4 x NVFP4 on FP4 tensor cores through ``torch._scaled_mm`` (1x16 blocks along K for both). UNTESTED."""
    if a.block != (1, 16) or b_transposed or b.block[1] != 16:
        raise NotImplementedError("native path takes (M, K) x (N, K) operands with K-blocks of 16")
    m, n, k = check_gemm_operands(a, b, b_transposed)
    qa = a.qdata.reshape(m, k // 2).view(torch.float4_e2m1fn_x2)
    qb = b.qdata.reshape(n, k // 2).view(torch.float4_e2m1fn_x2)
    sa = a.scale.reshape(m, k // 16)
    sb = b.scale.reshape(-1, k // 16)
    if b.block[0] != 1:
        sb = sb.repeat_interleave(b.block[0], dim=0)
    acc = torch._scaled_mm(qa, qb.t(), _to_blocked(sa), _to_blocked(sb), out_dtype=torch.float32)
    c = acc * (a.per_tensor_scale * b.per_tensor_scale)
    if bias is not None:
        c = c + bias.to(torch.float32)
    return c.to(out_dtype).reshape(*a.shape[:-1], n)
