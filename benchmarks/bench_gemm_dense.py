"""The dense "triton_dequant" GEMM with its fused epilogue (`fp4compile.codegen.gemm.gemm_dense`) against cuBLAS.

    PYTHONPATH=. python3 benchmarks/bench_gemm_dense.py [--sweep] [--shapes NAME,NAME,...] [--rep MS]

For each GPT-2-small training GEMM (and 8192^3), in its training layout:
  1. correctness first: every configuration timed is run on fresh random exact fp16 operands with a bias into an
     output poisoned with NaN, and checked element-wise against the float64 product (the FP32-accumulation bound
     of tests/test_codegen_gemm.py plus half a bf16 ulp); configurations with a cut schedule are also run twice
     and must agree bit for bit;
  2. timings, all as CUDA-graph replays with the inputs rotated over 3 copies (as ``graph_ms`` in
     benchmarks/bench_kernels.py): cuBLAS bf16 ``torch.mm`` (bf16 operands, bf16 result, same layouts), cuBLAS
     ``torch.mm(a16, b, out_dtype=torch.float32)`` (the backend's current GEMM, epilogue not included), and
     `gemm_dense` (fp16 operands, alpha read on the device, bf16 result) for the table/default configuration or,
     with --sweep, every candidate configuration.
Prints a table (TFLOP/s and % of cuBLAS bf16); writes JSON to $OUT/bench_gemm_dense.json when OUT is set.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback

import torch
import triton

from fp4compile.codegen import gemm as cg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import graph_ms  # noqa: E402

C = cg.DenseConfig

#: (name, M, N, K, layout). forward: A (M, K) . W (N, K) read transposed; dgrad: B stored (K, N);
#: wgrad: A (M, K) . x^T stored (N, K) read transposed.
SHAPES = [
    ("qkv fwd", 8192, 2304, 768, "nk"),
    ("proj fwd", 8192, 768, 768, "nk"),
    ("fc1 fwd", 8192, 3072, 768, "nk"),
    ("fc2 fwd", 8192, 768, 3072, "nk"),
    ("qkv dgrad", 8192, 768, 2304, "kn"),
    ("fc1 dgrad", 8192, 768, 3072, "kn"),
    ("fc2 dgrad", 8192, 3072, 768, "kn"),
    ("qkv wgrad", 2304, 768, 8192, "nk"),
    ("fc1 wgrad", 3072, 768, 8192, "nk"),
    ("fc2 wgrad", 768, 3072, 8192, "nk"),
    ("proj wgrad", 768, 768, 8192, "nk"),
    ("8192^3", 8192, 8192, 8192, "nk"),
]

#: Candidate configurations of the --sweep (compiled once per B layout): data-parallel ones for the shapes with many
#: tiles, and the cut schedules for the weight gradients (few 128x128 tiles, K = 8192).
SWEEP_DP = [
    C(128, 256, 64, 8, 8, 4, epi_split=True),
    C(128, 256, 64, 8, 8, 3, epi_split=True),
    C(128, 128, 64, 8, 4, 4),
    C(128, 128, 64, 8, 4, 3),
    C(128, 128, 64, 8, 4, 5),
    C(128, 128, 64, 8, 4, 4, epi_split=True),
    C(128, 128, 64, 4, 4, 4),
    C(128, 128, 64, 16, 4, 4),
    C(128, 128, 128, 8, 4, 3),
    C(128, 128, 128, 8, 8, 3),
]
SWEEP_CUT = [
    C(128, 128, 64, 8, 4, 4),
    C(128, 128, 64, 8, 8, 4, schedule="split"),
    C(128, 128, 64, 8, 8, 4, schedule="split", split_k=6),
    C(128, 128, 64, 8, 8, 4, schedule="split", split_k=7),
    C(128, 128, 64, 8, 8, 4, schedule="headtail"),
    C(128, 128, 64, 8, 4, 4, schedule="headtail"),
    C(128, 256, 64, 8, 8, 3, schedule="headtail", epi_split=True),
    C(128, 256, 64, 8, 8, 4, schedule="headtail", epi_split=True),
]


def sweep_for(name: str) -> list:
    return SWEEP_CUT if "wgrad" in name else SWEEP_DP


N_SETS = 3
RESULTS: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def operands(m, n, k, layout, seed):
    """Exact fp16 operands (random fp16 values, as the dequantized NVFP4 operands are) and the logical (K, N) B."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(m, k, device="cuda", generator=g).to(torch.float16)
    if layout == "kn":
        b_kn = torch.randn(k, n, device="cuda", generator=g).to(torch.float16)
    else:
        b_kn = torch.randn(n, k, device="cuda", generator=g).to(torch.float16).t()
    return a, b_kn


