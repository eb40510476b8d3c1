"""The dump folder's layout (file names) and reading a dump back: what ``show``, ``diff`` and the report use."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Any, Optional

from .numerics import OperandNumerics, numerics_from_json

__all__ = ["TABLE_JSON", "TABLE_MD", "NUMERICS", "REPORT", "MANIFEST", "ONNX_MODEL", "SENSITIVITY", "SENSITIVITY_HTML",
           "DumpData", "GraphCode", "load_dump"]

TABLE_JSON, TABLE_MD = "precision_table.json", "precision_table.md"
NUMERICS, REPORT, MANIFEST, ONNX_MODEL = "numerics.json", "report.html", "dump.json", "model.onnx"
#: Written by `fp4compile.sensitivity` beside a dump's files (fp4compile/inspect/sensitivity.py).
SENSITIVITY, SENSITIVITY_HTML = "sensitivity.json", "sensitivity.html"

_PASS_FILE = re.compile(r"pass_(\d+)_(\w+)\.py$")


@dataclasses.dataclass
class GraphCode:
    """The code files of one graph in one schedule phase: ``passes`` in order (name, code), ``aot`` by label."""

    graph: str
    phase: str
    passes: list[tuple[str, str]]
    aot: dict[str, str]

    @property
    def rewritten(self) -> Optional[str]:
        """The code after the last pass (the rewritten graph), if any pass was dumped."""
        return self.passes[-1][1] if self.passes else None


@dataclasses.dataclass
class DumpData:
    """A dump folder read back: rows are the dictionaries of ``precision_table.json``."""

    path: str
    rows: list[dict[str, Any]]
    numerics: list[OperandNumerics]
    manifest: dict[str, Any]
    graphs: list[GraphCode]

    def numerics_by_label(self) -> dict[str, OperandNumerics]:
        return {n.label: n for n in self.numerics}


def _graph_sort_key(path: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path))


def load_dump(path: "str | os.PathLike") -> DumpData:
    """Read a dump folder written by `fp4compile.dump` or ``FP4COMPILE_DUMP``.

    Raises:
        FileNotFoundError: ``path`` is not a dump (no ``precision_table.json``).
        ValueError: a file is not in the expected format.
    """
    path = os.fspath(path)
    table = os.path.join(path, TABLE_JSON)
    if not os.path.isfile(table):
        raise FileNotFoundError(f"{path!r} is not an fp4compile dump: expected {TABLE_JSON} in it")
    with open(table) as f:
        rows = json.load(f)
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "module" in r and "role" in r for r in rows):
        raise ValueError(f"{table}: expected a list of rows with 'module' and 'role' keys")
    numerics: list[OperandNumerics] = []
    if os.path.isfile(os.path.join(path, NUMERICS)):
        with open(os.path.join(path, NUMERICS)) as f:
            numerics = numerics_from_json(f.read())
    manifest: dict[str, Any] = {}
    if os.path.isfile(os.path.join(path, MANIFEST)):
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    graphs = []
    for folder in sorted(glob.glob(os.path.join(path, "graph_*", "*")), key=_graph_sort_key):
        if not os.path.isdir(folder):
            continue
        passes, aot = [], {}
        for file in os.listdir(folder):
            m = _PASS_FILE.match(file)
            with open(os.path.join(folder, file)) as f:
                text = f.read()
            if m:
                passes.append((int(m.group(1)), m.group(2), text))
            elif file.startswith("aot_") and file.endswith(".py"):
                aot[file[4:-3]] = text
        passes.sort()
        graphs.append(GraphCode(os.path.basename(os.path.dirname(folder)), os.path.basename(folder),
                                [(name, text) for _, name, text in passes], aot))
    return DumpData(path, rows, numerics, manifest, graphs)
