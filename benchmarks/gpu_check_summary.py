"""The compact summary benchmarks/gpu_check.sh prints last, from what its stages wrote to a folder.

    python benchmarks/gpu_check_summary.py OUT_DIR

Stages (exit status, seconds), the test counts, the GEMM table's per-shape time ratios to cuBLAS BF16 and their
sums, and the training steps with each mode's ratio to its like-for-like BF16 mode and device memory.
"""

from __future__ import annotations

import json
import os
import re
import sys


def _load(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _last_counts(path: str) -> list[str]:
    """The pytest summary lines (``N passed, M skipped in ...``) of a log."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return []
    return re.findall(r"^=*\s*(\d+ (?:passed|failed|error).*?)\s*=*$", text, flags=re.M)


def main(out: str) -> None:
    try:
        print(open(os.path.join(out, "stages.txt")).read().rstrip())
    except OSError:
        pass
    info = os.path.join(out, "info.log")
    if os.path.exists(info):
        print(open(info).read().rstrip())
    counts = _last_counts(os.path.join(out, "tests.log"))
    print("tests:", "; ".join(counts) if counts else "no pytest summary (see tests.log)")

    gemm = _load(os.path.join(out, "bench_gemm_shapes.json"))
    if gemm:
        rows = gemm["rows"]
        labels = [label for label in ("bf16", "fp8 tw", "fp8 rw", "graph_mm", "triton_dequant", "triton_traced",
                                      "triton_packed") if any(label in r["ms"] for r in rows)]
        print(f"\nGEMMs at d={gemm['d']}, {gemm['tokens']} tokens: time / cuBLAS bf16 time (bf16 ms, TFLOP/s)")
        print(f"{'GEMM':14s} {'bf16 ms':>8s} {'TF/s':>5s} " + " ".join(f"{label:>14s}" for label in labels[1:]))
        for r in rows:
            base = r["ms"].get("bf16")
            cells = []
            for label in labels[1:]:
                ms = r["ms"].get(label)
                cells.append(f"{ms / base:14.2f}" if ms and base else f"{'-':>14s}")
            tf = r["tflops"].get("bf16", float("nan"))
            print(f"{r['name']:14s} {base or float('nan'):8.3f} {tf:5.0f} " + " ".join(cells))
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_gemm_shapes import picked_sums

        for mode, text in picked_sums(rows).items():
            print(f"picked paths {mode}: {text}")
        failed = [f"{r['name']} {p}" for r in rows for p, ok in r.get("ok", {}).items() if not ok]
        if failed:
            print("FAILED correctness (not timed):", ", ".join(failed))

    print(f"\n{'model':10s} {'mode':25s} {'step ms':>8s} {'x like-for-like':>16s} {'tok/s':>9s} {'device GiB':>10s} "
          f"{'1st step s':>10s}")
    for name in ("train_d2048", "train_gpt2", "train_small"):
        results = _load(os.path.join(out, f"{name}.json")) or []
        base = {r["mode"]: r for r in results if "step_ms" in r}
        for r in results:
            if "error" in r:
                print(f"{r['model']:10s} {r['mode']:25s} ERROR {r['error'][:120]}")
                continue
            ref = base.get("inductor-bf16-cudagraphs" if "cudagraphs" in r["mode"] else "inductor-bf16")
            ratio = r["step_ms"] / ref["step_ms"] if ref else float("nan")
            print(f"{r['model']:10s} {r['mode']:25s} {r['step_ms']:8.2f} {ratio:16.2f} {r['tokens_per_s']:9.0f} "
                  f"{r['device_gib']:10.2f} {r['first_step_s']:10.1f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "."))
