"""Comparing two dumps (policy A against policy B): which GEMM decisions differ, and how the numerics moved.

Decision differences are rows of the precision table, matched by (graph, module, role), whose precision,
operand formats, shape, layer or reason differ, or that exist in one dump only; a quantized operand measured
in one dump only is also a difference. SQNR changes of operands measured in both are reported separately
(``sqnr_changes``): changing one module moves the activations and gradients of the others a little, so they
are information, not differences of what the compiler decided.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from .layout import DumpData, load_dump

__all__ = ["RowChange", "DumpDiff", "diff_dumps", "COMPARED_FIELDS"]

#: The precision-table fields whose change is a decision difference.
COMPARED_FIELDS = ("precision", "lhs", "rhs", "reason", "shape", "layer", "weight", "dtype")


@dataclasses.dataclass(frozen=True)
class RowChange:
    """One (graph, module, role) whose row differs: ``fields`` maps a field to its (A, B) values."""

    graph: str
    module: str
    role: str
    fields: dict[str, tuple[Any, Any]]


@dataclasses.dataclass
class DumpDiff:
    """The differences between dump ``a`` and dump ``b``."""

    a: str
    b: str
    changed: list[RowChange]
    only_in_a: list[dict[str, Any]]
    only_in_b: list[dict[str, Any]]
    operands_only_in_a: list[str]
    operands_only_in_b: list[str]
    sqnr_changes: list[tuple[str, Optional[float], Optional[float]]]

    @property
    def identical(self) -> bool:
        """No decision difference, no operand measured in one dump only and no SQNR change."""
        return not (self.changed or self.only_in_a or self.only_in_b or self.operands_only_in_a
                    or self.operands_only_in_b or self.sqnr_changes)

    @property
    def has_decision_differences(self) -> bool:
        return bool(self.changed or self.only_in_a or self.only_in_b or self.operands_only_in_a or self.operands_only_in_b)

    def modules(self) -> set[str]:
        """The modules with a decision difference."""
        out = {c.module for c in self.changed} | {r["module"] for r in self.only_in_a + self.only_in_b}
        out |= {label.rsplit(":", 2)[0] for label in self.operands_only_in_a + self.operands_only_in_b}
        return out


def _key(row: dict[str, Any]) -> tuple[str, str, str]:
    return (row.get("graph", ""), row["module"] or row.get("node", ""), row["role"])


def diff_dumps(a: "str | os.PathLike | DumpData", b: "str | os.PathLike | DumpData", sqnr_tolerance_db: float = 0.0) -> DumpDiff:
    """Compare two dumps (folders or `DumpData`); SQNR changes larger than ``sqnr_tolerance_db`` are listed."""
    if sqnr_tolerance_db < 0:
        raise ValueError(f"sqnr_tolerance_db must be >= 0, got {sqnr_tolerance_db}")
    da = a if isinstance(a, DumpData) else load_dump(a)
    db = b if isinstance(b, DumpData) else load_dump(b)
    rows_a = {_key(r): r for r in da.rows}
    rows_b = {_key(r): r for r in db.rows}
    changed = []
    for key in rows_a.keys() & rows_b.keys():
        ra, rb = rows_a[key], rows_b[key]
        fields = {f: (ra.get(f), rb.get(f)) for f in COMPARED_FIELDS if ra.get(f) != rb.get(f)}
        if fields:
            changed.append(RowChange(*key, fields))
    changed.sort(key=lambda c: (c.graph, c.module, c.role))
    order = {k: i for i, k in enumerate(list(rows_a) + [k for k in rows_b if k not in rows_a])}
    changed.sort(key=lambda c: order[(c.graph, c.module, c.role)])
    only_a = [rows_a[k] for k in rows_a if k not in rows_b]
    only_b = [rows_b[k] for k in rows_b if k not in rows_a]

    na, nb = da.numerics_by_label(), db.numerics_by_label()
    sqnr_changes = []
    for label in na.keys() & nb.keys():
        sa, sb = na[label].sqnr_db, nb[label].sqnr_db
        if (sa is None) != (sb is None) or (sa is not None and abs(sa - sb) > sqnr_tolerance_db):
            sqnr_changes.append((label, sa, sb))
    sqnr_changes.sort()
    return DumpDiff(da.path, db.path, changed, only_a, only_b, sorted(na.keys() - nb.keys()),
                    sorted(nb.keys() - na.keys()), sqnr_changes)
