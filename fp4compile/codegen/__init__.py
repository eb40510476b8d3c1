"""Code generation: fused Triton kernels for FP4 quantization and GEMMs (everything else goes to Inductor)."""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Iterator

__all__ = ["triton_available", "runs_on_triton", "interpreting", "traceable", "eager_launches"]


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


@functools.lru_cache(maxsize=None)
def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``, Triton's own setting): kernels
    decorated under it run on CPU tensors through NumPy, and cannot be traced or compiled. Read once, like the
    kernels' own choice, which `triton.jit` makes when it decorates them at import."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def traceable(kernel: Any) -> Any:
    """``torch.library.wrap_triton(kernel)``, what the host wrappers launch: inside a ``triton_op`` body traced by
    AOTAutograd (`fp4compile.ops.triton_ops`) the launch becomes a graph node that Inductor's generated code
    launches; in eager code (under `eager_launches`) it is a plain launch. Under ``TRITON_INTERPRET=1`` the
    kernel as it is (the interpreter's kernels cannot be traced)."""
    if interpreting():
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


@contextlib.contextmanager
def eager_launches() -> Iterator[None]:
    """Launch `traceable` kernels directly, not through the higher-order op that ``wrap_triton`` dispatches to by
    default (about a millisecond of host time per launch): for the eager ``custom_op`` implementations, which
    are never traced into. A ``triton_op`` does the same for its own eager calls."""
    try:
        from torch._library.triton import set_wrap_triton_enabled
    except ImportError:  # older torch: wrap_triton launches directly outside tracing
        yield
        return
    with set_wrap_triton_enabled(False):
        yield
