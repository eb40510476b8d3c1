"""Inner compilers: what compiles a rewritten graph (forward and backward) once the FP4 GEMMs are ops.

- ``inductor``: ``compile_fx`` runs AOTAutograd (joint graph, min-cut partition) and Inductor on the rest;
  the fp4compile ops stay opaque custom ops that Inductor fuses around.
- ``aot_eager``: AOTAutograd with no code generation: cheap, for tests of the captured graphs.
- ``eager``: run the rewritten graph as Python (autograd through `Fp4LinearFunction`): cheapest.

Each records the code of the forward and backward graphs AOTAutograd produced, for ``fp4compile dump``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch.fx as fx

__all__ = ["INNER_COMPILERS", "compile_inner"]

INNER_COMPILERS = ("inductor", "aot_eager", "eager")


def _label(kwargs: dict) -> str:
    if kwargs.get("is_backward"):
        return "backward"
    return "inference" if kwargs.get("is_inference") else "forward"


def compile_inner(gm: fx.GraphModule, example_inputs: Sequence[Any], inner: str,
                  record: Callable[[str, fx.GraphModule], None], cudagraphs: bool = False) -> Callable:
    """Compile ``gm`` with the inner compiler ``inner``; ``record(label, graph)`` sees each AOT graph.
    ``cudagraphs``: Inductor captures each compiled graph in CUDA graphs (cudagraph trees), removing the host
    overhead of launching the FP4 ops' kernels one by one."""
    if inner == "eager":
        record("forward", gm)
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.common import aot_autograd

        def recording(label: str):
            def compiler(graph: fx.GraphModule, inputs):
                record(label, graph)

                def run(args):  # AOTAutograd's boxed calling convention: one list of arguments
                    return graph(*args)

                run._boxed_call = True
                return run

            return compiler

        return aot_autograd(
            fw_compiler=recording("forward"), bw_compiler=recording("backward"), inference_compiler=recording("inference")
        )(gm, example_inputs)
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        def recording_inner(graph: fx.GraphModule, inputs, **kwargs):
            record(_label(kwargs), graph)
            return compile_fx_inner(graph, inputs, **kwargs)

        patches = {"triton.cudagraphs": True} if cudagraphs else None
        return compile_fx(gm, example_inputs, inner_compile=recording_inner, config_patches=patches)
    raise ValueError(f"inner compiler must be one of {INNER_COMPILERS}, got {inner!r}")
