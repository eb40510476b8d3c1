"""The 16-point random Hadamard transform (RHT) of the NV recipe (docs/numerics.md section 3.3).

Each run of 16 consecutive elements ``v`` along the last axis becomes ``M v`` with ``M = (H16 / 4) diag(s)``,
``H16`` the Sylvester Hadamard matrix and ``s`` a fixed sign vector shared by every layer. ``M`` is
orthogonal, so ``(M a)^T (M b) = a^T b``: applied to both operands of the weight-gradient GEMM along the token
axis it leaves the product unchanged before quantization while spreading outliers over 16 elements.

The transform is computed as sign flips (exact), four add/subtract butterfly stages in float32 in a fixed
order, then a multiplication by 1/4 (exact). Kernels perform the same stages in the same order, so the
transformed values, and with them the quantized codes, agree bit for bit.
"""

from __future__ import annotations

import torch

__all__ = ["RHT_SIGNS", "HADAMARD_SIZE", "random_hadamard_transform", "hadamard_matrix"]

HADAMARD_SIZE = 16
#: The fixed sign vector (TransformerEngine's; docs/numerics.md section 3.3).
RHT_SIGNS: tuple[int, ...] = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)


def _butterflies(v: torch.Tensor, trailing: int = 0) -> torch.Tensor:
    """Unnormalised Sylvester-Hadamard product of each 16-run of float32 ``v`` (shape ``(..., 16, *rest)``, the
    run axis followed by ``trailing`` axes ``rest``)."""
    axis = v.dim() - 1 - trailing
    lead, rest = v.shape[:axis], v.shape[axis + 1:]
    for h in (1, 2, 4, 8):
        pairs = v.reshape(*lead, HADAMARD_SIZE // (2 * h), 2, h, *rest)
        a, b = pairs.select(axis + 1, 0), pairs.select(axis + 1, 1)
        v = torch.stack((a + b, a - b), dim=axis + 1).reshape(*lead, HADAMARD_SIZE, *rest)
    return v


_NEGATIVE_MASK = sum(1 << i for i, sign in enumerate(RHT_SIGNS) if sign < 0)


def _signs(device: torch.device) -> torch.Tensor:
    """The sign vector on ``device``, computed from a bit mask: no host copy (CUDA-graph capture forbids
    them) and no cached tensor (it could land in a graph's memory pool)."""
    bits = (_NEGATIVE_MASK >> torch.arange(HADAMARD_SIZE, device=device)) & 1
    return (1 - 2 * bits).to(torch.float32)


def random_hadamard_transform(x: torch.Tensor, inverse: bool = False, dim: int = -1) -> torch.Tensor:
    """Apply ``M = (H16 / 4) diag(s)`` (or its inverse ``M^T``) to every run of 16 along axis ``dim`` (the last
    by default; ``dim=0`` of a ``(tokens, features)`` matrix transforms its transpose's rows without a copy).

    ``x`` is float32 with axis ``dim`` divisible by 16; the result is float32 of the same shape.
    """
    dim = dim % x.dim() if x.dim() else 0
    if x.shape[dim] % HADAMARD_SIZE:
        raise ValueError(
            f"random_hadamard_transform: axis {dim} of x (shape {tuple(x.shape)}) must be divisible by "
            f"{HADAMARD_SIZE}, got {x.shape[dim]}"
        )
    trailing = x.dim() - 1 - dim
    signs = _signs(x.device).reshape(HADAMARD_SIZE, *([1] * trailing))
    runs = x.reshape(*x.shape[:dim], x.shape[dim] // HADAMARD_SIZE, HADAMARD_SIZE, *x.shape[dim + 1:])
    if inverse:
        out = _butterflies(runs, trailing) * 0.25 * signs
    else:
        out = _butterflies(runs * signs, trailing) * 0.25
    return out.reshape(x.shape)


def hadamard_matrix(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The 16x16 matrix ``M = (H16 / 4) diag(s)`` (for tests and documentation)."""
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < HADAMARD_SIZE:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / 4 * torch.tensor(RHT_SIGNS, dtype=dtype)
