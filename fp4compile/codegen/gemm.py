"""The NVFP4 GEMM on Hopper: exact emulation through fp16 tensor cores, and the choice among its paths.

``C = (D_a * D_b) * (A_u @ B_u^T) (+ bias)``, FP32 accumulation (spec section 2, "GEMM on two NVFP4 operands";
the same semantics as `fp4compile.numerics.gemm.gemm_reference`). ``A_u = E2M1[c] * d_b`` is exact in float16
(spec section 2, exactness fact), so any fp16 tensor-core GEMM with an FP32 accumulator computes the NVFP4
product up to FP32 summation order; the per-tensor scales are the alpha of the epilogue.

Paths (names recorded by the backend; see `choose_gemm_path`):

``"cublas_dequant"``
    exact fp16 operands (written by the quantize kernel or `dequantize_unscaled_triton`) into cuBLAS
    (``torch.mm(..., out_dtype=float32)``), then a one-pass Triton epilogue ``C * alpha + bias``.
``"triton_dequant"``
    the same fp16 operands into a Triton tensor-core GEMM whose epilogue applies alpha (read on the device,
    no host sync) and the bias.
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

import functools
import logging
from typing import Optional

import torch
import triton
import triton.language as tl

from ..numerics.formats import Fp4Format
from ..numerics.gemm import check_gemm_operands, gemm_reference
from ..numerics.qtensor import QuantizedTensor
from .quantize import (
    SCALE_E4M3,
    _abs_bits,
    _e2m1_value,
    _e4m3_rne,
    _e4m3_value,
    _amax_bits,
    _as_2d_view,
    _interpreting,
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
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_size
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size
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
                  HAS_BIAS=has_bias, K_STATIC=k if _interpreting() else 0)
    args = (a_arg, sa, b_arg, sb, out, bias_arg, d_a, d_b, amax_a, m, n, k, *a_strides, *b_strides,
            out.stride(0), out.stride(1))
    if out.is_cuda and not _interpreting():
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _tuned_kernel()[grid](*args, **common)
    else:
        bm, bn, bk, g, w, s = _INTERPRET_CONFIG
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _gemm_kernel[grid](*args, **common, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, num_warps=w)


# ----------------------------------------------------------------------------------------------------------
# Path choice
# ----------------------------------------------------------------------------------------------------------

#: Measured on the H100 (benchmarks/bench_kernels.py, 2026-11-22, docs/benchmarks.md "Kernels (issue 5)"): the
#: fastest path for operands already quantized, by (M, N, K). Everything else measured there, 8192^3 included,
#: was fastest on "cublas_dequant", the default. Packed in-register dequantization and the fused quantize
#: prologue lost everywhere (2-4x slower), so they are never chosen automatically.
MEASURED_PATH_TABLE: dict[tuple[int, int, int], str] = {
    (8192, 3072, 768): "triton_dequant",  # GPT-2 fc1 forward / fc2 input grad: 287 vs 259 TFLOP/s
    (768, 3072, 8192): "triton_dequant",  # GPT-2 fc2 weight grad: 421 vs 348 TFLOP/s
}


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
    return "cublas_dequant"


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
    if path == "reference" or not supported or not (a.qdata.is_cuda or _interpreting()):
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
        _launch_gemm(a16, a16, b_kn, b_kn, out, bias, a.per_tensor_scale, b.per_tensor_scale, a.per_tensor_scale,
                     m, n, k, a16.stride(), b_kn.stride(), _DENSE, _DENSE, b_transposed, 1, 1)
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

    The tensor amax must be known before the first block scale (spec step 2): pass ``amax`` (float32 0-dim,
    e.g. from `tensor_amax_triton`) or it is computed here by the reduction kernel. B is loaded packed (or
    from ``b_dequantized``, its exact fp16 operand in the stored layout).
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
    if k % 16 or _scale_kind(b.format) != SCALE_E4M3 or not (x.is_cuda or _interpreting()):
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
