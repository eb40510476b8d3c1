"""`QuantizedTensor`: packed E2M1 codes, block decode scales and the per-tensor decode scale."""

from __future__ import annotations

import dataclasses

import torch

from .formats import Fp4Format
from .rounding import e2m1_values

__all__ = ["QuantizedTensor", "pack_codes", "unpack_codes", "expand_block_scales"]


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Pack E2M1 codes (uint8, last axis even) two per byte, the lower index in the low nibble (docs/numerics.md
    section 1, the layout of ``torch.float4_e2m1fn_x2``)."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 codes, the last axis twice as long."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def expand_block_scales(scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """Broadcast float32 block scales of shape ``(rows // block[0], cols // block[1])`` to ``(rows, cols)``."""
    return scale.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)


@dataclasses.dataclass
class QuantizedTensor:
    """A tensor quantized to a block-scaled FP4 format.

    Attributes:
        qdata: uint8, shape ``(*lead, K // 2)``: two E2M1 codes per byte along the last axis, lower index in
            the low nibble.
        scale: block decode scales in ``format.scale_format.storage_dtype``; shape ``(*lead, K // b)`` for
            ``(1, b)`` blocks and ``(rows // b, K // b)`` for ``(b, b)`` blocks, ``rows`` the product of ``lead``.
            A block that held a NaN or an infinity has a NaN scale (docs/numerics.md section 2.3).
        per_tensor_scale: float32 0-dim tensor, the global decode scale ``D`` (1.0 where the format has none).
        format: the `Fp4Format`.
        block: the block shape ``(1, b)`` or ``(b, b)``.
        hadamard: whether the values are in the random-Hadamard-transformed domain (docs/numerics.md section 3.3).
        orig_dtype: the dtype of the tensor that was quantized.
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    per_tensor_scale: torch.Tensor
    format: Fp4Format
    block: tuple[int, int]
    hadamard: bool = False
    orig_dtype: torch.dtype = torch.float32

    @property
    def shape(self) -> torch.Size:
        """The logical shape of the quantized tensor."""
        return torch.Size((*self.qdata.shape[:-1], self.qdata.shape[-1] * 2))

    def codes(self) -> torch.Tensor:
        """The unpacked E2M1 codes (uint8, 0..15) in the logical shape."""
        return unpack_codes(self.qdata)

    def block_scales(self) -> torch.Tensor:
        """Block decode scales as float32, broadcast to the logical shape flattened to 2D ``(rows, K)``."""
        k = self.shape[-1]
        rows = self.qdata.numel() * 2 // k
        scale = self.scale.to(torch.float32).reshape(-1, k // self.block[1])
        return expand_block_scales(scale, rows, k, self.block)

    def row_block_scales(self) -> torch.Tensor:
        """The block scales in ``1 x b`` layout, shape ``(*lead, K // b)`` in the storage dtype: a ``b x b`` tile's
        scale repeated over its ``b`` rows. Exact, since every row of a tile has the tile's scale: the layout of
        formats that hold one scale per ``1 x b`` block (ONNX ``DequantizeLinear``, the NVFP4 checkpoint formats;
        docs/numerics.md section 3.2)."""
        if self.block[0] == 1:
            return self.scale
        return self.scale.repeat_interleave(self.block[0], dim=0).reshape(*self.shape[:-1], -1)

    def dequantize_unscaled(self) -> torch.Tensor:
        """``E2M1[c] * d_b`` as float32 in the logical shape, without the tensor scale: exact, and what an
        NVFP4 GEMM multiplies before applying the tensor scales as alpha (docs/numerics.md section 2.4)."""
        k = self.shape[-1]
        values = e2m1_values(self.codes()).reshape(-1, k)
        return (values * self.block_scales()).reshape(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``x_hat = E2M1[c] * d_b * D`` (docs/numerics.md section 2 step 6) in ``dtype``. Values stay in the Hadamard
        domain where ``hadamard`` is set."""
        return (self.dequantize_unscaled() * self.per_tensor_scale).to(dtype)
