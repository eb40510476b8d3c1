"""The quantized ops the rewritten graphs call: ``fp4compile::quantize``, ``fp4compile::amax`` and
``fp4compile::gemm``.

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

from ..codegen import eager_launches, runs_on_triton
from ..numerics.api import check_quantize_args
from ..numerics.gemm import gemm_reference
from ..numerics.qtensor import QuantizedTensor
from ..numerics.reference import quantize_reference, tensor_amaxes_reference
from ..policy.precision import OperandPrecision
from .observe import current_observer

__all__ = ["quantize_operand", "tensor_amaxes", "gemm_operands", "to_quantized_tensor", "dequantized_dtype"]

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


def dequantized_dtype(op: OperandPrecision) -> torch.dtype:
    """The dtype of the exact unscaled operand ``E2M1[c] * d_b``: float16 holds every E2M1 value times every
    E4M3 scale exactly (docs/numerics.md section 2.5); other scale formats span more range, so float32."""
    return torch.float16 if op.format.scale_format.name == "e4m3" else torch.float32


def _quantize_impl(x: torch.Tensor, op: OperandPrecision, seed, amax: Optional[torch.Tensor],
                   with_dequantized: bool) -> tuple[QuantizedTensor, Optional[torch.Tensor]]:
    """Quantize, and with ``with_dequantized`` also produce the exact unscaled operand (in the same kernel pass on
    CUDA): the Triton kernels on CUDA, the reference quantizer elsewhere. ``amax``: the tensor amax if known."""
    args = check_quantize_args(x, op.format, op.block, op.rounding, op.hadamard)
    operand_dtype = dequantized_dtype(op) if with_dequantized else None
    if runs_on_triton(x):
        from ..codegen.quantize import quantize_triton

        with eager_launches():
            out = quantize_triton(x, args.format, args.block, args.rounding, seed, 0, args.hadamard,
                                  dequantized_dtype=operand_dtype, amax=amax)
        return out if with_dequantized else (out, None)
    qt = quantize_reference(x, args.format, args.block, args.rounding, seed, 0, args.hadamard, amax=amax)
    if not with_dequantized:
        return qt, None
    return qt, qt.dequantize_unscaled().reshape(-1, x.shape[-1]).to(operand_dtype)


@torch.library.custom_op("fp4compile::quantize", mutates_args=())
def quantize_operand(
    x: torch.Tensor, operand: str, seed: Optional[torch.Tensor], label: str = "", with_dequantized: bool = False,
    amax: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` along its last axis as ``operand`` says; returns (packed codes, block scales as raw bytes,
    tensor scale, exact operand).

    ``seed`` (an int64 0-dim tensor) keys stochastic rounding; each call draws a fresh seed, so the Philox
    offset is 0. ``label`` (``"<module>:<role>:<operand>"``) names the operand for observers
    (`fp4compile.ops.observe`). With ``with_dequantized`` the last output is ``E2M1[c] * d_b`` as a (rows, K)
    matrix in `dequantized_dtype` (written by the same kernel on CUDA) for the GEMM to consume without a
    separate dequantization pass; otherwise it is an empty tensor. ``amax``: the tensor amax (float32 0-dim,
    after the RHT where the operand asks for it) from ``fp4compile::amax``, which then is not recomputed.
    """
    op = OperandPrecision.decode(operand)
    qt, operand_matrix = _quantize_impl(x, op, seed if seed is not None else 0, amax, with_dequantized)
    if operand_matrix is None:
        operand_matrix = x.new_empty((0,), dtype=dequantized_dtype(op))
    observer = current_observer()
    if observer is not None:
        observer(label, x, qt)
    return qt.qdata, _scale_bytes(qt.scale), qt.per_tensor_scale, operand_matrix


