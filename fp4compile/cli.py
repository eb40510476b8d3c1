"""The ``fp4compile`` console command.

    fp4compile dump run <script.py> [args...] --out <dir>   run a script with FP4COMPILE_DUMP=<dir>
    fp4compile dump show <dir>                              the precision table with the step's numerics
    fp4compile dump diff <dirA> <dirB>                      what differs between two dumps (exit 1 if decisions do)
    fp4compile dump report <dir>                            (re)write <dir>/report.html
    fp4compile sensitivity [options] <file.py[:fn] | module:fn> [args...] --out <dir>
                                                            measure what FP4 costs per site and role
    fp4compile export [options] <file.py[:fn] | module:fn> [args...] --out <dir>
                                                            write an NVFP4 checkpoint (docs/export.md)

``sensitivity`` calls ``fn`` (default ``sensitivity_inputs``) of the file or module with the arguments after it
(as a list of strings, when ``fn`` takes a parameter); ``fn`` returns ``(model, batches)``, or a mapping with
``"model"`` and ``"batches"`` (each batch a tuple of positional inputs or a mapping of keyword inputs). Its
options come before the file; like ``dump run`` it also takes the last ``--out`` on the line as its own.
``export`` calls ``fn`` (default ``export_inputs``) the same way: ``(model, calibration batches)``, or a mapping
that may also hold a ``"tokenizer"``.

``dump run`` takes the *last* ``--out <dir>`` (or ``--out=<dir>``) on the line as its own, so a script's own
``--out`` may come earlier; or put the script after ``--``: ``fp4compile dump run --out d -- train.py --out x``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any, Optional, Sequence

__all__ = ["main", "split_run_args", "load_target"]


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


DEFAULT_TARGET = "sensitivity_inputs"


def _call_target(spec: str, argv: Sequence[str], default: str) -> tuple[str, str, Any]:
    """Import ``file.py[:fn]`` or ``package.module:fn`` (``fn`` defaults to ``default``) and call ``fn`` with
    ``argv``; returns where, the function's name and what it returned."""
    where, _, name = spec.partition(":") if not os.path.isfile(spec) else (spec, "", "")
    name = name or default
    if where.endswith(".py") or os.path.isfile(where):
        if not os.path.isfile(where):
            raise ValueError(f"no such file: {where}")
        folder = os.path.dirname(os.path.abspath(where))
        if folder not in sys.path:
            sys.path.insert(0, folder)  # the file's own imports of its neighbours, as when run as a script
        module_spec = importlib.util.spec_from_file_location(f"_fp4compile_target_{abs(hash(where))}", where)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise ValueError(f"cannot import {where!r} (expected file.py[:fn] or package.module:fn): {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{where} has no function {name!r}: give it as {where}:<function returning (model, batches)>")
    takes_argv = bool(inspect.signature(fn).parameters)
    if argv and not takes_argv:
        raise ValueError(f"{where}:{name} takes no arguments, but {' '.join(argv)} was given")
    return where, name, (fn(list(argv)) if takes_argv else fn())


def _model_and_batches(where: str, name: str, result: Any) -> tuple[Any, list[Any]]:
    if isinstance(result, dict):
        result = (result.get("model"), result.get("batches"))
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise ValueError(f"{where}:{name} must return (model, batches) or {{'model': ..., 'batches': ...}}, "
                         f"got {type(result).__name__}")
    model, batches = result
    return model, list(batches)


def load_target(spec: str, argv: Sequence[str] = (), default: str = DEFAULT_TARGET) -> tuple[Any, list[Any]]:
    """``(model, batches)`` from ``file.py[:fn]`` or ``package.module:fn`` (see the module docstring)."""
    return _model_and_batches(*_call_target(spec, argv, default))


def _sensitivity(args: argparse.Namespace) -> int:
    import fp4compile
    from fp4compile import recipes

    out, rest = split_run_args(args.rest)
    out = args.out or out
    if not rest:
        print("usage: fp4compile sensitivity [options] <file.py[:fn] | module:fn> [args...] [--out <dir>]",
              file=sys.stderr)
        return 2
    model, batches = load_target(rest[0], rest[1:])
    if args.batches:
        batches = batches[: args.batches]
    recipe = recipes.from_name(args.recipe)
    if out and args.dump:
        first = batches[0]
        if isinstance(first, Mapping):  # keyword inputs, as transformers models take them
            fp4compile.dump(model, out=out, policy=recipe, onnx=False, **first)
        elif isinstance(first, (tuple, list)):
            fp4compile.dump(model, *first, out=out, policy=recipe, onnx=False)
        else:
            raise TypeError(f"--dump needs batches of positional inputs (tuple or list) or keyword inputs (a "
                            f"mapping), got a batch of type {type(first).__name__}")
    report = fp4compile.sensitivity(model, batches=batches, recipe=recipe, metric=args.metric,
                                    blocks=not args.no_blocks, per_site=not args.no_sites, seed=args.seed,
                                    progress=not args.no_progress, out=out)
    ranked = report.ranked("role")
    print(f"fp4compile sensitivity: {len(report.sites)} sites, {len(ranked)} site-roles measured on "
          f"{report.batches} batch(es), recipe {report.recipe}; high-precision loss {report.loss:.4f}, "
          f"noise floor {report.noise_floor:.3g}; most sensitive first ({report.metric}):")
    print(f"{'rank':>4}  {'module':40s} {'role':11s} {'layer':>5s} {'FLOPs':>7s} {'grad err':>9s} {'cosine':>8s} "
          f"{'loss':>8s} {'SQNR lhs':>8s} {'SQNR rhs':>8s}")
    total = report.total_flops or 1
    for e in ranked[: args.top]:
        print(f"{e.rank:4d}  {e.module:40s} {e.role:11s} {'-' if e.layer is None else e.layer:>5} "
              f"{e.flops / total:7.2%} {e.grad_error:9.3g} {e.grad_cosine:8.5f} {e.loss_delta_rel:+8.3%} "
              f"{_fmt(e.sqnr_lhs_db, '8.1f'):>8s} {_fmt(e.sqnr_rhs_db, '8.1f'):>8s}")
    for e in report.ranked("block"):
        print(f"block {e.module} (all sites, all roles): grad error {e.grad_error:.3g}, loss {e.loss_delta_rel:+.3%}")
    if args.budget is not None:
        budget = recipes.high_precision_flop_fraction(report) if args.budget == "nv" else float(args.budget)
        policy = recipes.from_sensitivity(report, budget)
        kept = [r for r in policy.rules if r.precision.is_high]
        print(f"from_sensitivity(budget={budget:.1%}) keeps {len(kept)} site-roles in high precision "
              f"({report.high_precision_fraction(policy):.1%} of linear FLOPs):")
        for r in kept:
            print(f"  {r.modules[0]} {r.roles[0].value}: {r.name}")
    if out:
        print(f"fp4compile: sensitivity written to {out} (sensitivity.json, sensitivity.html)")
    return 0


