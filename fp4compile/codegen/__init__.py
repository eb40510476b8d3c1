"""Code generation: fused Triton kernels for FP4 quantization and GEMMs (everything else goes to Inductor)."""

from __future__ import annotations

import functools

__all__ = ["triton_available", "runs_on_triton"]


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


def runs_on_triton(t) -> bool:
    """Whether the Triton kernels handle tensor ``t``: a CUDA tensor, with `triton_available`. The reference
    implementations take everything else."""
    return t.is_cuda and triton_available()