@quantize_operand.register_fake
def _quantize_operand_fake(x, operand, seed, label="", with_dequantized=False, amax=None):
    op = OperandPrecision.decode(operand)
    qdata = x.new_empty((*x.shape[:-1], x.shape[-1] // 2), dtype=torch.uint8)
    scale = x.new_empty(_scale_shape(tuple(x.shape), op), dtype=_scale_wire_dtype(op))
    rows = math.prod(x.shape[:-1])
    shape = (rows, x.shape[-1]) if with_dequantized else (0,)
    return qdata, scale, x.new_empty((), dtype=torch.float32), x.new_empty(shape, dtype=dequantized_dtype(op))


@torch.library.custom_op("fp4compile::amax", mutates_args=())
def tensor_amaxes(x: torch.Tensor, hadamard: bool) -> torch.Tensor:
    """``[amax of x after the 16-point RHT along its last axis (plain when not hadamard), max |x|]``, float32
    (2,), from one read of ``x`` on CUDA: the tensor amaxes of an activation's two quantizations (row-wise for
    its forward or input-gradient GEMM, through the RHT along tokens for the weight gradient; ``x`` is then the
    ``(features, tokens)`` view), passed to ``fp4compile::quantize`` as ``amax``."""
    if runs_on_triton(x):
        from ..codegen.quantize import tensor_amaxes_triton

        with eager_launches():
            return tensor_amaxes_triton(x, hadamard)
    return tensor_amaxes_reference(x, hadamard)


@tensor_amaxes.register_fake
def _tensor_amaxes_fake(x, hadamard):
    return x.new_empty((2,), dtype=torch.float32)


def to_quantized_tensor(data: torch.Tensor, scale: torch.Tensor, tensor_scale: torch.Tensor, operand: str) -> QuantizedTensor:
    """Reassemble the parts returned by ``fp4compile::quantize`` into a `QuantizedTensor`."""
    op = OperandPrecision.decode(operand)
    storage = op.format.scale_format.storage_dtype
    if scale.dtype != storage:
        scale = scale.view(storage)
    return QuantizedTensor(data, scale, tensor_scale, op.format, op.block, op.hadamard)


def _gemm_impl(a: QuantizedTensor, b: QuantizedTensor, b_transposed: bool, bias, out_dtype,
               a_dequantized: Optional[torch.Tensor], b_dequantized: Optional[torch.Tensor], path: str) -> torch.Tensor:
    if runs_on_triton(a.qdata):
        from ..codegen.gemm import gemm as gemm_triton

        with eager_launches():
            return gemm_triton(a, b, b_transposed=b_transposed, bias=bias, out_dtype=out_dtype, path=path or None,
                               a_dequantized=_nonempty(a_dequantized), b_dequantized=_nonempty(b_dequantized))
    return gemm_reference(a, b, b_transposed=b_transposed, bias=bias, out_dtype=out_dtype)


def _nonempty(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if t is not None and t.numel() else None


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
    a_dequantized: Optional[torch.Tensor] = None,
    b_dequantized: Optional[torch.Tensor] = None,
    path: str = "",
) -> torch.Tensor:
    """``C = (D_a D_b) (A_u B_u^T) (+ bias)`` on quantized operands (docs/numerics.md section 2), FP32 accumulation.

    ``a`` is ``(..., K)``; ``b`` is ``(N, K)``, or ``(K, N)`` with square 2D blocks when ``b_transposed``.
    ``a_dequantized``/``b_dequantized``: the exact operands from ``fp4compile::quantize(with_dequantized=True)``
    (empty or None: dequantized here when the GEMM path needs them). ``path``: one of
    `fp4compile.codegen.gemm.GEMM_PATHS` or ``"reference"`` (the `choose_gemm_paths` pass's choice), empty to
    let `fp4compile.codegen.gemm.choose_gemm_path` pick.
    """
    a = to_quantized_tensor(a_data, a_scale, a_tensor_scale, a_operand)
    b = to_quantized_tensor(b_data, b_scale, b_tensor_scale, b_operand)
    return _gemm_impl(a, b, b_transposed, bias, out_dtype, a_dequantized, b_dequantized, path)


@gemm_operands.register_fake
def _gemm_operands_fake(a_data, a_scale, a_tensor_scale, b_data, b_scale, b_tensor_scale, bias, a_operand,
                        b_operand, b_transposed, out_dtype, a_dequantized=None, b_dequantized=None, path=""):
    n = b_data.shape[-1] * 2 if b_transposed else b_data.shape[0]
    return a_data.new_empty((*a_data.shape[:-1], n), dtype=out_dtype)
