"""Inspecting what the compiler did: the precision table, dumps and ONNX export."""

from .table import TableRow, precision_table, rows_to_json, rows_to_markdown

__all__ = ["TableRow", "precision_table", "rows_to_json", "rows_to_markdown"]
