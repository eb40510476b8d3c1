"""Pass: replace every GEMM site with at least one FP4 role by a call to `fp4_linear`.

Reads: ``node.meta[MATCH]``, ``node.meta[SITE]``, ``node.meta[DECISIONS]``, ``node.meta[GEMM_PATHS]``,
``"example_value"``. Writes: a new ``fp4_linear`` node carrying the old node's meta plus ``node.meta[PRECISION]``
(the encoded `LinearPrecision`) and the encoded `GemmPaths` as its last argument; the old node,
and a transpose of the weight that only it used, are erased. Sites that stay high precision in all three
roles are left exactly as the model wrote them.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..ops.linear import fp4_linear
from ..policy.precision import LinearPrecision, Role
from .choose_gemm_paths import GemmPaths
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
        with graph.inserting_before(node):
            weight = match.weight
            if match.weight_is_kn:
                weight = graph.call_function(torch.t, (match.weight,))
            site = node.meta[SITE].module
            paths = node.meta.get(GEMM_PATHS, GemmPaths()).encode()
            x = replaced.get(match.x, match.x)
            new = graph.call_function(fp4_linear, (x, weight, match.bias, precision.encode(), out_dtype, site, paths))
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