def check(m, n, k, layout, configs, seed) -> dict:
    """Worst error over the FP32-accumulation bound (<= 1 passes) per configuration, fresh inputs each call."""
    a, b_kn = operands(m, n, k, layout, seed)
    d_a = torch.rand((), device="cuda") + 0.5
    d_b = torch.rand((), device="cuda") * 1e-3 + 1e-4
    bias = torch.randn(n, device="cuda")
    a64, b64 = a.double(), b_kn.double()
    alpha = (d_a * d_b).double()  # the fp32 product, as the kernel forms it
    exact = (a64 @ b64) * alpha + bias.double()
    magnitude = (a64.abs() @ b64.abs()) * alpha
    del a64, b64
    tol = (2 * k * 2.0**-24 * magnitude + 4 * 2.0**-24 * exact.abs() + exact.abs() * torch.finfo(torch.bfloat16).eps / 2
           + torch.finfo(torch.bfloat16).smallest_normal)
    del magnitude
    out = {}
    for cfg in configs:
        c = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        cg.gemm_dense(a, b_kn, d_a, d_b, bias, torch.bfloat16, config=cfg, out=c)
        torch.cuda.synchronize()
        unwritten = int(torch.isnan(c).sum())
        worst = float(((c.double() - exact).abs() / tol).max())
        rel = float((c.double() - exact).norm() / exact.norm())
        same = True
        if cfg.schedule != "dp":
            c2 = torch.full_like(c, float("nan"))
            cg.gemm_dense(a, b_kn, d_a, d_b, bias, torch.bfloat16, config=cfg, out=c2)
            same = bool(torch.equal(c, c2))
        ok = unwritten == 0 and worst <= 1.0 and same
        out[cfg.name()] = dict(ok=ok, worst_over_bound=worst, rel=rel, unwritten=unwritten, repeatable=same)
        if not ok:
            print(f"  FAIL {cfg.name()}: unwritten {unwritten}, worst {worst:.3g}x bound, repeatable {same}", flush=True)
    del exact, tol
    return out


