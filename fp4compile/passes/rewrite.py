"""Pass: replace every GEMM site with at least one FP4 role by a call to `fp4_linear` (or, for a mixture of
experts' GEMM on stacked weights, by one of the `fp4compile.ops.experts` calls, which run one GEMM per expert).

Reads: ``node.meta[MATCH]``, ``node.meta[SITE]``, ``node.meta[DECISIONS]``, ``node.meta[GEMM_PATHS]``,
``"example_value"``. Writes: a new ``fp4_linear`` node carrying the old node's meta plus ``node.meta[PRECISION]``
(the encoded `LinearPrecision`) and the encoded `GemmPaths` as its last argument; the old node,
and a transpose of the weight that only it used, are erased. Sites that stay high precision in all three
roles are left exactly as the model wrote them.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from ..ops.experts import fp4_expert_bmm, fp4_expert_gather, fp4_expert_grouped_mm
from ..ops.linear import fp4_linear
from ..policy.precision import LinearPrecision, Role
from .choose_gemm_paths import GemmPaths
from .find_gemms import ExpertGemmMatch
from .meta import DECISIONS, GEMM_PATHS, MATCH, PRECISION, SITE
from .subgraphs import all_graph_modules

__all__ = ["rewrite_gemms"]


def rewrite_gemms(gm: fx.GraphModule) -> fx.GraphModule:
    for graph_module in all_graph_modules(gm):
        _rewrite(graph_module)
    return gm


def _rewrite(gm: fx.GraphModule) -> None:
    graph = gm.graph
    # A site's match was taken before the rewrite: its input may be an earlier site's node, replaced by then.
    replaced: dict[fx.Node, fx.Node] = {}
    for node in list(graph.nodes):
        decisions = node.meta.get(DECISIONS)
        if decisions is None or all(d.precision.is_high for d in decisions.values()):
            continue
        match = node.meta[MATCH]
        precision = LinearPrecision(*(decisions[r].precision for r in Role))
        out = node.meta.get("example_value", node.meta.get("val"))
        out_dtype = out.dtype if isinstance(out, torch.Tensor) else torch.float32
        site = node.meta[SITE].module
        paths = node.meta.get(GEMM_PATHS, GemmPaths()).encode()
        with graph.inserting_before(node):
            # An input that an earlier site produced is that site's rewritten node by now.
            match = dataclasses.replace(match, x=replaced.get(match.x, match.x))
            if isinstance(match, ExpertGemmMatch):
                new = _expert_call(graph, match, precision.encode(), out_dtype, site, paths)
            else:
                weight = match.weight
                if match.weight_is_kn:
                    weight = graph.call_function(torch.t, (match.weight,))
                new = graph.call_function(fp4_linear, (match.x, weight, match.bias, precision.encode(), out_dtype,
                                                       site, paths))
        new.meta = dict(node.meta)
        new.meta[PRECISION] = precision.encode()
        old_inputs = list(node.all_input_nodes)
        node.replace_all_uses_with(new)
        replaced[node] = new
        graph.erase_node(node)
        for old in old_inputs:
            if old.op in ("call_function", "call_method") and not old.users:
                graph.erase_node(old)
    gm.recompile()


def _expert_call(graph: fx.Graph, match: ExpertGemmMatch, precision: str, out_dtype: torch.dtype, site: str,
                 paths: str) -> fx.Node:
    """The call that replaces an expert GEMM node, with the node's output shape."""
    if match.kind == "grouped":  # the weight argument is (E, K, N)
        weight = match.weight if match.weight_is_kn else graph.call_function(torch.transpose, (match.weight, -2, -1))
        return graph.call_function(fp4_expert_grouped_mm, (match.x, weight, match.routing, precision, out_dtype, site,
                                                           paths))
    if match.kind == "bmm":
        weight = match.weight if match.weight_is_kn else graph.call_function(torch.transpose, (match.weight, -2, -1))
        return graph.call_function(fp4_expert_bmm, (match.x, weight, precision, out_dtype, site, paths))
    y = graph.call_function(fp4_expert_gather, (match.x, match.weight, match.routing, precision, out_dtype, site,
                                                paths, match.weight_is_kn))
    # bmm(W[ids], x.unsqueeze(-1)) is (S, N, 1); bmm(x.unsqueeze(1), W[ids]) is (S, 1, N).
    return graph.call_function(torch.unsqueeze, (y, 1 if match.weight_is_kn else -1))
