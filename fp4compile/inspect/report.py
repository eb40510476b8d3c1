"""``report.html``: one self-contained page per dump (no server, no external JS or CSS, inline SVG only).

It shows the precision table joined with the numerics of the step, the SQNR of every quantized operand
plotted by layer index, and a drawing of each rewritten forward graph with the quantized GEMMs coloured.
The drawing is made from the dumped code of the graph after the rewrite pass (parsed with ``ast``), so any
dump folder can be rendered again: ``write_report(dir)``.
"""

from __future__ import annotations

import ast
import html
import logging
import math
import os
from typing import Any, Optional

from .layout import REPORT, DumpData, load_dump
from .table import graph_label

__all__ = ["render_report", "write_report", "graph_svg", "sqnr_plot_svg", "sensitivity_plot_svg",
           "sensitivity_section_html", "render_sensitivity_page"]

logger = logging.getLogger(__name__)

FP4_COLOR, BACKWARD_ONLY_COLOR, HIGH_GEMM_COLOR, OTHER_COLOR, INPUT_COLOR = "#2e9e5b", "#9fd9b4", "#f0a35e", "#eef1f5", "#cfe0f7"
SERIES = [("forward", "lhs", "#1f77b4"), ("forward", "rhs", "#17becf"), ("input_grad", "lhs", "#d62728"),
          ("input_grad", "rhs", "#ff9896"), ("weight_grad", "lhs", "#9467bd"), ("weight_grad", "rhs", "#c5b0d5")]
# Shape-only ops are hidden in the drawing; edges pass through them.
_HIDDEN_OPS = {"getitem", "view", "reshape", "transpose", "contiguous", "permute", "expand", "unsqueeze", "squeeze",
               "size", "flatten", "t", "float", "to", "type_as", "clone", "detach", "split", "chunk", "unflatten"}
