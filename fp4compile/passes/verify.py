"""The graph verifier: structural invariants that must hold after every pass (tests run it after each one).

Checks: FX's own lint (every use defined before it, one output); every `GemmSite` has its `GemmMatch`;
decisions, where present, cover the three roles with `Decision` objects; every ``fp4_linear`` call has seven
arguments, a decodable precision, a dtype, a 2D weight and decodable GEMM paths; every expert call
(`fp4compile.ops.experts`) a decodable precision and a 3-D weight.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..ops.experts import fp4_expert_bmm, fp4_expert_gather, fp4_expert_grouped_mm
from ..ops.linear import fp4_linear
from ..policy.precision import Decision, LinearPrecision, Role
from .choose_gemm_paths import GemmPaths
from .meta import DECISIONS, MATCH, PRECISION, SITE
from .subgraphs import all_graph_modules

__all__ = ["verify_graph", "GraphVerificationError"]


class GraphVerificationError(AssertionError):
    """An internal invariant of the pass pipeline does not hold (a bug in fp4compile, not user input)."""


def _fail(after: str, node: fx.Node, what: str) -> None:
    raise GraphVerificationError(f"graph invalid after pass {after!r} at node {node.name!r} ({node.format_node()}): {what}")


def verify_graph(gm: fx.GraphModule, after: str = "?") -> None:
    for graph_module in all_graph_modules(gm):
        _verify(graph_module, after)


def _verify(gm: fx.GraphModule, after: str) -> None:
    try:
        gm.graph.lint()
    except Exception as exc:  # FX raises RuntimeError for malformed graphs
        raise GraphVerificationError(f"graph invalid after pass {after!r}: {exc}") from exc
    for node in gm.graph.nodes:
        if SITE in node.meta and MATCH not in node.meta:
            _fail(after, node, "a GEMM site without its match")
        decisions = node.meta.get(DECISIONS)
        if decisions is not None:
            if set(decisions) != set(Role):
                _fail(after, node, f"decisions for roles {sorted(r.value for r in decisions)}, expected all three")
            if not all(isinstance(d, Decision) and d.reason for d in decisions.values()):
                _fail(after, node, "every decision needs a precision and a reason")
        if node.op == "call_function" and node.target is fp4_linear:
            if len(node.args) != 7:
                _fail(after, node, f"fp4_linear takes 7 arguments, got {len(node.args)}")
            x, weight, bias, precision, out_dtype, site, gemm_paths = node.args
            try:
                GemmPaths.decode(gemm_paths)
            except Exception as exc:
                _fail(after, node, f"undecodable GEMM paths {gemm_paths!r}: {exc}")
            try:
                LinearPrecision.decode(precision)
            except Exception as exc:
                _fail(after, node, f"undecodable precision {precision!r}: {exc}")
            if node.meta.get(PRECISION) != precision:
                _fail(after, node, "node.meta precision differs from the op argument")
            if not isinstance(out_dtype, torch.dtype):
                _fail(after, node, f"out_dtype must be a torch.dtype, got {out_dtype!r}")
            w_val = weight.meta.get("example_value", weight.meta.get("val")) if isinstance(weight, fx.Node) else None
            if w_val is not None and w_val.dim() != 2:
                _fail(after, node, f"weight must be 2D, got shape {tuple(w_val.shape)}")
        if node.op == "call_function" and node.target in _EXPERT_CALLS:
            _verify_expert_call(node, after)


#: The expert calls and the position of their precision argument.
_EXPERT_CALLS = {fp4_expert_grouped_mm: 3, fp4_expert_gather: 3, fp4_expert_bmm: 2}


def _verify_expert_call(node: fx.Node, after: str) -> None:
    precision = node.args[_EXPERT_CALLS[node.target]]
    try:
        LinearPrecision.decode(precision)
    except Exception as exc:
        _fail(after, node, f"undecodable precision {precision!r}: {exc}")
    weight = node.args[1]
    while isinstance(weight, fx.Node) and weight.op == "call_function" and weight.target is torch.transpose:
        weight = weight.args[0]
    w_val = weight.meta.get("example_value", weight.meta.get("val")) if isinstance(weight, fx.Node) else None
    if w_val is not None and w_val.dim() != 3:
        _fail(after, node, f"stacked expert weight must be 3-D, got shape {tuple(w_val.shape)}")
