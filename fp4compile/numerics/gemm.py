"""The reference GEMM on two quantized operands (docs/numerics.md section 2.4)."""

from __future__ import annotations

from typing import Optional

import torch

from .qtensor import QuantizedTensor

__all__ = ["gemm_reference", "check_gemm_operands"]


def check_gemm_operands(a: QuantizedTensor, b: QuantizedTensor, b_transposed: bool) -> tuple[int, int, int]:
    """Return ``(M, N, K)`` of ``C = A B^T`` and check that both operands block along the reduction axis."""
    k = a.shape[-1]
    m = a.qdata.numel() * 2 // k if k else 0
    if b_transposed:
        if b.block[0] != b.block[1]:
            raise ValueError(
                f"gemm: a B operand stored as (K, N) must use square 2D blocks so its blocks run along K, "
                f"got block {b.block}"
            )
        kb, n = b.shape[-2], b.shape[-1]
    else:
        n, kb = b.shape[-2], b.shape[-1]
    if kb != k:
        raise ValueError(f"gemm: reduction sizes differ: A has K={k} (shape {tuple(a.shape)}), B has K={kb} "
                         f"(shape {tuple(b.shape)}, b_transposed={b_transposed})")
    return m, n, k


def gemm_reference(
    a: QuantizedTensor,
    b: QuantizedTensor,
    b_transposed: bool = False,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``C = (D_a * D_b) * (A_u @ B_u^T) (+ bias)`` with FP32 accumulation.

    ``A_u = E2M1[c] * d_b`` is the exact unscaled operand; the product of the per-tensor decode scales is the
    GEMM's alpha, applied once in the epilogue as NVFP4 hardware does.

    Args:
        a: ``(..., K)`` quantized along K.
        b: ``(N, K)`` quantized along K, or, with ``b_transposed``, stored as ``(K, N)`` with square 2D blocks
            (the same quantized weight serves ``x W^T`` and ``dy W``).
        bias: optional ``(N,)``, added after the scale in float32.
        out_dtype: dtype of the result, shape ``(..., N)``.
    """
    m, n, k = check_gemm_operands(a, b, b_transposed)
    a_u = a.dequantize_unscaled().reshape(m, k)
    b_u = b.dequantize_unscaled().reshape(b.shape[-2], b.shape[-1])
    c = a_u @ (b_u if b_transposed else b_u.t())
    c = c * (a.per_tensor_scale * b.per_tensor_scale)
    if bias is not None:
        c = c + bias.to(torch.float32)
    return c.to(out_dtype).reshape(*a.shape[:-1], n)
