"""Compile the Triton kernels of the Blackwell route for a GPU target without a GPU; print one JSON line each.

    python tests/compile_for_target.py [ARCH]       # ARCH: 100 (sm_100a, the default)

Run by tests/test_compile_sm100.py in a fresh process: the kernels must be imported without
``TRITON_INTERPRET`` (under it ``triton.jit`` makes interpreter functions, which do not compile).

The launches are captured from the project's own host wrappers, so the argument types, constexprs, tiles and
launch options are the ones a GPU launch passes: the wrappers run on CPU tensors that report ``is_cuda`` (a
tensor subclass), the SM count is a B200's, and ``JITFunction.run`` records each launch instead of running it.
Each distinct launch is then compiled with ``triton.compile`` for ``GPUTarget("cuda", ARCH, 32)`` down to PTX
and cubin.

The first line is the probe: a small kernel with a pointer and a tensor descriptor, compiled the same way. If it
fails, this Triton cannot compile for the target here or has another compiler API (the test skips); any later
failure is an error in a kernel of the route.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback

import torch

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

B200_SMS = 148

_TRITON_DTYPES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64",
    torch.uint8: "u8", torch.int8: "i8",
}


class CudaLooking(torch.Tensor):
    """A CPU tensor that says it is on CUDA, so the host wrappers pick their GPU tiles and launch paths."""

    @property
    def is_cuda(self) -> bool:
        return True


def cuda_looking(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype).as_subclass(CudaLooking)


def _type_of(value) -> str:
    from triton.tools.tensor_descriptor import TensorDescriptor

    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_DTYPES[value.dtype]
    if isinstance(value, TensorDescriptor):
        return f"tensordesc<{_TRITON_DTYPES[value.base.dtype]}{list(value.block_shape)}>"
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a launch argument of type {type(value).__name__}")


class Launch:
    """One recorded launch: the kernel, its signature and constexprs, and its launch options."""

    def __init__(self, fn: JITFunction, args: tuple, kwargs: dict) -> None:
        self.fn = fn
        names = [p.name for p in fn.params]
        values = dict(zip(names, args))
        values.update({k: v for k, v in kwargs.items() if k in names})
        self.options = {k: v for k, v in kwargs.items() if k not in names}
        self.signature, self.constexprs = {}, {}
        for p in fn.params:
            value = values[p.name] if p.name in values else p.default
            if p.is_constexpr:
                self.signature[p.name] = "constexpr"
                self.constexprs[p.name] = value
            else:
                self.signature[p.name] = _type_of(value)

    def key(self) -> str:
        return json.dumps([self.fn.__name__, self.signature, self.constexprs, self.options], sort_keys=True,
                          default=str)

    def compile(self, target: GPUTarget):
        src = ASTSource(fn=self.fn, signature=self.signature, constexprs=self.constexprs)
        return triton.compile(src, target=target, options=self.options)


def record_launches(run_wrappers) -> list[Launch]:
    """Call ``run_wrappers()`` with every Triton launch recorded instead of run."""
    launches: list[Launch] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    JITFunction.run = record
    try:
        run_wrappers()
    finally:
        JITFunction.run = original
    return launches


def blackwell_route() -> None:
    """The host calls of one NV-recipe training step on compute capability 10.x, at GPT-2-small shapes.

    `choose_gemm_path` picks ``native_fp4`` there (``torch._scaled_mm``: cuBLAS, no Triton), which falls back to
    ``triton_dequant``, i.e. `gemm_dense` on the TMA kernel (`dense_tma_supported` holds from sm_90 on); the
    quantize, amax and dequantize kernels run as on Hopper.
    """
    from fp4compile.codegen import gemm as cg
    from fp4compile.codegen import quantize as cq
    from fp4compile.numerics.formats import MXFP4, NVFP4, Rounding

    cq._cuda_sm_count = cg._cuda_sm_count = lambda index=None: B200_SMS
    tokens, d, hidden = 8192, 768, 3072
    x = cuda_looking((tokens, d), torch.bfloat16)
    w = cuda_looking((hidden, d), torch.bfloat16)
    seed = cuda_looking((), torch.int64)
    f16 = torch.float16
    # Forward x, 2D weight, stochastic dy with its key in device memory, the weight-gradient operands through
    # the RHT read column-wise (one amax pass for both of an activation's amaxes), an MXFP4 operand.
    cq.quantize_triton(x, NVFP4, (1, 16), Rounding.NEAREST, dequantized_dtype=f16)
    cq.quantize_triton(w, NVFP4, (16, 16), Rounding.NEAREST, dequantized_dtype=f16)
    cq.quantize_triton(x, NVFP4, (1, 16), Rounding.STOCHASTIC, seed, dequantized_dtype=f16)
    amaxes = cq.tensor_amaxes_triton(x.t(), hadamard=True)
    cq.quantize_triton(x.t(), NVFP4, (1, 16), Rounding.NEAREST, 0, 0, True, dequantized_dtype=f16, amax=amaxes[0])
    cq.quantize_triton(x.t(), NVFP4, (1, 16), Rounding.STOCHASTIC, seed, 0, True, dequantized_dtype=f16)
    cq.quantize_triton(x, MXFP4, (1, 32), Rounding.NEAREST)
    qt = cq.quantize_triton(x, NVFP4, (1, 16), Rounding.NEAREST)
    cq.dequantize_unscaled_triton(dataclasses.replace(qt, qdata=qt.qdata.as_subclass(CudaLooking)), f16)
    # The TMA GEMM in the training layouts: forward (W stored (N, K)), input gradient (W read as (K, N)), and the
    # weight gradients with their cut schedules ("split", "headtail"), bf16 and float32 outputs, with bias.
    one = cuda_looking((), torch.float32)
    bias = cuda_looking((hidden,), torch.bfloat16)
    a = cuda_looking((tokens, d), f16)
    w16 = cuda_looking((hidden, d), f16)
    cg.gemm_dense(a, w16.t(), one, one, bias, torch.bfloat16, _force_tma=True, _num_progs=B200_SMS)
    cg.gemm_dense(cuda_looking((tokens, hidden), f16), w16, one, one, None, torch.bfloat16, _force_tma=True,
                  _num_progs=B200_SMS)
    for m, n in ((d, d), (hidden, d)):
        cg.gemm_dense(cuda_looking((m, tokens), f16), cuda_looking((n, tokens), f16).t(), one, one, None,
                      torch.float32, _force_tma=True, _num_progs=B200_SMS)


@triton.jit
def _probe_kernel(x_ptr, desc, n, BLOCK: tl.constexpr):
    """A pointer load and store and a tensor-descriptor (TMA) load and store: the compiler API the route needs."""
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)
    desc.store([0, 0], desc.load([0, 0]) + 1)


def _probe(target: GPUTarget) -> dict:
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor

        tile = torch.empty((16, 16), dtype=torch.float16)
        desc = TensorDescriptor(tile, [16, 16], [16, 1], [16, 16])
        launch = record_launches(lambda: _probe_kernel[(1,)](torch.empty(16), desc, 16, BLOCK=16))[0]
    except Exception as exc:
        return dict(kernel="probe", ok=False, error=f"{type(exc).__name__}: {exc}")
    return _result("probe", launch, target)


def _result(name: str, launch: Launch, target: GPUTarget) -> dict:
    row = dict(kernel=name, constexprs={k: str(v) for k, v in launch.constexprs.items()}, options=launch.options)
    try:
        compiled = launch.compile(target)
        row.update(ok=True, ptx_target=f"sm_{target.arch}a" in compiled.asm["ptx"],
                   cubin_bytes=len(compiled.asm["cubin"]))
    except Exception as exc:  # report every kernel, not just the first failure
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[-2000:], trace=traceback.format_exc()[-3000:])
    return row


def main(arch: int = 100) -> None:
    target = GPUTarget("cuda", arch, 32)
    probe = _probe(target)
    print(json.dumps(dict(probe, triton=triton.__version__)), flush=True)
    if not probe["ok"]:
        return
    seen = set()
    for launch in record_launches(blackwell_route):
        if launch.key() not in seen:
            seen.add(launch.key())
            print(json.dumps(_result(launch.fn.__name__, launch, target)), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
