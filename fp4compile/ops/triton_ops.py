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

Compile time: for every traced launch, torch generates the kernel's Triton IR to find which arguments it
writes, three times per launch (functionalization, Inductor's graph lowering, its kernel node), about 0.15-0.25 s
each for the quantize kernel. A GPT-2-small step has about 300 such launches, all of a few dozen distinct
configurations: the first compile took 175 s where BF16's took 27 (docs/benchmarks.md).
`_memoize_access_analysis` keeps that analysis per kernel and configuration for fp4compile's kernels.
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any, Callable, Optional

import torch
from torch.library import triton_op

from ..codegen import runs_on_triton
from ..numerics.formats import Rounding
from ..policy.precision import OperandPrecision
from .library import _scale_bytes, dequantized_dtype
from .observe import current_observer

__all__ = ["quantize_traced", "tensor_amaxes_traced", "dequantize_traced", "gemm_dense_traced", "uses_triton_ops"]

logger = logging.getLogger(__name__)

#: The kernels whose access analysis is memoized (`_memoize_access_analysis`): defined in this package only.
_OWN_KERNEL_MODULES = ("fp4compile.codegen.quantize", "fp4compile.codegen.gemm", "fp4compile.codegen.gemm_device_tma")
#: torch's per-launch analysis, by the name it has in the versions fp4compile supports.
_ANALYSIS_NAMES = ("identify_accessed_tensors", "identify_mutated_tensors")


def _argument_key(value: Any) -> Any:
    """What the access analysis of one kernel argument depends on: a tensor's dtype (any tensor-like: fake
    tensors, Inductor's IR nodes), a scalar's value; None where the argument cannot be keyed."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return (type(value).__name__, value)
    if getattr(value, "is_number", False):  # a sympy number (Inductor's kernel node passes sizes as such)
        return ("number", str(value))
    dtype = getattr(value, "dtype", None)
    if dtype is None and callable(getattr(value, "get_dtype", None)):
        dtype = value.get_dtype()
    return ("tensor", str(dtype)) if isinstance(dtype, torch.dtype) else None


def _kernel_key(kernel: Any) -> Optional[tuple]:
    """The Python function under ``kernel`` and the launch configurations wrapped around it. torch wraps a
    ``wrap_triton`` kernel launched with ``num_warps`` in a fresh one-config Autotuner per launch, so the
    wrapper's identity would never repeat; the configurations' constexprs do enter the analysis."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    configs = []
    while isinstance(kernel, (Autotuner, Heuristics)):
        for cfg in getattr(kernel, "configs", None) or ():
            configs.append((tuple(sorted((k, _argument_key(v)) for k, v in cfg.kwargs.items())),
                            getattr(cfg, "num_warps", None), getattr(cfg, "num_stages", None)))
        kernel = kernel.fn
    fn = getattr(kernel, "fn", None)
    if fn is None or getattr(fn, "__module__", None) not in _OWN_KERNEL_MODULES:
        return None
    return (fn.__module__, fn.__qualname__, tuple(configs))


def _analysis_key(kernel: Any, kwargs: Any, rest: tuple) -> Optional[tuple]:
    kernel_key = _kernel_key(kernel)
    if kernel_key is None or not isinstance(kwargs, dict) or any(rest):
        return None
    items = tuple((name, _argument_key(v)) for name, v in sorted(kwargs.items()))
    if any(key is None for _, key in items):
        return None
    return (kernel_key, items)


def _memoized(analysis: Callable[..., Any]) -> Callable[..., Any]:
    cache: dict[tuple, Any] = {}

    @functools.wraps(analysis)
    def run(kernel, kwargs, *rest, **options):
        key = None if options else _analysis_key(kernel, kwargs, rest)
        if key is None:
            return analysis(kernel, kwargs, *rest, **options)
        if key not in cache:
            cache[key] = analysis(kernel, kwargs, *rest, **options)
        return copy.deepcopy(cache[key])  # callers may rename or extend what they get

    run._fp4compile_memoized = True
    return run


def _memoize_access_analysis() -> None:
    """Memoize torch's per-launch analysis of which tensors a user-defined Triton kernel reads and writes, for
    fp4compile's own kernels: it depends only on the kernel, its constexprs and which arguments are tensors of
    which dtype (the key, with every scalar's value), and generating the Triton IR it reads dominated compile
    time (module docstring). Other kernels go through unchanged. A no-op where torch has no such function."""
    from torch._higher_order_ops import triton_kernel_wrap

    for name in _ANALYSIS_NAMES:
        analysis = getattr(triton_kernel_wrap, name, None)
        if analysis is None:
            continue
        if not getattr(analysis, "_fp4compile_memoized", False):
            setattr(triton_kernel_wrap, name, _memoized(analysis))
            logger.debug("fp4compile: memoizing %s for fp4compile's kernels", name)
        return


_memoize_access_analysis()


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


@triton_op("fp4compile::gemm_dense_traced", mutates_args=())
def gemm_dense_traced(a16: torch.Tensor, b16: torch.Tensor, d_a: torch.Tensor, d_b: torch.Tensor,
                      bias: Optional[torch.Tensor], b_transposed: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """The ``triton_traced`` GEMM path, for CUDA tensors: ``(D_a * D_b) * (A_u @ B_u^T) (+ bias)`` in ``out_dtype``
    from the exact fp16 operands, ``a16`` (M, K) and ``b16`` stored (N, K) (or (K, N) when ``b_transposed``), as
    `fp4compile.codegen.gemm_device_tma.gemm_dense_device` (device-side TMA descriptors, so the launch traces into
    the graph and Inductor's code launches it: no Python per call, with or without CUDA graphs)."""
    from ..codegen.gemm_device_tma import gemm_dense_device

    b_kn = b16 if b_transposed else b16.t()
    return gemm_dense_device(a16, b_kn, d_a, d_b, bias, out_dtype)
