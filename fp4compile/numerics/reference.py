"""The reference quantizer: docs/numerics.md section 2 in plain PyTorch, step by step.

It is the oracle every kernel is tested against bit for bit, and the CPU implementation of the backend's
ops. All arithmetic is float32, each step rounds once, and every division is tensor by tensor (PyTorch on
CUDA multiplies by the reciprocal when dividing by a Python scalar, which is not correctly rounded).
"""

from __future__ import annotations

from typing import Optional

import torch

from .formats import E2M1_MAX, Fp4Format, Rounding
from .hadamard import random_hadamard_transform
from .qtensor import QuantizedTensor, expand_block_scales, pack_codes
from .rounding import (
    FLT_MAX,
    e2m1_codes_nearest,
    e2m1_codes_stochastic,
    power_of_two_scale,
    round_to_scale_format,
)

__all__ = ["quantize_reference", "tensor_amaxes_reference", "tensor_amax_along", "tensor_encode_scale"]


def tensor_encode_scale(amax: torch.Tensor, fmt: Fp4Format) -> torch.Tensor:
    """Global encode scale ``S`` (docs/numerics.md section 2 step 2): ``min(6 * scale_max / amax, FLT_MAX)``, and 1
    where ``amax`` is 0, non-finite, or the quotient underflows to 0 (non-finite blocks become NaN separately)."""
    if not fmt.tensor_scale:
        return torch.ones_like(amax)
    numerator = torch.full_like(amax, E2M1_MAX * fmt.scale_max)  # 2688 for NVFP4, exact in float32
    s = torch.clamp(numerator / amax, max=FLT_MAX)
    use_one = (amax == 0) | (s == 0) | ~torch.isfinite(amax)
    return torch.where(use_one, torch.ones_like(s), s)


def _block_decode_scales(block_amax: torch.Tensor, s: torch.Tensor, fmt: Fp4Format) -> torch.Tensor:
    """Block decode scales ``d_b`` as float32 (docs/numerics.md section 2 step 3), NaN for non-finite blocks."""
    if fmt.scale_format.is_power_of_two:
        d = power_of_two_scale(block_amax * s, fmt.scale_rounding, fmt.scale_format)
    else:
        # S * (1/6) is one float32 product rounded once (a Python scalar factor is cast to float32 first; only
        # division by a scalar is inexact on CUDA); then times amax_b, rounded once; no lower clamp.
        s_over_6 = s * (1.0 / E2M1_MAX)
        scaled = torch.clamp(block_amax * s_over_6, max=fmt.scale_max)
        d = round_to_scale_format(scaled, fmt.scale_format)
    return torch.where(torch.isfinite(block_amax), d, torch.full_like(d, float("nan")))


def _amax(xf: torch.Tensor) -> torch.Tensor:
    """``max |xf|`` as float32, NaN if any element is NaN, 0 for an empty tensor."""
    return xf.abs().amax() if xf.numel() else torch.zeros((), device=xf.device)


def tensor_amaxes_reference(x: torch.Tensor, hadamard: bool = True) -> torch.Tensor:
    """``[amax after the 16-point RHT along the last axis (plain amax when not hadamard), plain amax]`` of ``x``
    as a float32 (2,) tensor: the tensor amaxes (docs/numerics.md section 2 step 1) of the two quantizations of one
    activation, one through the RHT for the weight gradient and one without."""
    xf = x.reshape(-1, x.shape[-1]).to(torch.float32)
    plain = _amax(xf)
    transformed = _amax(random_hadamard_transform(xf)) if hadamard and xf.numel() else plain
    return torch.stack([transformed, plain])


def tensor_amax_along(x: torch.Tensor, hadamard: bool, dim: int = -1) -> torch.Tensor:
    """The tensor amax (docs/numerics.md section 2 step 1) of ``x`` quantized along axis ``dim``: ``max |x|``, or
    after the 16-point RHT along ``dim`` (section 3.3) where ``hadamard``; float32 0-dim.

    ``tensor_amax_along(x2, h, dim=0)`` of a ``(tokens, features)`` matrix is ``tensor_amaxes_reference(x2.t(),
    h)[0]`` bit for bit (the same runs, signs, butterflies and order) read in x2's own layout. Plain ATen ops:
    traced into a graph, Inductor fuses the reduction with the kernel that produced ``x`` (the maximum needs
    no rounding, the butterflies are adds in a fixed order and the products by the signs and 1/4 are exact,
    so no fusion or FMA contraction can change a bit).
    """
    xf = x.to(torch.float32)
    if hadamard and xf.numel():
        xf = random_hadamard_transform(xf, dim=dim)
    return _amax(xf)


def quantize_reference(
    x: torch.Tensor,
    fmt: Fp4Format,
    block: tuple[int, int],
    rounding: Rounding,
    seed: "int | torch.Tensor" = 0,
    offset: "int | torch.Tensor" = 0,
    hadamard: bool = False,
    amax: Optional[torch.Tensor] = None,
) -> QuantizedTensor:
    """Quantize ``x`` along its last axis (arguments already validated by `fp4compile.quantize`).

    ``amax``: the tensor amax of ``x`` (after the RHT where ``hadamard``) when the caller already has it
    (`tensor_amaxes_reference`); the result follows the spec only if it is that exact value.
    """
    k = x.shape[-1]
    lead = x.shape[:-1]
    xf = x.reshape(-1, k).to(torch.float32)
    rows = xf.shape[0]
    if hadamard:
        xf = random_hadamard_transform(xf)
    br, bc = block

    # Step 1-2: tensor amax and the global encode/decode scales (D correctly rounded: tensor division).
    if amax is None:
        amax = _amax(xf)
    else:
        amax = amax.reshape(()).to(device=xf.device, dtype=torch.float32)
    s = tensor_encode_scale(amax, fmt)
    d_global = torch.ones_like(s) / s

    # Step 3: block amax and block decode scales.
    block_amax = xf.abs().reshape(rows // br, br, k // bc, bc).amax(dim=(1, 3))
    d_block = _block_decode_scales(block_amax, s, fmt)

    # Step 4: block encode multiplier e_b = min(1 / (d_b * D), FLT_MAX), broadcast to elements.
    e_block = torch.clamp(torch.ones_like(d_block) / (d_block * d_global), max=FLT_MAX)
    e = expand_block_scales(e_block, rows, k, block)

    # Step 5: scale, clamp to [-6, 6], round to E2M1. Blocks with a NaN scale keep code 0 (the scale carries NaN).
    v = torch.clamp(xf * e, -E2M1_MAX, E2M1_MAX)
    if rounding is Rounding.STOCHASTIC:
        codes = e2m1_codes_stochastic(v, seed, offset)
    else:
        codes = e2m1_codes_nearest(v)
    nan_blocks = expand_block_scales(torch.isnan(d_block), rows, k, block)
    codes = torch.where(nan_blocks, torch.zeros_like(codes), codes)

    if br == 1:
        scale_shape = (*lead, k // bc)
    else:
        scale_shape = (rows // br, k // bc)
    return QuantizedTensor(
        qdata=pack_codes(codes).reshape(*lead, k // 2),
        scale=d_block.to(fmt.scale_format.storage_dtype).reshape(scale_shape),
        per_tensor_scale=d_global,
        format=fmt,
        block=block,
        hadamard=hadamard,
        orig_dtype=x.dtype,
    )
