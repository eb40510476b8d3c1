"""Pass: choose how each FP4 GEMM of each site runs (its GEMM path), once, at compile time.

Reads: ``node.meta[SITE]`` (role shapes), ``node.meta[DECISIONS]`` and ``"example_value"`` (the device).
Writes: ``node.meta[GEMM_PATHS]``, a `GemmPaths` (one path per role). `rewrite_gemms` hands it to
``fp4_linear``, which runs each GEMM on its path without deciding anything per call; the precision table and
the dump show it (column ``gemm path``).

Paths (`PATHS`):
- ``graph_mm``: the product of the two exact fp16 operands written as graph ops, ``mm`` with an FP32 result,
  ``* alpha``, ``+ bias``, the cast (`fp4compile.ops.linear`): Inductor launches cuBLAS and fuses the epilogue
  into its next kernel, so nothing runs Python per call.
- ``triton_dequant``: the ``fp4compile::gemm`` op runs the persistent TMA GEMM with the epilogue fused and a
  bf16 result (`fp4compile.codegen.gemm.gemm_dense`). Its host descriptors cannot be traced into Inductor's code
  (``wrap_triton`` takes no host TMA descriptors outside Dynamo in torch 2.11-2.13), so the op costs Python per
  call; it is chosen only where CUDA graphs replay the step (no host cost) and `choose_gemm_path` picks it for
  the shape (K no longer than both output sides: forward and input-gradient GEMMs).
- ``triton_traced``: the same TMA GEMM with its descriptors made on the device
  (`fp4compile.codegen.gemm_device_tma`), as the ``triton_op`` ``fp4compile::gemm_dense_traced``: traced into the
  graph, launched by Inductor's code, so it costs no Python per call and is taken without CUDA graphs, for the
  shapes `choose_gemm_path` gives ``triton_dequant``, where `traced_gemm_available` says the running torch and
  Triton can launch it (``FP4COMPILE_TRACED_GEMM`` forces it on or off).
- ``native_fp4``: FP4 tensor cores (compute capability 10.x), on the op.
- ``reference``: the op's reference GEMM: CPU tensors, and scale formats other than E4M3.
- ``high``: the role is not quantized.
- ``cublas_dequant``: the op's cuBLAS GEMM on the exact operands, with its epilogue as a separate pass; only
  where ``FP4COMPILE_GEMM_IN_GRAPH=0`` turns ``graph_mm`` off and `choose_gemm_path` picks cuBLAS.

``FP4COMPILE_GEMM_IN_GRAPH`` (`fp4compile.env`) forces ``graph_mm`` on (``1``) or off (``0``: the op, on the
path `choose_gemm_path` picks), for A/B measurements. ``graph_mm`` needs the exact operands written by the
Triton kernels: for the weight gradient (whose x^T is saved packed and dequantized by a traced kernel) it is
taken on CUDA only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import torch
import torch.fx as fx

from .. import env
from ..policy.precision import GemmPrecision, Role
from .meta import DECISIONS, GEMM_PATHS, SITE
from .subgraphs import all_graph_modules

__all__ = ["GemmPaths", "PATHS", "choose_gemm_paths", "gemm_path"]

PATHS = ("graph_mm", "triton_dequant", "triton_traced", "native_fp4", "reference", "high", "cublas_dequant")


@dataclasses.dataclass(frozen=True)
class GemmPaths:
    """The GEMM path of each role of one site (`PATHS`)."""

    forward: str = "reference"
    input_grad: str = "reference"
    weight_grad: str = "reference"

    def for_role(self, role: Role) -> str:
        return getattr(self, role.value)

    def encode(self) -> str:
        """``forward=...;input_grad=...;weight_grad=...``: an FX-printable ``fp4_linear`` argument."""
        return ";".join(f"{r.value}={self.for_role(r)}" for r in Role)

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def decode(text: str) -> "GemmPaths":
        """Inverse of `encode`; the empty string gives the default (`reference` everywhere)."""
        if not text:
            return GemmPaths()
        try:
            parts = dict(item.split("=", 1) for item in text.split(";"))
            paths = GemmPaths(*(parts[r.value] for r in Role))
        except (KeyError, ValueError, TypeError):
            raise ValueError(f"malformed GEMM paths {text!r}: expected 'forward=P;input_grad=P;weight_grad=P'") from None
        bad = [p for p in (paths.forward, paths.input_grad, paths.weight_grad) if p not in PATHS]
        if bad:
            raise ValueError(f"unknown GEMM path(s) {bad} in {text!r}; expected some of {PATHS}")
        return paths


def gemm_path(precision: GemmPrecision, role: Role, shape: tuple[Optional[int], Optional[int], Optional[int]],
              device: torch.device, cudagraphs: bool) -> str:
    """The path of one GEMM: ``precision`` in ``role``, ``shape`` its ``(M, N, K)`` (None where symbolic), on
    ``device``, in a step that CUDA graphs replay when ``cudagraphs``. A pure function of its arguments, the
    machine's capabilities and ``FP4COMPILE_GEMM_IN_GRAPH``."""
    if precision.is_high:
        return "high"
    from ..codegen import triton_available

    forced = env.gemm_in_graph()
    e4m3 = precision.lhs.format.scale_format.name == "e4m3" and precision.rhs.format.scale_format.name == "e4m3"
    on_triton = device.type == "cuda" and triton_available()
    if not e4m3:
        return "reference"
    if not on_triton:
        # CPU: the op's reference GEMM; the forced graph form where both exact operands exist (the reference
        # quantizer writes them too), i.e. not for the weight gradient, whose x^T is saved packed.
        return "graph_mm" if forced and role is not Role.WEIGHT_GRAD else "reference"
    from ..codegen.gemm import choose_gemm_path, native_fp4_available

    if native_fp4_available(device.index or 0):
        return "native_fp4"
    if forced is not None:
        m, n, k = (v if v is not None else 8192 for v in shape)
        return "graph_mm" if forced else choose_gemm_path(m, n, k, precision.lhs.format, device)
    if None in shape or choose_gemm_path(*shape, precision.lhs.format, device) != "triton_dequant":
        return "graph_mm"
    if cudagraphs:
        return "triton_dequant"
    from ..codegen.gemm_device_tma import traced_gemm_available

    m, n, k = shape
    # Device descriptors need 16-byte rows: K and N whole multiples of 8 fp16 (and of 8 bf16 outputs).
    if traced_gemm_available(device) and n % 8 == 0 and k % 8 == 0:
        return "triton_traced"
    return "graph_mm"


def _int_or_none(size: str) -> Optional[int]:
    factors = size.split("*")
    return math.prod(int(f) for f in factors) if all(f.isdigit() for f in factors) else None


def _device_of(node: fx.Node) -> torch.device:
    value = node.meta.get("example_value", node.meta.get("val"))
    return value.device if isinstance(value, torch.Tensor) else torch.device("cpu")


def choose_gemm_paths(gm: fx.GraphModule, cudagraphs: bool = False) -> fx.GraphModule:
    """Write `GemmPaths` on every GEMM site that has at least one FP4 role (``cudagraphs``: the compiled step
    is replayed as CUDA graphs)."""
    for graph_module in all_graph_modules(gm):
        for node in graph_module.graph.nodes:
            decisions = node.meta.get(DECISIONS)
            site = node.meta.get(SITE)
            if decisions is None or site is None or all(d.precision.is_high for d in decisions.values()):
                continue
            device = _device_of(node)
            paths = {
                role: gemm_path(decisions[role].precision, role,
                                tuple(_int_or_none(s) for s in site.role_shape(role.value)), device, cudagraphs)
                for role in Role
            }
            node.meta[GEMM_PATHS] = GemmPaths(*(paths[r] for r in Role))
    return gm
