"""The dense FP4 GEMM with device-side TMA descriptors: the ``"triton_traced"`` path.

``C = (D_a * D_b) * (A_u @ B_u) (+ bias)`` on the exact fp16 operands (docs/numerics.md sections 2.4-2.5), the
program of `fp4compile.codegen.gemm._dense_tma_kernel` (persistent grid, grouped tile order, FP32 accumulator, the
epilogue fused, bf16 out), with one difference: the kernel builds its TMA descriptors itself
(``tl.make_tensor_descriptor``) from plain pointers, shapes and strides. Host-side descriptors
(`_launch_dense_tma`) are Python objects made per call, which ``wrap_triton`` does not take outside Dynamo, so
that kernel can only run from the eager ``fp4compile::gemm`` op (Python per call, hidden only by CUDA-graph
replay). This kernel takes tensors and integers only, so the ``fp4compile::gemm_dense_traced`` ``triton_op``
(`fp4compile.ops.triton_ops`) traces it into the graph and Inductor's generated code launches it, with or
without CUDA graphs.

Tile math, per program (as in Triton's persistent-matmul tutorial)::

    tiles      = cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)      one (BLOCK_M, BLOCK_N) C tile each
    program p  takes tiles p, p + NUM_PROGS, ...          NUM_PROGS = number of SMs (one wave at a time)
    tile t  -> (pid_m, pid_n) in groups of GROUP_M rows   neighbouring programs share A rows and B columns in L2
    C[pid_m, pid_n] = sum over k-steps of A[pid_m, k] @ B[k, pid_n]   BLOCK_K per step, in increasing k

The same tiles and k order as the host-descriptor kernel, so for one configuration both give the same bits
(tests/test_codegen_gemm.py); only the data-parallel schedule ("dp") is used: the cut schedules need per-device
flag buffers that live across launches, which a traced op cannot hold, and the path is taken only where the
reduction is no longer than an output side (forward and input-gradient GEMMs), where "dp" is the one measured
fastest (`DENSE_CONFIG_TABLE`).

Device-side descriptors are written by the kernel into a global scratch buffer that Triton's launcher obtains
from ``triton.set_allocator``'s allocator at each launch. The allocator is a ContextVar: set in one thread, it is
unset in autograd's backward thread. Inductor's launcher sets one before each launch of a user kernel in the
torch versions `traced_gemm_available` accepts; `ensure_allocator` sets one in the calling thread for eager
calls.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from typing import Optional

import torch
import triton
import triton.language as tl

from . import interpreting, traceable
from .gemm import (
    DenseConfig,
    _cuda_sm_count,
    _default_dense_config,
    _fit_output,
    _sm90_or_newer,
    _dense_tma_kernel,
)

__all__ = ["gemm_dense_device", "traced_gemm_available", "ensure_allocator", "device_config"]

logger = logging.getLogger(__name__)


@triton.jit
def _dense_device_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, da_ptr, db_ptr, M, N, K, stride_am, stride_b, stride_cm,
    B_KN: tl.constexpr, HAS_BIAS: tl.constexpr, FLATTEN: tl.constexpr, EPI_SPLIT: tl.constexpr,
    NUM_PROGS: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """`_dense_tma_kernel` ("dp" schedule) on descriptors made here: A (M, K) row-major, B stored (K, N) when B_KN else
    (N, K) (read transposed), C (M, N) row-major; strides in elements, the last one 1."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    if B_KN:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_b, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_b, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    C_WIDTH: tl.constexpr = BLOCK_N // 2 if EPI_SPLIT else BLOCK_N
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1], block_shape=[BLOCK_M, C_WIDTH])
    # The workspace and flag pointers are those of the cut schedules, never touched by "dp" (SCHEDULE 0).
    _dense_tma_kernel(a_desc, b_desc, c_desc, bias_ptr, da_ptr, db_ptr, c_ptr, c_ptr, M, N, K, 0, 0,
                  B_KN, HAS_BIAS, 0, 1, FLATTEN, EPI_SPLIT, NUM_PROGS, INTERP, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


def _allocate_scratch(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Give Triton an allocator for the descriptors' scratch in this thread (a ContextVar), unless one is set."""
    from triton.runtime import _allocation

    current = _allocation._allocator.get()
    if isinstance(current, _allocation.NullAllocator):
        triton.set_allocator(_allocate_scratch)


@functools.lru_cache(maxsize=None)
def _inductor_sets_allocator() -> bool:
    """Whether Inductor's launcher of Triton kernels sets ``triton.set_allocator`` before a launch (read from its
    source): then user kernels with device-side descriptors run in any thread, the backward's included."""
    try:
        from torch._inductor.runtime.triton_heuristics import CachingAutotuner

        return "set_allocator" in inspect.getsource(CachingAutotuner.run)
    except Exception:  # no Inductor, no source: assume not
        return False


def traced_gemm_available(device: "torch.device | str" = "cuda") -> bool:
    """Whether the ``"triton_traced"`` path can run on ``device``: compute capability 9.0 or newer, Triton with
    device-side descriptors, and an Inductor that sets the descriptors' allocator per launch.
    ``FP4COMPILE_TRACED_GEMM=0|1`` (`fp4compile.env.traced_gemm`) turns it off or on regardless."""
    from .. import env

    forced = env.traced_gemm()
    if forced is not None:
        return forced
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available() or not _sm90_or_newer(dev.index):
        return False
    if not hasattr(tl, "make_tensor_descriptor"):
        return False
    if not _inductor_sets_allocator():
        logger.info("fp4compile: Inductor sets no Triton allocator per launch; the traced TMA GEMM is not used")
        return False
    return True


def device_config(m: int, n: int, k: int, b_kn: bool, out_dtype: torch.dtype, num_progs: int) -> DenseConfig:
    """The configuration of `_dense_device_kernel` for a shape: `DENSE_CONFIG_TABLE`'s or the default, with the
    data-parallel schedule (the only one this kernel runs) and its shared memory fitted to the output dtype."""
    cfg = _default_dense_config(m, n, k, b_kn, num_progs)
    if cfg.schedule != "dp":
        cfg = dataclasses.replace(cfg, schedule="dp", split_k=0)
    return _fit_output(cfg, out_dtype)


def gemm_dense_device(
    a16: torch.Tensor,
    b_kn: torch.Tensor,
    d_a: torch.Tensor,
    d_b: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: Optional[DenseConfig] = None,
    num_progs: Optional[int] = None,
) -> torch.Tensor:
    """``((D_a * D_b) * (A @ B)) (+ bias)`` in ``out_dtype``, as `fp4compile.codegen.gemm.gemm_dense` (same
    arguments: ``a16`` (M, K) row-major, ``b_kn`` the logical (K, N) operand, row-major or the ``.t()`` of a
    row-major (N, K)), launched through `traceable`: inside a ``triton_op`` body the launch is traced into the
    graph. TMA needs 16-byte aligned bases and row strides (fp16: K and N multiples of 8)."""
    m, k = a16.shape
    if b_kn.shape[0] != k:
        raise ValueError(f"gemm_dense_device: K differs: a {tuple(a16.shape)}, b {tuple(b_kn.shape)}")
    n = b_kn.shape[1]
    out = torch.empty((m, n), dtype=out_dtype, device=a16.device)
    if m == 0 or n == 0:
        return out
    b_is_kn = b_kn.stride(1) == 1
    b_stored = b_kn if b_is_kn else b_kn.t()
    if a16.stride(1) != 1 or b_stored.stride(1) != 1:
        raise ValueError("gemm_dense_device: A and the stored B must be row-major")
    if num_progs is None:
        num_progs = _cuda_sm_count(a16.device.index) if a16.is_cuda and not interpreting() else 4
    if config is None:
        config = device_config(m, n, k, b_is_kn, out_dtype, num_progs)
    num_progs = min(num_progs, triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n))
    ensure_allocator()
    interpret = interpreting()
    traceable(_dense_device_kernel)[(num_progs,)](
        a16, b_stored, out, bias.contiguous() if bias is not None else out, d_a, d_b, m, n, k,
        a16.stride(0), b_stored.stride(0), out.stride(0),
        B_KN=b_is_kn, HAS_BIAS=bias is not None, FLATTEN=config.flatten, EPI_SPLIT=config.epi_split,
        NUM_PROGS=num_progs, INTERP=interpret, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, GROUP_M=config.group_m,
        **({} if interpret else dict(num_warps=config.num_warps, num_stages=config.num_stages)),
    )
    return out
