"""`GemmSite`: what the compiler knows about one GEMM with a weight operand, as a policy sees it."""

from __future__ import annotations

import dataclasses
from typing import Optional

__all__ = ["GemmSite"]


@dataclasses.dataclass(frozen=True)
class GemmSite:
    """One weight GEMM ``y = x W^T`` of a captured graph.

    Attributes:
        node: the FX node name of the GEMM in the Dynamo graph (e.g. ``linear_3``).
        module: the module path of the call (e.g. ``transformer.h.3.mlp.c_fc``); for a call made outside any
            submodule, the path of the module that owns the weight.
        weight: the weight's parameter name (e.g. ``transformer.h.3.mlp.c_fc.weight``).
        spelling: how the model wrote it: ``linear``, ``addmm``, ``matmul``, ``mm``.
        in_features, out_features: ``K`` and ``N``.
        input_shape: the activation's shape as strings (symbolic sizes like ``s0`` under dynamic shapes).
        dtype: the activation dtype, e.g. ``torch.bfloat16``.
        stack: the module path of the block stack that holds the site (``transformer.h``, ``encoder.block``;
            ``(root)`` for the root of an ``nn.Sequential``), or None outside any stack.
        layer_index: the index of the block of ``stack`` that holds the site, or None.
        first_layer, last_layer: the smallest and largest block index of that stack, or None.
        is_output_head: the site runs after the last block stack of the forward graph (the prediction head).
        trainable: whether the weight requires a gradient (otherwise the weight-gradient GEMM never runs).
        position: the site's order in the graph.
        experts: for a mixture of experts' GEMM on stacked weights ``(experts, N, K)``, the number of experts
            (each runs its own GEMMs with its own tensor scales); 0 for an ordinary weight GEMM.
    """

    node: str
    module: str
    weight: str
    spelling: str
    in_features: int
    out_features: int
    input_shape: tuple[str, ...]
    dtype: str
    layer_index: Optional[int] = None
    first_layer: Optional[int] = None
    last_layer: Optional[int] = None
    is_output_head: bool = False
    trainable: bool = True
    position: int = 0
    stack: Optional[str] = None
    experts: int = 0

    def role_shape(self, role: str) -> tuple[str, str, str]:
        """``(M, N, K)`` of the GEMM in ``role`` (as strings; tokens may be symbolic)."""
        tokens = "*".join(self.input_shape[:-1]) or "1"
        k, n = str(self.in_features), str(self.out_features)
        return {"forward": (tokens, n, k), "input_grad": (tokens, k, n), "weight_grad": (n, k, tokens)}[role]
