"""The quantization kernels as ``torch.library.triton_op``: ``fp4compile::quantize_triton``,
``fp4compile::amax_triton`` and ``fp4compile::dequantize_triton``, for CUDA tensors.

A ``triton_op`` is traced, not called: when AOTAutograd and Inductor compile a graph, the op's Python body runs
once on fake tensors and every Triton launch in it (through ``wrap_triton``, `fp4compile.codegen.quantize`) is
recorded as a user-defined kernel that Inductor's generated code launches itself. So a compiled training step
runs no Python per quantization: the operand string is decoded, the tile chosen and the grid computed once, at
compile time, and the launch costs what an Inductor kernel's launch costs (the ``custom_op`` versions in
`fp4compile.ops.library` cost 130-240 us of host time per call; docs/benchmarks.md).

The kernels and their host wrappers are those of `fp4compile.codegen.quantize`, so the results are the bits
of ``fp4compile::quantize`` / ``fp4compile::amax`` (tests/test_triton_ops.py). What stays on the ``custom_op``
versions (`uses_triton_ops` says which): CPU tensors (the reference quantizer, what CI runs), formats the
kernels do not implement, and quantizations while a quantization observer is installed
(`fp4compile.ops.observe`; a traced op calls no Python, so it could not call the observer).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.library import triton_op

from ..codegen import runs_on_triton
from ..numerics.formats import Rounding
from ..policy.precision import OperandPrecision
from .library import _scale_bytes, dequantized_dtype
from .observe import current_observer

__all__ = ["quantize_traced", "tensor_amaxes_traced", "dequantize_traced", "uses_triton_ops"]


def uses_triton_ops(x: torch.Tensor, op: OperandPrecision) -> bool:
    """Whether the quantization of ``x`` as ``op`` goes through the traceable ops of this module: ``x`` is a
    tensor the Triton kernels handle (`fp4compile.codegen.runs_on_triton`), they implement ``op``'s format, and
    no quantization observer is installed. Decided when the graph is traced."""
    if not runs_on_triton(x) or current_observer() is not None:
        return False
    from ..codegen.quantize import is_supported

    return is_supported(op.format)


@triton_op("fp4compile::quantize_triton", mutates_args=())
def quantize_traced(
    x: torch.Tensor, operand: str, seed: Optional[torch.Tensor], with_dequantized: bool,
    amax: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fp4compile::quantize`` without the observer label, for CUDA tensors: (packed codes, block scales as raw
    bytes, tensor decode scale, exact operand ``E2M1[c] * d_b`` as (rows, K) or an empty tensor).

    ``operand`` (`OperandPrecision.encode`) is decoded when the op is traced (compile time under Inductor).
    ``seed``: the stochastic-rounding key, an int64 0-dim tensor on the device (read by the kernel, so the launch
    can be captured in a CUDA graph); None for round to nearest. ``amax``: the tensor amax if known (float32
    0-dim, from ``fp4compile::amax_triton``), else computed by a first kernel.
    """
    from ..codegen.quantize import quantize_triton

    op = OperandPrecision.decode(operand)
    if op.rounding is Rounding.STOCHASTIC and seed is None:
        raise ValueError(f"fp4compile::quantize_triton: operand {operand!r} rounds stochastically and needs a seed")
    operand_dtype = dequantized_dtype(op) if with_dequantized else None
    out = quantize_triton(x, op.format, op.block, op.rounding, seed if seed is not None else 0, 0, op.hadamard,
                          dequantized_dtype=operand_dtype, amax=amax)
    qt, operand_matrix = out if with_dequantized else (out, x.new_empty((0,), dtype=dequantized_dtype(op)))
    return qt.qdata, _scale_bytes(qt.scale), qt.per_tensor_scale, operand_matrix


@triton_op("fp4compile::amax_triton", mutates_args=())
def tensor_amaxes_traced(x: torch.Tensor, hadamard: bool) -> torch.Tensor:
    """``fp4compile::amax`` for CUDA tensors: ``[amax after the RHT along the last axis (plain when not
    hadamard), max |x|]``, float32 (2,), from one read of ``x``."""
    from ..codegen.quantize import tensor_amaxes_triton

    return tensor_amaxes_triton(x, hadamard)


@triton_op("fp4compile::dequantize_triton", mutates_args=())
def dequantize_traced(qdata: torch.Tensor, scale: torch.Tensor, tensor_scale: torch.Tensor, operand: str) -> torch.Tensor:
    """The exact unscaled operand ``E2M1[c] * d_b`` of a quantization (the parts ``fp4compile::quantize_triton``
    returned, ``operand`` its `OperandPrecision.encode`) as a (rows, K) matrix in `dequantized_dtype`, for CUDA
    tensors: the weight-gradient GEMM's saved x^T, kept packed between forward and backward."""
    from ..codegen.quantize import dequantize_unscaled_triton
    from .library import to_quantized_tensor

    op = OperandPrecision.decode(operand)
    return dequantize_unscaled_triton(to_quantized_tensor(qdata, scale, tensor_scale, operand), dequantized_dtype(op))
