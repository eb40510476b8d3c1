"""The quantized ops the rewritten graphs call: ``fp4compile::quantize`` and ``fp4compile::gemm``.

They are ``torch.library`` custom ops with fake (meta) kernels, so AOTAutograd and Inductor trace around
them; Inductor fuses its own kernels around them, never into them. On CPU, and on CUDA without Triton, the
implementation is the reference quantizer plus an exact matmul; on CUDA the Triton kernels run.
Operand precisions travel as the compact strings of `OperandPrecision.encode`.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch

from ..numerics.api import quantize as _quantize
from ..numerics.gemm import gemm_reference
from ..numerics.qtensor import QuantizedTensor
from ..policy.precision import OperandPrecision
from .observe import current_observer

__all__ = ["quantize_operand", "gemm_operands", "to_quantized_tensor"]

logger = logging.getLogger(__name__)


def _scale_shape(shape: tuple, op: OperandPrecision) -> tuple:
    k = shape[-1]
    lead = tuple(shape[:-1])
    rows_b, cols_b = op.block
    if rows_b == 1:
        return (*lead, k // cols_b)
    return (math.prod(lead) // rows_b, k // cols_b)


def _scale_wire_dtype(op: OperandPrecision) -> torch.dtype:
    """Block scales cross op boundaries as raw bytes (uint8) when their format is 8-bit with a torch dtype:
    float8 tensors are poorly supported outside matmuls (comparisons, opcheck, some Inductor paths)."""
    storage = op.format.scale_format.storage_dtype
    return torch.uint8 if storage.itemsize == 1 else storage


def _scale_bytes(scale: torch.Tensor) -> torch.Tensor:
    return scale.view(torch.uint8) if scale.dtype.itemsize == 1 else scale


@torch.library.custom_op("fp4compile::quantize", mutates_args=())
def quantize_operand(
    x: torch.Tensor, operand: str, seed: Optional[torch.Tensor], label: str = ""
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` along its last axis as ``operand`` says; returns (packed codes, block scales as raw bytes,
    tensor scale).

    ``seed`` (an int64 0-dim tensor) keys stochastic rounding; each call draws a fresh seed, so the Philox
    offset is 0. ``label`` (``"<module>:<role>:<operand>"``) names the operand for observers
    (`fp4compile.ops.observe`).
    """
    op = OperandPrecision.decode(operand)
    qt = _quantize(x, op.format, op.block, op.rounding, seed if seed is not None else 0, 0, op.hadamard)
    observer = current_observer()
    if observer is not None:
        observer(label, x, qt)
    return qt.qdata, _scale_bytes(qt.scale), qt.per_tensor_scale


@quantize_operand.register_fake
def _quantize_operand_fake(x, operand, seed, label=""):
    op = OperandPrecision.decode(operand)
    qdata = x.new_empty((*x.shape[:-1], x.shape[-1] // 2), dtype=torch.uint8)
    scale = x.new_empty(_scale_shape(tuple(x.shape), op), dtype=_scale_wire_dtype(op))
    return qdata, scale, x.new_empty((), dtype=torch.float32)


def to_quantized_tensor(data: torch.Tensor, scale: torch.Tensor, tensor_scale: torch.Tensor, operand: str) -> QuantizedTensor:
    """Reassemble the parts returned by ``fp4compile::quantize`` into a `QuantizedTensor`."""
    op = OperandPrecision.decode(operand)
    storage = op.format.scale_format.storage_dtype
    if scale.dtype != storage:
        scale = scale.view(storage)
    return QuantizedTensor(data, scale, tensor_scale, op.format, op.block, op.hadamard)


def _gemm_impl(a: QuantizedTensor, b: QuantizedTensor, b_transposed: bool, bias, out_dtype) -> torch.Tensor:
    if a.qdata.is_cuda:
        from ..codegen import triton_available

        if triton_available():
            from ..codegen.gemm import gemm as gemm_triton

            return gemm_triton(a, b, b_transposed=b_transposed, bias=bias, out_dtype=out_dtype)
    return gemm_reference(a, b, b_transposed=b_transposed, bias=bias, out_dtype=out_dtype)


@torch.library.custom_op("fp4compile::gemm", mutates_args=())
def gemm_operands(
    a_data: torch.Tensor,
    a_scale: torch.Tensor,
    a_tensor_scale: torch.Tensor,
    b_data: torch.Tensor,
    b_scale: torch.Tensor,
    b_tensor_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    a_operand: str,
    b_operand: str,
    b_transposed: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``C = (D_a D_b) (A_u B_u^T) (+ bias)`` on quantized operands (spec section 2), FP32 accumulation.

    ``a`` is ``(..., K)``; ``b`` is ``(N, K)``, or ``(K, N)`` with square 2D blocks when ``b_transposed``.
    """
    a = to_quantized_tensor(a_data, a_scale, a_tensor_scale, a_operand)
    b = to_quantized_tensor(b_data, b_scale, b_tensor_scale, b_operand)
    return _gemm_impl(a, b, b_transposed, bias, out_dtype)


@gemm_operands.register_fake
def _gemm_operands_fake(a_data, a_scale, a_tensor_scale, b_data, b_scale, b_tensor_scale, bias, a_operand,
                        b_operand, b_transposed, out_dtype):
    n = b_data.shape[-1] * 2 if b_transposed else b_data.shape[0]
    return a_data.new_empty((*a_data.shape[:-1], n), dtype=out_dtype)