def bench_shape(name, m, n, k, layout, configs, rep) -> dict:
    flop = 2.0 * m * n * k
    sets = [operands(m, n, k, layout, 100 + i) for i in range(N_SETS)]
    sets_bf = [(a.to(torch.bfloat16), (b.t().to(torch.bfloat16).t() if layout == "nk" else b.to(torch.bfloat16)))
               for a, b in sets]
    d_a = torch.rand((), device="cuda") + 0.5
    d_b = torch.rand((), device="cuda") + 0.5
    outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(N_SETS)]
    row = dict(name=name, M=m, N=n, K=k, layout=layout)
    row["cublas_bf16_ms"] = graph_ms(lambda i: torch.mm(*sets_bf[i], out=outs[i]), N_SETS, rep)
    row["cublas_fp32out_ms"] = graph_ms(lambda i: torch.mm(*sets[i], out_dtype=torch.float32), N_SETS, rep)
    row["configs"] = {}
    for cfg in configs:
        try:
            ms = graph_ms(lambda i, c=cfg: cg.gemm_dense(*sets[i], d_a, d_b, None, torch.bfloat16, config=c,
                                                          out=outs[i]), N_SETS, rep)
        except Exception as exc:  # a configuration that does not compile or launch: record, go on
            print(f"  {name}: {cfg.name()} failed: {exc!r}"[:300], flush=True)
            continue
        row["configs"][cfg.name()] = ms
    for key in ("cublas_bf16_ms", "cublas_fp32out_ms"):
        row[key.replace("_ms", "_tflops")] = flop / row[key] / 1e9
    if row["configs"]:
        best = min(row["configs"], key=row["configs"].get)
        row["best"] = best
        row["best_ms"] = row["configs"][best]
        # the spread: cuBLAS bf16 and the best configuration timed a second time
        cfg = next(c for c in configs if c.name() == best)
        row["cublas_bf16_ms_again"] = graph_ms(lambda i: torch.mm(*sets_bf[i], out=outs[i]), N_SETS, rep)
        row["best_ms_again"] = graph_ms(lambda i: cg.gemm_dense(*sets[i], d_a, d_b, None, torch.bfloat16, config=cfg,
                                                                out=outs[i]), N_SETS, rep)
        row["best_tflops"] = flop / row["best_ms"] / 1e9
        row["best_pct_of_bf16"] = 100 * row["cublas_bf16_ms"] / row["best_ms"]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="time every candidate configuration, not only the chosen one")
    ap.add_argument("--shapes", default="", help="comma-separated shape names (default: all)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms) per timing")
    args = ap.parse_args()
    shapes = [s for s in SHAPES if not args.shapes or s[0] in args.shapes.split(",")]
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    RESULTS.update(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   cuda=torch.version.cuda, sms=nsm, sweep=args.sweep)
    print(f"{RESULTS['gpu']}, torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
          f"{nsm} SMs, {RESULTS['date']}", flush=True)
    failed = False
    rows = []
    for si, (name, m, n, k, layout) in enumerate(shapes):
        torch.cuda.empty_cache()  # the previous shape's inputs
        chosen = cg._default_dense_config(m, n, k, layout == "kn", nsm)
        configs = list(sweep_for(name)) if args.sweep else [chosen]
        if chosen not in configs:
            configs.append(chosen)
        try:
            checks = check(m, n, k, layout, configs, seed=si)
        except Exception:
            traceback.print_exc()
            failed = True
            continue
        good = [c for c in configs if checks[c.name()]["ok"]]
        failed |= len(good) != len(configs)
        row = bench_shape(name, m, n, k, layout, good, args.rep)
        row["checks"] = checks
        row["chosen"] = chosen.name()
        row["chosen_ms"] = row["configs"].get(chosen.name())
        rows.append(row)
        cfg_txt = "  ".join(f"{c}: {2e-9 * m * n * k / ms:.0f}" for c, ms in row["configs"].items())
        print(f"{name:11s} bf16 {row['cublas_bf16_tflops']:.0f}  fp32out {row['cublas_fp32out_tflops']:.0f}  "
              f"|  {cfg_txt}", flush=True)
    RESULTS["rows"] = rows

    print("\nTFLOP/s (CUDA-graph replays, 3 rotated input sets; % = cuBLAS bf16 time / this time)")
    print("(again: cuBLAS bf16 and the best configuration timed a second time, after the sweep)")
    print(f"{'GEMM':11s} {'M':>5s} {'N':>5s} {'K':>5s} {'B':>3s} {'bf16 mm':>8s} {'again':>6s} {'mm->fp32':>9s} "
          f"{'%bf16':>6s} {'gemm_dense':>10s} {'again':>6s} {'%bf16':>6s}  best configuration (chosen: %bf16)")
    for r in rows:
        flop = 2e-9 * r["M"] * r["N"] * r["K"]
        fp32_pct = 100 * r["cublas_bf16_ms"] / r["cublas_fp32out_ms"]
        chosen_pct = (f"{100 * r['cublas_bf16_ms'] / r['chosen_ms']:.0f}%" if r.get("chosen_ms") else "-")

        def again(key, r=r, flop=flop):
            return f"{flop / r[key]:6.0f}" if r.get(key) else "     -"

        print(f"{r['name']:11s} {r['M']:5d} {r['N']:5d} {r['K']:5d} {r['layout']:>3s} {r['cublas_bf16_tflops']:8.0f} "
              f"{again('cublas_bf16_ms_again')} {r['cublas_fp32out_tflops']:9.0f} {fp32_pct:5.0f}% "
              f"{r.get('best_tflops', 0):10.0f} {again('best_ms_again')} {r.get('best_pct_of_bf16', 0):5.0f}%  "
              f"{r.get('best', '-')} ({r['chosen']}: {chosen_pct})")
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "bench_gemm_dense.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)
    print("correctness:", "FAILED (see above)" if failed else "all configurations passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
