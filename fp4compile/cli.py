"""The ``fp4compile`` console command.

    fp4compile dump run <script.py> [args...] --out <dir>   run a script with FP4COMPILE_DUMP=<dir>
    fp4compile dump show <dir>                              the precision table with the step's numerics
    fp4compile dump diff <dirA> <dirB>                      what differs between two dumps (exit 1 if decisions do)
    fp4compile dump report <dir>                            (re)write <dir>/report.html

``dump run`` takes the *last* ``--out <dir>`` (or ``--out=<dir>``) on the line as its own, so a script's own
``--out`` may come earlier; or put the script after ``--``: ``fp4compile dump run --out d -- train.py --out x``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Optional, Sequence

__all__ = ["main", "split_run_args"]


def split_run_args(argv: Sequence[str]) -> tuple[Optional[str], list[str]]:
    """``dump run``'s arguments -> (its --out folder, the script and its arguments)."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        ours, script = argv[:i], argv[i + 1:]
        out = None
        for j, a in enumerate(ours):
            if a == "--out" and j + 1 < len(ours):
                out = ours[j + 1]
            elif a.startswith("--out="):
                out = a.split("=", 1)[1]
        return out, script
    for j in range(len(argv) - 1, -1, -1):
        if argv[j].startswith("--out="):
            return argv[j].split("=", 1)[1], argv[:j] + argv[j + 1:]
        if argv[j] == "--out" and j + 1 < len(argv) and j > 0:
            return argv[j + 1], argv[:j] + argv[j + 2:]
    return None, argv


def _run(argv: Sequence[str]) -> int:
    out, script = split_run_args(argv)
    if out is None or not script:
        print("usage: fp4compile dump run <script.py> [args...] --out <dir>", file=sys.stderr)
        return 2
    if not os.path.isfile(script[0]):
        print(f"fp4compile dump run: no such script: {script[0]}", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, FP4COMPILE_DUMP=os.path.abspath(out))
    result = subprocess.run([sys.executable, *script], env=env)
    if os.path.isfile(os.path.join(out, "precision_table.json")):
        print(f"fp4compile: dump written to {out} (open {os.path.join(out, 'report.html')})")
    else:
        print(f"fp4compile: the script compiled nothing with the fp4 backend; {out} holds no dump", file=sys.stderr)
    return result.returncode


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _show(path: str, only_fp4: bool, console=None) -> int:
    from .inspect.layout import load_dump
    from .inspect.table import graph_label

    data = load_dump(path)
    by_label = data.numerics_by_label()
    columns = ["graph", "module", "role", "precision", "lhs", "rhs", "M x N x K", "SQNR lhs", "SQNR rhs", "underflow",
               "saturated", "reason"]
    lines = []
    for r in data.rows:
        if only_fp4 and r["precision"] == "high":
            continue
        lhs, rhs = by_label.get(f"{r['module']}:{r['role']}:lhs"), by_label.get(f"{r['module']}:{r['role']}:rhs")
        ops = [o for o in (lhs, rhs) if o is not None]
        lines.append([
            graph_label(r), r["module"] or r.get("node", ""), r["role"], r["precision"], r["lhs"], r["rhs"],
            " x ".join(r["shape"]),
            _fmt(lhs.sqnr_db if lhs else None, ".1f"), _fmt(rhs.sqnr_db if rhs else None, ".1f"),
            _fmt(max(o.underflow_fraction for o in ops) if ops else None, ".2%"),
            _fmt(max(o.saturated_fraction for o in ops) if ops else None, ".2%"), r["reason"],
        ])
    n_fp4 = sum(r["precision"] != "high" for r in data.rows)
    title = (f"fp4compile dump {path}: {len({r['module'] for r in data.rows})} GEMM sites, {n_fp4}/{len(data.rows)} "
             f"roles in FP4, {len(data.numerics)} quantized operands")
    models = data.manifest.get("models") or []
    if models:  # other compiled models of the same process, each in a subfolder (fp4compile/inspect/dump.py)
        title += f"; other compiled models: {', '.join(os.path.join(path, m) for m in models)}"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is optional: plain text
        print(title)
        print(" | ".join(columns))
        for line in lines:
            print(" | ".join(line))
        return 0
    table = Table(title=title, title_justify="left", header_style="bold")
    for c in columns:
        table.add_column(c, justify="right" if c.startswith(("SQNR", "under", "satur")) else "left",
                         overflow="fold", no_wrap=c not in ("reason",))
    for line in lines:
        style = "green" if line[3] != "high" else None
        table.add_row(*line, style=style)
    (console or Console(width=max(200, Console().width))).print(table)
    return 0


def _diff(a: str, b: str, sqnr_tolerance: float) -> int:
    from .inspect.diff import diff_dumps

    d = diff_dumps(a, b, sqnr_tolerance_db=sqnr_tolerance)
    if d.identical:
        print(f"no differences between {a} and {b}")
        return 0
    if not d.has_decision_differences:
        print(f"no decision differences between {a} and {b}")
    else:
        print(f"decision differences between {a} (A) and {b} (B) in {len(d.modules())} module(s): "
              f"{', '.join(sorted(d.modules()))}")
    for c in d.changed:
        for field, (va, vb) in c.fields.items():
            print(f"  {c.graph} {c.module} {c.role}: {field}: {va!r} -> {vb!r}")
    for r in d.only_in_a:
        print(f"  only in A: {r.get('graph', '')} {r['module']} {r['role']} ({r['precision']})")
    for r in d.only_in_b:
        print(f"  only in B: {r.get('graph', '')} {r['module']} {r['role']} ({r['precision']})")
    for label in d.operands_only_in_a:
        print(f"  operand quantized only in A: {label}")
    for label in d.operands_only_in_b:
        print(f"  operand quantized only in B: {label}")
    if d.sqnr_changes:
        print(f"SQNR changes beyond {sqnr_tolerance} dB ({len(d.sqnr_changes)} operands, information only):")
        for label, sa, sb in d.sqnr_changes:
            print(f"  {label}: {_fmt(sa, '.2f')} -> {_fmt(sb, '.2f')} dB")
    return 1 if d.has_decision_differences else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fp4compile", description="fp4compile: inspect what the fp4 backend did.")
    sub = p.add_subparsers(dest="command", required=True)
    dump = sub.add_parser("dump", help="produce and read dumps of a compiled training step")
    dsub = dump.add_subparsers(dest="action", required=True)
    run = dsub.add_parser("run", help="run a script with FP4COMPILE_DUMP set: run <script.py> [args...] --out <dir>",
                          add_help=False)
    run.add_argument("rest", nargs=argparse.REMAINDER)
    show = dsub.add_parser("show", help="print the precision table with the step's numerics")
    show.add_argument("dir")
    show.add_argument("--fp4-only", action="store_true", help="only the roles that run in FP4")
    diff = dsub.add_parser("diff", help="compare two dumps; exit status 1 when their decisions differ")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.add_argument("--sqnr-tolerance", type=float, default=0.1, help="list SQNR changes above this (dB)")
    report = dsub.add_parser("report", help="(re)write report.html of a dump")
    report.add_argument("dir")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The console entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["dump", "run"]:  # everything after "run" belongs to the script, except our --out
        return _run(argv[2:])
    args = _parser().parse_args(argv)
    try:
        if args.action == "show":
            return _show(args.dir, args.fp4_only)
        if args.action == "diff":
            return _diff(args.a, args.b, args.sqnr_tolerance)
        if args.action == "report":
            from .inspect.report import write_report

            print(write_report(args.dir))
            return 0
    except (FileNotFoundError, ValueError) as exc:
        print(f"fp4compile: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
