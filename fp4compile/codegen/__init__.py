"""Code generation: fused Triton kernels for FP4 quantization and GEMMs (everything else goes to Inductor)."""

from __future__ import annotations

import functools

__all__ = ["triton_available"]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the Triton kernels can run: Triton imports and a CUDA device is present."""
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    if not torch.cuda.is_available():
        return False
    try:
        from . import quantize  # noqa: F401
    except ImportError:
        return False
    return True
