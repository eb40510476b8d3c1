"""The precision table: one row per GEMM site and role, with the precision, the GEMM path and the reason."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable, Optional

import torch.fx as fx

from ..passes.meta import DECISIONS, GEMM_PATHS, MODULE, SITE, UNSUPPORTED
from ..passes.find_gemms import module_path
from ..passes.subgraphs import all_graph_modules
from ..policy.precision import Role

__all__ = ["TableRow", "precision_table", "rows_to_json", "rows_to_markdown", "graph_label"]


@dataclasses.dataclass(frozen=True)
class TableRow:
    """One GEMM in one role. ``shape`` is ``(M, N, K)`` of that GEMM (``M`` may be symbolic); ``gemm_path``
    how it runs (`fp4compile.passes.choose_gemm_paths`; ``high`` for a high-precision role). ``training`` is
    False for a graph compiled with gradients off (an evaluation under ``torch.no_grad()``), which runs the
    forward GEMM only and has no backward rows. ``experts``: for a mixture of experts' GEMM on stacked weights,
    how many experts run it, each as its own GEMM (one row covers them all; 0 otherwise)."""

    graph: str
    module: str
    role: str
    precision: str
    reason: str
    shape: tuple[str, str, str]
    lhs: str
    rhs: str
    layer: Optional[int]
    weight: str
    node: str
    dtype: str
    gemm_path: str = "high"
    training: bool = True
    experts: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d


def precision_table(annotated: fx.GraphModule, graph: str = "", training: bool = True) -> list[TableRow]:
    """Rows for every weight GEMM of a graph annotated by the pass pipeline, including those left in high
    precision because they could not be rewritten: three roles per site, or only the forward where the graph
    was compiled without gradients (``training=False``)."""
    rows: list[TableRow] = []
    roles = list(Role) if training else [Role.FORWARD]
    for node in (n for g in all_graph_modules(annotated) for n in g.graph.nodes):
        site = node.meta.get(SITE)
        decisions = node.meta.get(DECISIONS)
        paths = node.meta.get(GEMM_PATHS)
        if site is not None and decisions is not None:
            for role in roles:
                p = decisions[role].precision
                path = "high" if p.is_high or paths is None else paths.for_role(role)
                rows.append(TableRow(
                    graph, site.module, role.value, p.precision, decisions[role].reason, site.role_shape(role.value),
                    "high" if p.is_high else p.lhs.describe(), "high" if p.is_high else p.rhs.describe(),
                    site.layer_index, site.weight, site.node, site.dtype, path, training, site.experts,
                ))
        elif UNSUPPORTED in node.meta:
            stack = node.meta.get("nn_module_stack") or {}
            module = node.meta.get(MODULE, module_path(list(stack.values())[-1][0]) if stack else "")
            for role in roles:
                rows.append(TableRow(graph, module, role.value, "high", f"fallback: {node.meta[UNSUPPORTED]}",
                                     ("?", "?", "?"), "high", "high", None, "", node.name, "", "high", training))
    return rows


def rows_to_json(rows: Iterable[TableRow]) -> str:
    return json.dumps([r.to_dict() for r in rows], indent=1)


def graph_label(row: "TableRow | dict[str, Any]") -> str:
    """The graph of a row as the tables show it: ``graph_1 (no grad)`` for a graph compiled without gradients."""
    d = row.to_dict() if isinstance(row, TableRow) else row
    return f"{d.get('graph', '')}{'' if d.get('training', True) else ' (no grad)'}"


def module_label(row: TableRow) -> str:
    """The module cell of a row: the module path, and for an expert GEMM its stacked weight and expert count
    (``model.layers.1.mlp.experts: gate_up_proj, 8 experts``), which tell its two GEMMs apart."""
    if not row.experts:
        return row.module
    return f"{row.module}: {row.weight.rpartition('.')[2]}, {row.experts} experts"


def rows_to_markdown(rows: Iterable[TableRow]) -> str:
    header = ("| graph | module | role | precision | lhs | rhs | M x N x K | gemm path | reason |\n"
              "|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {graph_label(r)} | {module_label(r)} | {r.role} | {r.precision} | {r.lhs} | {r.rhs} | {' x '.join(r.shape)} "
        f"| {r.gemm_path} "
        f"| {r.reason} |\n"
        for r in rows
    )
    return header + body
