"""An independent eager implementation of the NV recipe (docs/numerics.md section 3), for training comparisons.

This is the recipe as a user would write it by hand around ``nn.Linear``: an ``autograd.Function`` whose three
GEMMs quantize their operands with a small NVFP4 quantizer written here in plain PyTorch. It shares no code
with fp4compile's quantizer, kernels, ops or passes, so a training run through it is a yardstick for the
compiled backend that cannot inherit the backend's mistakes:

    forward      y  = Q(x; 1x16, nearest) Q(W; 16x16, nearest)^T
    input grad   dx = Q(dy; 1x16, stochastic) Q(W; 16x16, nearest)       (the forward's quantized W)
    weight grad  dW = Q(H dy^T; 1x16 along tokens, stochastic) Q(H x^T; 1x16 along tokens, nearest)^T

``H`` is the 16-point random Hadamard transform along the token axis (section 3.3). The activation ``x`` is
saved in high precision and quantized along the token axis in backward, as the published recipe describes.

Its arithmetic differs from the specification's in the last bit where the order of FP32 operations is not
fixed here (the Hadamard transform is a matrix product, the block scale is ``amax_b / 6 * S``), and its
stochastic rounding is the exact one (``P(up) = f`` from a uniform float) unless ``sr_bits`` asks for the
hardware's 8-bit form (section 2.2). It is therefore not bit-comparable with the backend; it is
statistically the same recipe.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["EagerNvfp4Config", "EagerNvfp4Linear", "quantize_dequantize", "swap_in_eager_nvfp4"]

_E4M3_MAX = 448.0
_E2M1_MAX = 6.0
# TE's fixed sign vector for the 16-point transform (docs/numerics.md section 3.3).
_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)


@dataclasses.dataclass(frozen=True)
class EagerNvfp4Config:
    """What the eager twin quantizes.

    Attributes:
        stochastic_gradients: stochastic rounding of both gradient operands (else round to nearest).
        hadamard: the random Hadamard transform on the weight-gradient operands.
        sr_bits: ``None`` for exact stochastic rounding, 8 for the hardware's truncated form (section 2.2).
    """

    stochastic_gradients: bool = True
    hadamard: bool = True
    sr_bits: Optional[int] = None


def _hadamard_matrix(device: torch.device) -> torch.Tensor:
    """``(H16 / 4) diag(s)`` as a float32 matrix: orthogonal, applied to rows of 16 as ``rows @ M^T``."""
    h = torch.ones(1, 1)
    while h.shape[0] < 16:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / 4 * torch.tensor(_SIGNS, dtype=torch.float32)).to(device)


def _round_e2m1_nearest(v: torch.Tensor) -> torch.Tensor:
    """Magnitudes in [0, 6] to the E2M1 grid, ties to even: the grid is uniform with step 0.5 below 2, 1 below 4
    and 2 up to 6, and ``torch.round`` rounds half to even, which is the even code on each of those grids."""
    return torch.where(v < 2, torch.round(v * 2) / 2, torch.where(v < 4, torch.round(v), torch.round(v / 2) * 2))


def _round_e2m1_stochastic(v: torch.Tensor, sr_bits: Optional[int]) -> torch.Tensor:
    """Magnitudes in [0, 6] to one of their two E2M1 neighbours, up with probability ``f`` (exact) or
    ``floor(f * 2^bits) / 2^bits``."""
    step = torch.where(v < 2, 0.5, torch.where(v < 4, 1.0, 2.0))
    lo = torch.floor(v / step) * step
    f = (v - lo) / step
    if sr_bits is not None:
        f = torch.floor(f * 2**sr_bits) / 2**sr_bits
    return torch.where(torch.rand_like(v) < f, lo + step, lo).clamp(max=_E2M1_MAX)


def quantize_dequantize(x: torch.Tensor, tile_rows: int, stochastic: bool, sr_bits: Optional[int] = None,
                        hadamard: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (2D, blocks of 16 along its last axis, ``tile_rows`` of them per scale: 1 or 16) quantized to
    NVFP4 and decoded again: ``(E2M1 * d_b, D)``, float32, in the Hadamard domain where ``hadamard``.

    The unscaled part has at most 6 significant bits, so a TF32 or bf16 matrix product of two of them is exact
    up to FP32 summation order; the per-tensor ``D`` multiplies the product afterwards."""
    rows, cols = x.shape
    if cols % 16 or rows % tile_rows:
        raise ValueError(f"quantize_dequantize: shape {tuple(x.shape)} is not a whole number of {tile_rows}x16 blocks")
    xf = x.float()
    if hadamard:
        # float64: exact enough to be independent of whether the caller allows TF32 products.
        h = _hadamard_matrix(x.device).double().t()
        xf = (xf.double().reshape(rows, cols // 16, 16) @ h).float().reshape(rows, cols)
    amax = xf.abs().amax()
    encode = torch.where(amax > 0, (_E4M3_MAX * _E2M1_MAX) / amax, torch.ones_like(amax))
    blocks = xf.reshape(rows // tile_rows, tile_rows, cols // 16, 16)
    block_amax = blocks.abs().amax(dim=(1, 3), keepdim=True)
    scale = (block_amax / _E2M1_MAX * encode).clamp(max=_E4M3_MAX).to(torch.float8_e4m3fn).float()
    scaled = (blocks * (encode / scale)).nan_to_num(0.0, 0.0, 0.0).clamp(-_E2M1_MAX, _E2M1_MAX)
    mag = _round_e2m1_stochastic(scaled.abs(), sr_bits) if stochastic else _round_e2m1_nearest(scaled.abs())
    return (torch.sign(scaled) * mag * scale).reshape(rows, cols), 1 / encode


def _gemm(a: tuple[torch.Tensor, torch.Tensor], b_t: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``(D_a D_b) (A_u @ B_u)`` for ``a = (A_u, D_a)`` and ``b_t = (B_u, D_b)``, float32. On CUDA the unscaled
    operands go to the tensor cores as float16, where they are exact (at most 6 significant bits, 2^-10 to
    2688), with FP32 accumulation."""
    if a[0].is_cuda:
        product = torch.mm(a[0].half(), b_t[0].half(), out_dtype=torch.float32)
    else:
        product = a[0] @ b_t[0]
    return product * (a[1] * b_t[1])


def _pad_tokens(x2: torch.Tensor) -> torch.Tensor:
    return F.pad(x2, (0, 0, 0, (-x2.shape[0]) % 16))


class EagerNvfp4Linear(torch.autograd.Function):
    """``y = x W^T + b`` with the NV recipe's three quantized GEMMs (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, cfg: EagerNvfp4Config):
        x2 = x.reshape(-1, x.shape[-1])
        out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):  # float32 arithmetic, as in backward
            w_u, w_d = quantize_dequantize(weight, 16, stochastic=False)
            y = _gemm(quantize_dequantize(x2, 1, stochastic=False), (w_u.t(), w_d))
            if bias is not None:
                y = y + bias.float()
        ctx.save_for_backward(x2, w_u, w_d)
        ctx.cfg, ctx.x_shape, ctx.dtypes = cfg, x.shape, (x.dtype, weight.dtype)
        ctx.has_bias = bias is not None
        return y.to(out_dtype).reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x2, w_u, w_d = ctx.saved_tensors
        cfg: EagerNvfp4Config = ctx.cfg
        dy2 = dy.reshape(-1, dy.shape[-1])
        sr, bits, rht = cfg.stochastic_gradients, cfg.sr_bits, cfg.hadamard
        dx = _gemm(quantize_dequantize(dy2, 1, sr, bits), (w_u, w_d))
        dy_t, x_t = _pad_tokens(dy2).t(), _pad_tokens(x2).t()
        x_u, x_d = quantize_dequantize(x_t, 1, False, hadamard=rht)
        dw = _gemm(quantize_dequantize(dy_t, 1, sr, bits, rht), (x_u.t(), x_d))
        db = dy2.float().sum(0).to(ctx.dtypes[1]) if ctx.has_bias else None
        return dx.to(ctx.dtypes[0]).reshape(ctx.x_shape), dw.to(ctx.dtypes[1]), db, None


def swap_in_eager_nvfp4(model: nn.Module, names: Iterable[str],
                        cfg: EagerNvfp4Config = EagerNvfp4Config()) -> nn.Module:
    """Make each ``nn.Linear`` of ``model`` named in ``names`` run `EagerNvfp4Linear` (in place; returns
    ``model``). A name that is not an ``nn.Linear`` is a ``ValueError``."""
    modules = dict(model.named_modules())
    for name in names:
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"swap_in_eager_nvfp4: {name!r} is not an nn.Linear of the model "
                             f"(got {type(module).__name__ if module is not None else 'nothing'})")
        module.forward = lambda x, m=module: EagerNvfp4Linear.apply(x, m.weight, m.bias, cfg)
    return model
