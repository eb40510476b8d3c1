"""The precision table, as the inspect tools name it: defined in `fp4compile.capture.table`, where the backend
builds it (capture sits below inspect: it imports nothing from here)."""

from ..capture.table import TableRow, graph_label, module_label, precision_table, rows_to_json, rows_to_markdown

__all__ = ["TableRow", "precision_table", "rows_to_json", "rows_to_markdown", "graph_label", "module_label"]
