"""What tracing the quantize ``triton_op`` costs at compile time: Triton IR generations and seconds, with and
without the memoized access analysis (`fp4compile.ops.triton_ops._memoize_access_analysis`).

    python benchmarks/trace_cost.py            # both, each in a fresh process

AOTAutograd traces 36 quantizations (12 layers of GPT-2-small shapes, 8192 x 768 bfloat16, three operand
precisions) on fake CUDA tensors, so it runs on a machine without a GPU: the Triton target is set to sm_90 by
hand. It counts the calls of torch's ``generate_ttir`` during the trace (Inductor's lowering, which repeats the
analysis, is not part of it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def _trace(memoized: bool) -> None:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    class Sm90Target:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    triton.runtime.driver.set_active(Sm90Target())
    import fp4compile.codegen.quantize as cq
    from fp4compile.ops import triton_ops  # noqa: F401  (registers the ops, memoizes the analysis)
    from torch._functorch.aot_autograd import aot_function
    from torch._higher_order_ops import triton_kernel_wrap
    from torch._subclasses.fake_tensor import FakeTensorMode

    cq._cuda_sm_count = lambda index: 132  # no device to ask
    for name in ("identify_accessed_tensors", "identify_mutated_tensors"):
        analysis = getattr(triton_kernel_wrap, name, None)
        if analysis is not None and not memoized and hasattr(analysis, "__wrapped__"):
            setattr(triton_kernel_wrap, name, analysis.__wrapped__)
    generations = [0]
    generate = triton_kernel_wrap.generate_ttir

    def counting(*args, **kwargs):
        generations[0] += 1
        return generate(*args, **kwargs)

    triton_kernel_wrap.generate_ttir = counting
    operands = ("nvfp4|1x16|nearest|-", "nvfp4|1x16|stochastic|-", "nvfp4|1x16|stochastic|rht")

    def step(*args):
        *xs, seed = args
        return [torch.ops.fp4compile.quantize_triton(x, op, seed, True)[0] for x in xs for op in operands]

    with FakeTensorMode(allow_non_fake_inputs=True):
        xs = [torch.empty(8192, 768, device="cuda", dtype=torch.bfloat16) for _ in range(12)]
        seed = torch.empty((), dtype=torch.int64, device="cuda")
        start = time.perf_counter()
        aot_function(step, fw_compiler=lambda gm, _: gm)(*xs, seed)
        seconds = time.perf_counter() - start
    print(f"memoized={memoized}: 36 quantizations traced, {generations[0]} Triton IR generations, {seconds:.1f} s")


def main() -> None:
    if len(sys.argv) > 1:
        _trace(sys.argv[1] == "on")
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for flag in ("off", "on"):
        subprocess.run([sys.executable, __file__, flag], env=env, check=True)


if __name__ == "__main__":
    main()