_BINOPS = {ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.Div: "div", ast.MatMult: "matmul", ast.Pow: "pow",
           ast.FloorDiv: "floordiv", ast.Mod: "mod"}

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px;color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde2ea;padding-bottom:4px}
.meta{color:#5a6475;font-size:13px} .cards{display:flex;gap:12px;margin:14px 0}
.card{border:1px solid #dde2ea;border-radius:8px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:20px} .card span{font-size:12px;color:#5a6475}
table{border-collapse:collapse;font-size:12px;width:100%} th,td{border:1px solid #dde2ea;padding:3px 6px;text-align:left}
th{background:#f5f7fa;position:sticky;top:0} td{white-space:nowrap} td:last-child{white-space:normal} td.num{text-align:right;font-variant-numeric:tabular-nums}
.p-nvfp4,.p-fp4,.p-mxfp4{background:#d8f2e2;font-weight:600} .p-high{background:#fbe6d4}
.scroll{max-height:460px;overflow:auto;border:1px solid #dde2ea} .graph{max-height:720px;overflow:auto;border:1px solid #dde2ea}
.legend span{display:inline-block;margin-right:14px;font-size:12px} .sw{display:inline-block;width:12px;height:12px;
border:1px solid #888;margin-right:4px;vertical-align:-2px} .warn{color:#a33}
"""


def _fmt(value: Optional[float], digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


# --- SQNR by layer ---------------------------------------------------------------------------------------

def sqnr_plot_svg(data: DumpData, width: int = 860, height: int = 320) -> str:
    """An SVG scatter plot of SQNR (dB) against layer index, one colour per role and operand."""
    layer_of = {r["module"]: r.get("layer") for r in data.rows}
    points = [(layer_of.get(n.module), n) for n in data.numerics if n.sqnr_db is not None]
    points = [(layer, n) for layer, n in points if layer is not None]
    if not points:
        return '<p class="meta">No SQNR to plot: this dump has no numerics for modules with a layer index.</p>'
    layers = sorted({layer for layer, _ in points})
    values = [n.sqnr_db for _, n in points]
    lo, hi = math.floor(min(values) - 1), math.ceil(max(values) + 1)
    left, right, top, bottom = 56, 150, 14, 40
    pw, ph = width - left - right, height - top - bottom
    x_lo, x_hi = layers[0] - 0.5, layers[-1] + 0.5

    def sx(v: float) -> float:
        return left + (v - x_lo) / (x_hi - x_lo) * pw

    def sy(v: float) -> float:
        return top + (hi - v) / (hi - lo) * ph

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11" '
             f'font-family="sans-serif" role="img" aria-label="SQNR by layer">',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafbfc" stroke="#c9d0da"/>']
    step = max(1, round((hi - lo) / 6))
    for v in range(int(lo), int(hi) + 1, step):
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" stroke="#e6e9ee"/>'
                     f'<text x="{left - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v}</text>')
    for layer in layers:
        parts.append(f'<text x="{sx(layer):.1f}" y="{top + ph + 16}" text-anchor="middle">{layer}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">layer index</text>'
                 f'<text transform="translate(14 {top + ph / 2}) rotate(-90)" text-anchor="middle">SQNR (dB)</text>')
    modules = sorted({n.module for _, n in points})
    suffixes = sorted({m.split(".", 3)[-1] if m.count(".") >= 3 else m for m in modules})
    for layer, n in points:
        key = (n.role, n.operand)
        color = next((c for r, o, c in SERIES if (r, o) == key), "#444")
        suffix = n.module.split(".", 3)[-1] if n.module.count(".") >= 3 else n.module
        jitter = (suffixes.index(suffix) + 0.5) / len(suffixes) - 0.5 if suffix in suffixes else 0.0
        cx, cy = sx(layer + 0.7 * jitter), sy(n.sqnr_db)
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="{color}" fill-opacity="0.85">'
                     f'<title>{html.escape(n.label)}: {n.sqnr_db:.2f} dB</title></circle>')
    for i, (role, operand, color) in enumerate(SERIES):
        y = top + 10 + 16 * i
        parts.append(f'<circle cx="{left + pw + 14}" cy="{y}" r="4" fill="{color}"/>'
                     f'<text x="{left + pw + 22}" y="{y + 4}">{role} {operand}</text>')
    parts.append("</svg>")
    return "".join(parts)


# --- graph drawing ---------------------------------------------------------------------------------------

def _callee(value: ast.expr) -> str:
    """A short op name for the right-hand side of an FX code line."""
    if isinstance(value, ast.Call):
        func = value.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else "call"
        if name.endswith("fp4_linear"):
            return "fp4_linear"
        return name.split("_default")[0]
    if isinstance(value, ast.Subscript):
        return "getitem"
    if isinstance(value, ast.BinOp):
        return _BINOPS.get(type(value.op), "op")
    if isinstance(value, ast.UnaryOp):
        return "neg"
    if isinstance(value, ast.Name):
        return "input"
    return type(value).__name__.lower()


def _string_args(value: ast.expr) -> list[str]:
    if not isinstance(value, ast.Call):
        return []
    return [a.value for a in value.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]


def _parse_graph(code: str) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Nodes (name, op, label text) and edges of the FX code of a graph, shape-only ops removed."""
    tree = ast.parse(code)
    func = next((n for n in tree.body if isinstance(n, ast.FunctionDef)), None)
    if func is None:
        return [], []
    arguments = {a.arg for a in func.args.args}
    state = {a for a in arguments if "_parameters_" in a or "_buffers_" in a or a == "self"}
    nodes: dict[str, dict[str, Any]] = {}
    preds: dict[str, list[str]] = {}
    alias: dict[str, list[str]] = {}  # hidden name -> the visible nodes it stands for

    def sources(expr: ast.expr) -> list[str]:
        out: list[str] = []
        for n in ast.walk(expr):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
                for src in alias.get(n.id, [n.id] if n.id in nodes else []):
                    if src not in out:
                        out.append(src)
        return out

    for stmt in func.body:
        if isinstance(stmt, ast.Return):
            nodes["output"] = {"name": "output", "op": "output", "text": "output"}
            preds["output"] = sources(stmt.value) if stmt.value is not None else []
            continue
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            continue
        if isinstance(stmt.value, ast.Constant) and stmt.value.value is None:
            continue  # FX frees values with "x = None"
        name, value = stmt.targets[0].id, stmt.value
        if isinstance(value, ast.Name) and value.id in arguments:
            if value.id in state:
                alias[name] = []
            else:
                nodes[name] = {"name": name, "op": "input", "text": name}
                preds[name] = []
            continue
        op = _callee(value)
        srcs = sources(value)
        if op in _HIDDEN_OPS:
            alias[name] = srcs
            continue
        text = op
        if op == "fp4_linear":
            strings = _string_args(value)
            site = next((s for s in strings if not s.startswith("forward=")), "")
            text = site.split(".", 2)[-1] if site.count(".") >= 2 else site or op
        nodes[name] = {"name": name, "op": op, "text": text, "strings": _string_args(value)}
        preds[name] = srcs
    edges = [(src, dst) for dst, ps in preds.items() for src in ps if src in nodes]
    return list(nodes.values()), edges


def _node_style(node: dict[str, Any], gemm_rows: dict[str, list[dict[str, Any]]]) -> tuple[str, str]:
    """Fill colour and tooltip of a drawn node."""
    if node["op"] == "fp4_linear":
        precision = next((s for s in node.get("strings", []) if s.startswith("forward=")), "")
        site = next((s for s in node.get("strings", []) if not s.startswith("forward=")), node["name"])
        forward = precision.split(";")[0].split("=", 1)[-1]
        color = BACKWARD_ONLY_COLOR if forward == "high" else FP4_COLOR
        roles = "; ".join(p for p in precision.split(";"))
        return color, f"{site}: {roles}"
    rows = gemm_rows.get(node["name"])
    if rows:
        return HIGH_GEMM_COLOR, f"{rows[0]['module']}: high precision ({rows[0]['reason']})"
    if node["op"] == "input":
        return INPUT_COLOR, node["name"]
    return OTHER_COLOR, f"{node['name']} = {node['op']}(...)"


def graph_svg(code: str, rows: list[dict[str, Any]], graph: str = "") -> str:
    """An SVG drawing (top to bottom, layered by longest path) of the FX code ``code`` of a rewritten graph:
    FP4 GEMMs green, GEMMs kept in high precision orange (matched by node name with ``rows`` of ``graph``)."""
    nodes, edges = _parse_graph(code)
    if not nodes:
        return '<p class="meta">No graph code to draw.</p>'
    gemm_rows: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if (not graph or r.get("graph") == graph) and r.get("node"):
            gemm_rows.setdefault(r["node"], []).append(r)
    index = {n["name"]: i for i, n in enumerate(nodes)}
    level = [0] * len(nodes)
    incoming: dict[int, list[int]] = {}
    for src, dst in edges:
        incoming.setdefault(index[dst], []).append(index[src])
    for i in range(len(nodes)):  # nodes are in topological (code) order
        level[i] = max((level[j] + 1 for j in incoming.get(i, [])), default=0)
    slots: dict[int, int] = {}
    pos = []
    for i in range(len(nodes)):
        slot = slots.get(level[i], 0)
        slots[level[i]] = slot + 1
        pos.append((slot, level[i]))
    w, h, dx, dy, pad = 132, 24, 150, 40, 12
    width = pad * 2 + dx * max(slots.values())
    height = pad * 2 + dy * (max(level) + 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="10" '
             f'font-family="sans-serif" role="img" aria-label="graph {html.escape(graph)}">',
             '<defs><marker id="arr" viewBox="0 0 6 6" refX="6" refY="3" markerWidth="5" markerHeight="5" '
             'orient="auto"><path d="M0,0 L6,3 L0,6 z" fill="#9aa3b2"/></marker></defs>']

    def center(i: int) -> tuple[float, float]:
        slot, lvl = pos[i]
        return pad + slot * dx + w / 2, pad + lvl * dy + h / 2

    for src, dst in edges:
        (x1, y1), (x2, y2) = center(index[src]), center(index[dst])
        parts.append(f'<line x1="{x1:.0f}" y1="{y1 + h / 2:.0f}" x2="{x2:.0f}" y2="{y2 - h / 2:.0f}" stroke="#9aa3b2" '
                     f'stroke-width="1" marker-end="url(#arr)"/>')
    for i, node in enumerate(nodes):
        color, tip = _node_style(node, gemm_rows)
        x, y = center(i)
        bold = ' font-weight="bold"' if color in (FP4_COLOR, HIGH_GEMM_COLOR) else ""
        text_color = "#fff" if color == FP4_COLOR else "#1d2330"
        label = node["text"] if len(node["text"]) <= 22 else node["text"][:21] + "…"
        parts.append(f'<g><title>{html.escape(tip)}</title><rect x="{x - w / 2:.0f}" y="{y - h / 2:.0f}" width="{w}" '
                     f'height="{h}" rx="5" fill="{color}" stroke="#7b8494"/><text x="{x:.0f}" y="{y + 3.5:.0f}" '
                     f'text-anchor="middle" fill="{text_color}"{bold}>{html.escape(label)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


# --- the page --------------------------------------------------------------------------------------------

def _table_html(data: DumpData) -> str:
    by_label = data.numerics_by_label()
    head = ("<tr><th>graph</th><th>module</th><th>role</th><th>precision</th><th>lhs</th><th>rhs</th><th>M x N x K</th>"
            "<th>SQNR lhs (dB)</th><th>SQNR rhs (dB)</th><th>underflow lhs/rhs</th><th>saturated lhs/rhs</th>"
            "<th>amax lhs/rhs</th><th>gemm path</th><th>reason</th></tr>")
    body = []
    for r in data.rows:
        lhs = by_label.get(f"{r['module']}:{r['role']}:lhs")
        rhs = by_label.get(f"{r['module']}:{r['role']}:rhs")
        pair = lambda f, a, b: f"{f(a)} / {f(b)}" if (a is not None or b is not None) else "–"  # noqa: E731
        body.append(
            f"<tr><td>{html.escape(graph_label(r))}</td>"
            f"<td>{html.escape(r['module'] or r.get('node', ''))}</td><td>{html.escape(r['role'])}</td>"
            f"<td class=\"p-{html.escape(r['precision'])}\">{html.escape(r['precision'])}</td>"
            f"<td>{html.escape(r['lhs'])}</td><td>{html.escape(r['rhs'])}</td>"
            f"<td>{html.escape(' x '.join(r['shape']))}</td>"
            f"<td class=num>{_fmt(lhs.sqnr_db if lhs else None)}</td><td class=num>{_fmt(rhs.sqnr_db if rhs else None)}</td>"
            f"<td class=num>{pair(_pct, lhs.underflow_fraction if lhs else None, rhs.underflow_fraction if rhs else None)}</td>"
            f"<td class=num>{pair(_pct, lhs.saturated_fraction if lhs else None, rhs.saturated_fraction if rhs else None)}</td>"
            f"<td class=num>{pair(lambda v: '–' if v is None else f'{v:.3g}', lhs.amax if lhs else None, rhs.amax if rhs else None)}</td>"
            f"<td>{html.escape(str(r.get('gemm_path', '')))}</td><td>{html.escape(r['reason'])}</td></tr>")
    return f'<div class="scroll"><table>{head}{"".join(body)}</table></div>'


def render_report(dump_dir: "str | os.PathLike") -> str:
    """The HTML of ``report.html`` for the dump in ``dump_dir`` (see the module docstring)."""
    data = load_dump(dump_dir)
    rows = data.rows
    quantized = [r for r in rows if r["precision"] != "high"]
    fallbacks = [r for r in rows if str(r["reason"]).startswith("fallback:")]
    sqnrs = [n.sqnr_db for n in data.numerics if n.sqnr_db is not None]
    m = data.manifest
    meta = " · ".join(html.escape(str(x)) for x in (
        f"source {m.get('source', 'FP4COMPILE_DUMP')}", f"fp4compile {m.get('fp4compile_version', '?')}",
        f"torch {m.get('torch_version', '?')}", f"inner {m.get('inner', '?')}") )
    cards = [(len({r['module'] for r in rows}), "GEMM sites"), (f"{len(quantized)} / {len(rows)}", "roles in FP4"),
             (len(data.numerics), "quantized operands"),
             (f"{min(sqnrs):.1f} dB" if sqnrs else "–", "lowest SQNR"), (len(fallbacks), "fallbacks")]
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>fp4compile dump</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>fp4compile dump</h1><div class=meta>{meta}</div>",
        f"<div class=meta>policy: {html.escape(str(m.get('policy', '?')))}</div>",
        '<div class="cards">' + "".join(f"<div class=card><b>{v}</b><span>{k}</span></div>" for v, k in cards) + "</div>",
        "<h2>SQNR by layer</h2>",
        '<p class=meta>SQNR of the dequantized operand against high precision; Hadamard operands (weight-gradient '
        "GEMM of the NV recipe) are compared in the transformed domain. Hover a point for its label.</p>",
        sqnr_plot_svg(data),
        "<h2>Precision table</h2>",
        _table_html(data),
        _sensitivity_of_dump(os.fspath(dump_dir)),
    ]
    if m.get("onnx"):
        parts.append(f"<p class=meta>ONNX: {', '.join(html.escape(p) for p in m['onnx'])} (opset 23; FP4 operands "
                     "as DequantizeLinear of FLOAT4E2M1).</p>")
    elif m.get("onnx_error"):
        parts.append(f"<p class=meta>No ONNX model: {html.escape(str(m['onnx_error']))}</p>")
    parts.append("<h2>Graphs</h2><div class=legend>"
                 f"<span><i class=sw style='background:{FP4_COLOR}'></i>FP4 GEMM (forward in FP4)</span>"
                 f"<span><i class=sw style='background:{BACKWARD_ONLY_COLOR}'></i>FP4 in backward only</span>"
                 f"<span><i class=sw style='background:{HIGH_GEMM_COLOR}'></i>weight GEMM kept in high precision</span>"
                 f"<span><i class=sw style='background:{INPUT_COLOR}'></i>input</span>"
                 f"<span><i class=sw style='background:{OTHER_COLOR}'></i>other op</span></div>"
                 "<p class=meta>The rewritten forward graph as Dynamo captured it (module state and shape-only ops "
                 "hidden). Hover a node for details.</p>")
    for g in data.graphs:
        if g.rewritten is None:
            continue
        parts.append(f"<h3>{html.escape(g.graph)} · phase {html.escape(g.phase)}</h3>")
        parts.append(f'<div class="graph">{graph_svg(g.rewritten, rows, g.graph)}</div>')
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(dump_dir: "str | os.PathLike") -> str:
    """Render and write ``report.html`` into ``dump_dir``; returns its path."""
    path = os.path.join(os.fspath(dump_dir), REPORT)
    text = render_report(dump_dir)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    logger.debug("fp4compile dump: wrote %s", path)
    return path


# --- sensitivity (fp4compile.sensitivity) -----------------------------------------------------------------

ROLE_COLORS = {"forward": "#1f77b4", "input_grad": "#d62728", "weight_grad": "#9467bd"}
BLOCK_COLOR = "#7f7f7f"


def sensitivity_plot_svg(report: Any, width: int = 860, height: int = 340) -> str:
    """An SVG scatter plot of each site and role's ``grad_error`` (log scale) by layer index, one colour per
    role; sites outside the block stack (the output head) to the right of the last block; the block scope as a
    grey line and the noise floor dashed."""
    entries = [e for e in report.entries if e.measured and e.grad_error is not None]
    roles = [e for e in entries if e.scope == "role"]
    if not roles:
        return '<p class="meta">No site was measured.</p>'
    layers = sorted({e.layer for e in roles if e.layer is not None})
    outside = sorted({e.module for e in roles if e.layer is None})
    columns = [str(v) for v in layers] + outside
    column_of = {m: len(layers) + i for i, m in enumerate(outside)}
    index_of = {v: i for i, v in enumerate(layers)}

    def column(e: Any) -> int:
        return index_of[e.layer] if e.layer is not None else column_of[e.module]

    floor = report.noise_floor if report.noise_floor and report.noise_floor > 0 else None
    values = [e.grad_error for e in entries if e.grad_error > 0] + ([floor] if floor else [])
    if not values:
        return '<p class="meta">Every measured gradient error is zero.</p>'
    lo, hi = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)) + 1e-9)
    hi = max(hi, lo + 1)
    left, right, top, bottom = 64, 150, 14, 40
    pw, ph = width - left - right, height - top - bottom

    def sx(v: float) -> float:
        return left + (v + 0.5) / len(columns) * pw

    def sy(v: float) -> float:
        v = max(v, 10.0 ** lo)
        return top + (hi - math.log10(v)) / (hi - lo) * ph

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11" '
             f'font-family="sans-serif" role="img" aria-label="FP4 sensitivity by layer and role">',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafbfc" stroke="#c9d0da"/>']
    for p in range(lo, hi + 1):
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(10.0 ** p):.1f}" y2="{sy(10.0 ** p):.1f}" '
                     f'stroke="#e6e9ee"/><text x="{left - 6}" y="{sy(10.0 ** p) + 4:.1f}" text-anchor="end">1e{p}</text>')
    for i, name in enumerate(columns):
        label = name if len(name) <= 12 else "…" + name[-11:]
        parts.append(f'<text x="{sx(i):.1f}" y="{top + ph + 16}" text-anchor="middle">{html.escape(label)}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">layer index</text>'
                 f'<text transform="translate(14 {top + ph / 2}) rotate(-90)" text-anchor="middle">gradient error '
                 '(log)</text>')
    if floor:
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(floor):.1f}" y2="{sy(floor):.1f}" stroke="#444" '
                     f'stroke-dasharray="4 3"><title>noise floor {floor:.3g}</title></line>')
    blocks = sorted((e for e in entries if e.scope == "block" and e.layer in index_of), key=lambda e: e.layer)
    if len(blocks) > 1:
        path = " ".join(f"{'M' if i == 0 else 'L'}{sx(index_of[e.layer]):.1f},{sy(e.grad_error):.1f}"
                        for i, e in enumerate(blocks))
        parts.append(f'<path d="{path}" fill="none" stroke="{BLOCK_COLOR}" stroke-width="1.5"/>')
    for e in blocks:
        parts.append(f'<rect x="{sx(index_of[e.layer]) - 4:.1f}" y="{sy(e.grad_error) - 4:.1f}" width="8" height="8" '
                     f'fill="{BLOCK_COLOR}"><title>{html.escape(e.module)} (all sites, all roles): grad error '
                     f'{e.grad_error:.3g}</title></rect>')
    suffixes = sorted({e.module.split(".", 3)[-1] for e in roles if e.layer is not None})
    for e in roles:
        suffix = e.module.split(".", 3)[-1]
        jitter = ((suffixes.index(suffix) + 0.5) / len(suffixes) - 0.5) * 0.7 if e.layer is not None and suffixes else 0.0
        role_shift = {"forward": -0.06, "input_grad": 0.0, "weight_grad": 0.06}.get(e.role, 0.0)
        cx = sx(column(e) + jitter + role_shift)
        parts.append(f'<circle cx="{cx:.1f}" cy="{sy(e.grad_error):.1f}" r="4" fill="{ROLE_COLORS.get(e.role, "#444")}" '
                     f'fill-opacity="0.85"><title>#{e.rank} {html.escape(e.module)} {e.role}: grad error '
                     f'{e.grad_error:.3g}, loss {e.loss_delta_rel:+.3%}</title></circle>')
    legend = list(ROLE_COLORS.items()) + [("block (all roles)", BLOCK_COLOR)]
    for i, (name, color) in enumerate(legend):
        y = top + 10 + 16 * i
        parts.append(f'<circle cx="{left + pw + 14}" cy="{y}" r="4" fill="{color}"/>'
                     f'<text x="{left + pw + 22}" y="{y + 4}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _sensitivity_rows(entries: list[Any], total_flops: int) -> str:
    def num(v: Optional[float], spec: str) -> str:
        return "–" if v is None else format(v, spec)

    body = []
    for e in entries:
        share = f"{100 * e.flops / total_flops:.2f}%" if total_flops else "–"
        body.append(
            f"<tr><td class=num>{e.rank if e.rank is not None else '–'}</td><td>{html.escape(e.module or '(model)')}</td>"
            f"<td>{html.escape(e.role)}</td><td class=num>{'–' if e.layer is None else e.layer}</td>"
            f"<td class=num>{share}</td><td class=num>{num(e.grad_error, '.3g')}</td>"
            f"<td class=num>{num(e.grad_rel_error, '.3g')}</td><td class=num>{num(e.grad_cosine, '.5f')}</td>"
            f"<td class=num>{num(e.loss_delta_rel, '+.3%')}</td><td class=num>{num(e.sqnr_lhs_db, '.1f')}</td>"
            f"<td class=num>{num(e.sqnr_rhs_db, '.1f')}</td><td>{html.escape(e.skipped)}</td></tr>")
    head = ("<tr><th>rank</th><th>module</th><th>role</th><th>layer</th><th>FLOPs</th><th>grad error</th>"
            "<th>grad rel. error</th><th>grad cosine</th><th>loss change</th><th>SQNR lhs</th><th>SQNR rhs</th>"
            "<th>not measured</th></tr>")
    return f'<div class="scroll"><table>{head}{"".join(body)}</table></div>'


def sensitivity_section_html(report: Any) -> str:
    """The sensitivity section of a report page: what was measured, the plot by layer and role, and the
    ranked tables (role scope; then blocks, sites and the whole model)."""
    ranked = report.ranked("role")
    unmeasured = [e for e in report.entries if e.scope == "role" and not e.measured]
    others = [e for scope in ("block", "site", "model") for e in report.ranked(scope)]
    precisions = "; ".join(f"{role} {html.escape(p)}" for role, p in report.precisions.items())
    return "\n".join([
        "<h2>FP4 sensitivity</h2>",
        f"<p class=meta>Each part run in FP4 alone (recipe {html.escape(report.recipe)}: {precisions}), the rest in "
        f"high precision, on {report.batches} batch(es), seed {report.seed}; high-precision loss {report.loss:.4f}. "
        f"Ranked by {html.escape(report.metric)}: grad error is the mean over parameter tensors of "
        "|g<sub>FP4</sub> − g<sub>high</sub>| / |g<sub>high</sub>|; loss change relative to high precision; SQNRs "
        f"of the role's operands. Noise floor (a repeated high-precision pass): {report.noise_floor:.3g}. "
        "Hover a point for its site.</p>",
        sensitivity_plot_svg(report),
        "<h3>Sites and roles, most sensitive first</h3>",
        _sensitivity_rows(ranked + unmeasured, report.total_flops),
        "<h3>Blocks, sites (all roles) and the whole model</h3>",
        _sensitivity_rows(others, report.total_flops),
    ])


def render_sensitivity_page(report: Any) -> str:
    """``sensitivity.html``: the sensitivity section as a page of its own (for a folder without a dump)."""
    return "\n".join([
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>fp4compile sensitivity</title>",
        f"<style>{_CSS}</style></head><body><h1>fp4compile sensitivity</h1>",
        sensitivity_section_html(report), "</body></html>"])


def _sensitivity_of_dump(dump_dir: str) -> str:
    """The sensitivity section when ``sensitivity.json`` lies beside the dump's files, else nothing."""
    from .layout import SENSITIVITY
    from .sensitivity import load_sensitivity

    path = os.path.join(dump_dir, SENSITIVITY)
    if not os.path.isfile(path):
        return ""
    try:
        return sensitivity_section_html(load_sensitivity(path))
    except (ValueError, KeyError) as exc:
        logger.warning("fp4compile report: cannot read %s: %s", path, exc)
        return f"<p class=meta>Cannot read {html.escape(path)}: {html.escape(str(exc))}</p>"
