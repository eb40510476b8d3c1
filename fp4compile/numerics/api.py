"""The public quantization entry points: argument checking and the choice of implementation."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from .formats import BLOCK_SIZES, Fp4Format, Rounding, resolve_format
from .hadamard import HADAMARD_SIZE
from .qtensor import QuantizedTensor
from .reference import quantize_reference

__all__ = ["quantize", "quantize_dequantize", "IMPLEMENTATIONS", "QuantizeArgs", "check_quantize_args"]

IMPLEMENTATIONS = ("auto", "reference", "triton")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class QuantizeArgs:
    """Validated arguments of one quantization: the format (its block size set from ``block``), the block
    shape, the rounding and whether the Hadamard transform runs first."""

    format: Fp4Format
    block: tuple[int, int]
    rounding: Rounding
    hadamard: bool


def _parse_rounding(rounding: "str | Rounding") -> Rounding:
    try:
        return Rounding(rounding)
    except ValueError:
        raise ValueError(
            f"rounding must be one of {[r.value for r in Rounding]}, got {rounding!r}"
        ) from None


def _parse_block(block: Optional[Sequence[int]], fmt: Fp4Format) -> tuple[int, int]:
    if block is None:
        return (1, fmt.block_size)
    if not (isinstance(block, (tuple, list)) and len(block) == 2 and all(isinstance(b, int) for b in block)):
        raise ValueError(f"block must be a pair of ints like (1, 16) or (16, 16), got {block!r}")
    rows, cols = block
    if cols not in BLOCK_SIZES or rows not in (1, cols):
        raise ValueError(
            f"block must be (1, b) or (b, b) with b in {BLOCK_SIZES}, got {tuple(block)}"
        )
    return (rows, cols)


def check_quantize_args(
    x: torch.Tensor,
    format: "str | Fp4Format",
    block: Optional[Sequence[int]],
    rounding: "str | Rounding",
    hadamard: bool,
) -> QuantizeArgs:
    """Validate the arguments of `quantize` against ``x``; raise `ValueError`/`TypeError` naming the
    argument, the shape and what is required."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"quantize: x must be float32, bfloat16 or float16, got a {x.dtype} tensor of shape {tuple(x.shape)}"
        )
    if x.dim() < 1:
        raise ValueError("quantize: x must have at least one dimension, got a 0-dim tensor")
    fmt = resolve_format(format)
    rnd = _parse_rounding(rounding)
    blk = _parse_block(block, fmt)
    if blk[1] != fmt.block_size:
        fmt = dataclasses.replace(fmt, block_size=blk[1], name="")
    k = x.shape[-1]
    if k % blk[1]:
        raise ValueError(
            f"quantize: the last axis of x (shape {tuple(x.shape)}) has size {k}, which is not divisible by "
            f"the block size {blk[1]}; pad it or keep this tensor in high precision"
        )
    if blk[0] > 1:
        rows = x.numel() // k if k else 0
        if rows % blk[0]:
            raise ValueError(
                f"quantize: {blk[0]}x{blk[1]} blocks need the leading axes of x (shape {tuple(x.shape)}) to hold a "
                f"multiple of {blk[0]} rows, got {rows}"
            )
    if hadamard and k % HADAMARD_SIZE:
        raise ValueError(
            f"quantize: hadamard=True needs the last axis of x (shape {tuple(x.shape)}) divisible by "
            f"{HADAMARD_SIZE}, got {k}"
        )
    return QuantizeArgs(fmt, blk, rnd, bool(hadamard))


def _pick_implementation(impl: str, x: torch.Tensor) -> str:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"quantize: impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl != "auto":
        return impl
    from ..codegen import runs_on_triton

    return "triton" if runs_on_triton(x) else "reference"


def quantize(
    x: torch.Tensor,
    format: "str | Fp4Format" = "nvfp4",
    block: Optional[Sequence[int]] = None,
    rounding: "str | Rounding" = "nearest",
    seed: "int | torch.Tensor" = 0,
    offset: "int | torch.Tensor" = 0,
    hadamard: bool = False,
    impl: str = "auto",
) -> QuantizedTensor:
    """Quantize ``x`` to a block-scaled FP4 format along its last axis (docs/numerics.md section 2).

    Args:
        x: a float32, bfloat16 or float16 tensor of any leading shape; non-contiguous views are fine.
        format: ``"nvfp4"`` (16-element blocks, E4M3 scales, FP32 tensor scale), ``"mxfp4"`` (32, UE8M0, no
            tensor scale), another preset or spec string, or an `Fp4Format`.
        block: ``(1, b)`` for blocks of ``b`` along the last axis, ``(b, b)`` for 2D tiles (the weight tiling,
            giving the same dequantized matrix for ``W`` and ``W.T``); defaults to ``(1, format.block_size)``.
        rounding: ``"nearest"`` (ties to even) or ``"stochastic"``.
        seed, offset: the Philox key and first counter of stochastic rounding; element ``i`` (row-major)
            takes byte ``i % 4`` of word ``(i % 16) // 4`` at counter ``offset + i // 16``, so a call uses
            ``ceil(numel / 16)`` counters (docs/numerics.md section 2.2).
        hadamard: apply the 16-point random Hadamard transform along the last axis first (docs/numerics.md section 3.3);
            the tensor amax is taken after it and the result stays in the transformed domain.
        impl: ``"reference"`` (plain PyTorch), ``"triton"`` (fused kernels), or ``"auto"`` (Triton on CUDA
            where available).

    Returns:
        A `QuantizedTensor`.
    """
    args = check_quantize_args(x, format, block, rounding, hadamard)
    chosen = _pick_implementation(impl, x)
    if chosen == "triton":
        from ..codegen.quantize import quantize_triton

        return quantize_triton(x, args.format, args.block, args.rounding, seed, offset, args.hadamard)
    return quantize_reference(x, args.format, args.block, args.rounding, seed, offset, args.hadamard)


def quantize_dequantize(
    x: torch.Tensor,
    format: "str | Fp4Format" = "nvfp4",
    block: Optional[Sequence[int]] = None,
    rounding: "str | Rounding" = "nearest",
    seed: "int | torch.Tensor" = 0,
    offset: "int | torch.Tensor" = 0,
    hadamard: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """`quantize` then `QuantizedTensor.dequantize`, returned in ``x``'s dtype and shape (fake quantization)."""
    qt = quantize(x, format, block, rounding, seed, offset, hadamard, impl)
    return qt.dequantize(x.dtype)
