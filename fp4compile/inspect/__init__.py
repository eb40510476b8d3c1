"""Inspecting what the compiler did: the precision table, dumps, numerics, the HTML report, ONNX export,
dump diffs and the FP4 sensitivity of a model's sites. The dump-related names load lazily (they import the backend, which imports this package)."""

from __future__ import annotations

import importlib
from typing import Any

from .table import TableRow, precision_table, rows_to_json, rows_to_markdown

_LAZY = {
    "DumpResult": "dump",  # the function is fp4compile.dump (fp4compile.inspect.dump is its module)
    "OperandNumerics": "numerics", "operand_numerics": "numerics", "NumericsRecorder": "numerics",
    "render_report": "report", "write_report": "report",
    "export_onnx": "onnx_export", "run_reference": "onnx_export", "OnnxExportError": "onnx_export",
    "diff_dumps": "diff", "DumpDiff": "diff",
    "load_dump": "layout", "DumpData": "layout",
    # the function is fp4compile.sensitivity (fp4compile.inspect.sensitivity is its module)
    "SensitivityReport": "sensitivity", "Sensitivity": "sensitivity", "load_sensitivity": "sensitivity",
}

__all__ = ["TableRow", "precision_table", "rows_to_json", "rows_to_markdown", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