EXPORT_TARGET = "export_inputs"


def _export(args: argparse.Namespace) -> int:
    import torch

    import fp4compile
    from fp4compile import recipes

    out, rest = split_run_args(args.rest)
    out = args.out or out
    if not rest or not out:
        print("usage: fp4compile export [options] <file.py[:fn] | module:fn> [args...] --out <dir>", file=sys.stderr)
        return 2
    where, name, target = _call_target(rest[0], rest[1:], EXPORT_TARGET)
    model, batches = _model_and_batches(where, name, target)
    tokenizer = target.get("tokenizer") if isinstance(target, dict) else None
    blocks = {k: v for k, v in (("high_precision_first_blocks", args.high_precision_first_blocks),
                                ("high_precision_last_blocks", args.high_precision_last_blocks)) if v is not None}
    policy = recipes.from_name(args.recipe, **blocks)
    result = fp4compile.export(model, out, batches, format=args.format, policy=policy, tokenizer=tokenizer,
                               dtype=getattr(torch, args.dtype), progress=not args.no_progress)
    print(f"fp4compile: wrote {result.path} ({result.format.value}): {len(result.fp4_layers)} layers in NVFP4, "
          f"{len(result.ignored)} linear layers in {args.dtype} ({', '.join(result.ignored) or 'none'})")
    return 0


def _parser() -> argparse.ArgumentParser:
    from .recipes import RECIPE_NAMES

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
    sens = sub.add_parser("sensitivity", help="measure what FP4 costs at every site and role of a model: "
                          "sensitivity [options] <file.py[:fn] | module:fn> [args...] --out <dir>")
    sens.add_argument("--out", default=None, help="folder for sensitivity.json/.html (a dump's folder or a new one)")
    sens.add_argument("--recipe", default="nvfp4", choices=[n for n in RECIPE_NAMES if n != "high_precision"],
                      help="the recipe whose role precisions are measured")
    sens.add_argument("--metric", default="grad_error", choices=["grad_error", "grad_rel_error", "grad_cosine",
                                                                 "loss_delta"])
    sens.add_argument("--batches", type=int, default=0, help="use only the first N batches fn returns")
    sens.add_argument("--seed", type=int, default=0)
    sens.add_argument("--top", type=int, default=20, help="print the N most sensitive site-roles")
    sens.add_argument("--budget", default=None, help="also print from_sensitivity's choice within this fraction of "
                      "linear FLOPs ('nv': the NV recipe's first-and-last-block share)")
    sens.add_argument("--dump", action="store_true", help="also dump one compiled step into --out (the report gets "
                      "the sensitivity section)")
    sens.add_argument("--no-blocks", action="store_true", help="skip the per-block measurements")
    sens.add_argument("--no-sites", action="store_true", help="skip the per-site (all roles) measurements")
    sens.add_argument("--no-progress", action="store_true")
    sens.add_argument("rest", nargs=argparse.REMAINDER)
    exp = sub.add_parser("export", help="write an NVFP4 checkpoint that serving stacks load: "
                         "export [options] <file.py[:fn] | module:fn> [args...] --out <dir>")
    exp.add_argument("--out", default=None, help="the checkpoint folder to create (must not exist)")
    exp.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors", "modelopt"])
    exp.add_argument("--recipe", default="nvfp4", choices=list(RECIPE_NAMES),
                     help="the recipe the model was trained with (which layers are FP4)")
    exp.add_argument("--high-precision-first-blocks", type=int, default=None)
    exp.add_argument("--high-precision-last-blocks", type=int, default=None)
    exp.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                     help="dtype of the tensors not in FP4")
    exp.add_argument("--no-progress", action="store_true")
    exp.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The console entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["dump", "run"]:  # everything after "run" belongs to the script, except our --out
        return _run(argv[2:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "sensitivity":
            return _sensitivity(args)
        if args.command == "export":
            return _export(args)
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
