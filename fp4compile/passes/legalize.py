"""Pass: turn decisions the hardware path cannot honour into high precision, with the reason.

Reads: ``node.meta[SITE]``, ``node.meta[DECISIONS]``. Writes: ``node.meta[DECISIONS]``.

Rules (every operand blocks along its GEMM's reduction axis, docs/numerics.md section 3.6):
- activations and gradients take 1D blocks (their row count is the token count, which varies);
- weights may take square 2D tiles, which need both weight dimensions divisible by the tile;
- the forward reduces over K, the input gradient over N: each must be divisible by the block size (and by
  16 where the Hadamard transform runs along it);
- the weight gradient reduces over tokens: the op zero-pads the token count at run time, so any count works;
- only float32, bfloat16 and float16 activations are quantized.
"""

from __future__ import annotations

from typing import Optional

import torch.fx as fx

from ..numerics.hadamard import HADAMARD_SIZE
from ..policy.precision import HIGH, Decision, GemmPrecision, OperandPrecision, Role
from ..policy.site import GemmSite
from .subgraphs import all_graph_modules
from .meta import DECISIONS, SITE

__all__ = ["legalize_precision", "illegal_reason"]

_FLOAT_DTYPES = ("torch.float32", "torch.bfloat16", "torch.float16")


def _operand_reason(name: str, op: OperandPrecision, reduction: int, other: Optional[int], is_weight: bool) -> Optional[str]:
    rows, cols = op.block
    if rows > 1 and not is_weight:
        return f"{name}: {rows}x{cols} blocks need a fixed row count; activations and gradients take 1x{cols}"
    if reduction % cols:
        return f"{name}: reduction size {reduction} is not divisible by the block size {cols}"
    if rows > 1 and other is not None and other % rows:
        return f"{name}: weight dimension {other} is not divisible by the {rows}x{cols} tile"
    if op.hadamard and reduction % HADAMARD_SIZE:
        return f"{name}: the Hadamard transform needs the reduction size {reduction} divisible by {HADAMARD_SIZE}"
    return None


def illegal_reason(site: GemmSite, role: Role, precision: GemmPrecision) -> Optional[str]:
    """Why ``precision`` cannot run for ``site`` in ``role``, or None if it can."""
    if precision.is_high:
        return None
    if site.dtype not in _FLOAT_DTYPES:
        return f"activation dtype {site.dtype} is not quantized (float32, bfloat16 and float16 are)"
    k, n = site.in_features, site.out_features
    if role is Role.FORWARD:
        checks = [("x", precision.lhs, k, None, False), ("W", precision.rhs, k, n, True)]
    elif role is Role.INPUT_GRAD:
        checks = [("dy", precision.lhs, n, None, False), ("W", precision.rhs, n, k, True)]
    else:
        # Tokens are padded at run time; only the block shapes matter here.
        checks = [("dy^T", precision.lhs, 0, None, False), ("x^T", precision.rhs, 0, None, False)]
    for args in checks:
        reason = _operand_reason(*args)
        if reason:
            return reason
    return None


def legalize_precision(gm: fx.GraphModule) -> fx.GraphModule:
    for node in (n for g in all_graph_modules(gm) for n in g.graph.nodes):
        decisions = node.meta.get(DECISIONS)
        if decisions is None:
            continue
        site = node.meta[SITE]
        for role, decision in list(decisions.items()):
            reason = illegal_reason(site, role, decision.precision)
            if reason:
                decisions[role] = Decision(HIGH, f"fallback: {reason}")
    return gm
