"""The FP4 GEMM paths at the training shapes of a GPT block, against cuBLAS BF16 and the FP8 tensor-core ceiling.

    PYTHONPATH=. python3 benchmarks/bench_gemm_shapes.py                   # d=2048, 8192 tokens (batch 4 x 2048)
    PYTHONPATH=. python3 benchmarks/bench_gemm_shapes.py --d 768 --tokens 8192 --paths all --rep 100

Shapes: for each linear layer of a GPT block of width d (qkv d -> 3d, proj d -> d, fc d -> 4d, fc-proj 4d -> d)
its forward ``(M, N, K) = (tokens, out, in)`` (B = W stored (N, K)), input-gradient ``(tokens, in, out)``
(B = W stored (K, N)) and weight-gradient ``(out, in, tokens)`` (both operands stored along tokens) GEMM.

Columns, all GPU time from CUDA-graph replays with the inputs rotated over 3 sets (`timing.graph_ms`, so L2 does
not hold the next call's operands), bf16 output everywhere:
- ``bf16``: cuBLAS ``torch.mm`` on bf16 operands in the same layouts: the baseline of every ratio;
- ``fp8 tw`` / ``fp8 rw``: ``torch._scaled_mm`` on float8_e4m3fn operands with tensor-wise / row-wise scales
  (A row-major, B column-major, cuBLAS's only FP8 layout on Hopper): what Hopper's FP8 tensor cores give, the
  ceiling no exact NVFP4 emulation reaches (docs/benchmarks.md, "What Hopper's tensor cores allow");
- the FP4 paths on operands already quantized (the exact fp16 operands ``E2M1 * d_b`` the quantize kernels
  write), with ``alpha = D_a * D_b`` and the cast fused or not:
  ``graph_mm`` cuBLAS ``mm(fp16, fp16, out_dtype=float32)`` then ``* alpha`` and the cast as a second pass (in the
  training step Inductor fuses that pass into the next kernel, so this is an upper bound of its cost);
  ``triton_dequant`` the host-descriptor TMA GEMM (`gemm_dense`, its table configuration, cut schedules for the
  weight gradients); ``triton_traced`` the device-descriptor TMA GEMM (`gemm_dense_device`, data-parallel), the
  path the plain backend now takes for the forward and input-gradient GEMMs;
  with ``--paths all`` also ``triton_packed`` (packed codes and scale bytes dequantized in registers).

Correctness first: every FP4 path's result is compared with the float64 product of the same exact operands
(error within the FP32-accumulation bound plus half a bf16 ulp), and the device-descriptor GEMM with the
host-descriptor one for the same data-parallel configuration (same bits). A failing path is reported and not
timed. Prints a table (ms, TFLOP/s, time / bf16 time); JSON to $OUT/bench_gemm_shapes.json when OUT is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

from fp4compile.codegen import gemm as cg
from fp4compile.codegen.gemm_device_tma import device_config, gemm_dense_device
from fp4compile.numerics.formats import NVFP4, Rounding

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import graph_ms  # noqa: E402

N_SETS = 3
FP4_PATHS = ("graph_mm", "triton_dequant", "triton_traced")


def gpt_block_shapes(d: int, tokens: int) -> list[tuple[str, int, int, int, str]]:
    """(name, M, N, K, B layout) of the three GEMMs of each linear layer of a GPT block of width ``d``:
    ``"nk"`` B stored (N, K) (read transposed), ``"kn"`` B stored (K, N)."""
    shapes = []
    for layer, (k_in, n_out) in {"qkv": (d, 3 * d), "proj": (d, d), "fc": (d, 4 * d), "fc-proj": (4 * d, d)}.items():
        shapes += [(f"{layer} fwd", tokens, n_out, k_in, "nk"), (f"{layer} dgrad", tokens, k_in, n_out, "kn"),
                   (f"{layer} wgrad", n_out, k_in, tokens, "nk")]
    return shapes


def _exact_operand(rows: int, cols: int, seed: int) -> torch.Tensor:
    """An exact NVFP4 operand ``E2M1 * d_b`` in fp16, as the quantize kernels write it (1x16 blocks)."""
    from fp4compile.codegen.quantize import quantize_triton

    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, cols, device="cuda", generator=g, dtype=torch.bfloat16)
    _, x16 = quantize_triton(x, NVFP4, (1, 16), Rounding.NEAREST, dequantized_dtype=torch.float16)
    return x16


@dataclasses.dataclass
class Operands:
    a16: torch.Tensor  # (M, K)
    b_kn: torch.Tensor  # logical (K, N): row-major (K, N) for "kn", the .t() of a row-major (N, K) for "nk"
    a_bf: torch.Tensor
    b_bf: torch.Tensor
    a8: torch.Tensor  # float8_e4m3fn (M, K) row-major
    b8: torch.Tensor  # float8_e4m3fn logical (K, N), column-major


def make_operands(m: int, n: int, k: int, layout: str, seed: int) -> Operands:
    a16 = _exact_operand(m, k, seed)
    b_kn = _exact_operand(k, n, seed + 1) if layout == "kn" else _exact_operand(n, k, seed + 1).t()
    b_bf = b_kn.to(torch.bfloat16) if layout == "kn" else b_kn.t().to(torch.bfloat16).t()
    # Within E4M3's range (|x| <= 448; the exact operands reach 6 * 448): the values do not change the timing.
    a8 = (a16 * (400 / a16.abs().max())).to(torch.float8_e4m3fn)
    b8 = (b_kn.t() * (400 / b_kn.abs().max())).contiguous().to(torch.float8_e4m3fn).t()  # column-major (K, N)
    return Operands(a16, b_kn, a16.to(torch.bfloat16), b_bf, a8, b8)


def fp4_runner(path: str, ops: Operands, d_a, d_b, num_progs: int):
    m, k = ops.a16.shape
    n = ops.b_kn.shape[1]
    if path == "graph_mm":
        return lambda: (torch.mm(ops.a16, ops.b_kn, out_dtype=torch.float32) * (d_a * d_b)).to(torch.bfloat16)
    if path == "triton_dequant":
        return lambda: cg.gemm_dense(ops.a16, ops.b_kn, d_a, d_b, None, torch.bfloat16)
    if path == "triton_traced":
        cfg = device_config(m, n, k, ops.b_kn.stride(1) == 1, torch.bfloat16, num_progs)
        return lambda: gemm_dense_device(ops.a16, ops.b_kn, d_a, d_b, None, torch.bfloat16, config=cfg)
    if path in ("triton_packed", "packed_check"):
        qa, qb = _packed(ops)
        # packed_check: the same quantized operands through cuBLAS, the oracle of the packed path's check.
        chosen = "triton_packed" if path == "triton_packed" else "cublas_dequant"
        return lambda: cg.gemm(qa, qb, False, None, torch.bfloat16, path=chosen)
    raise ValueError(path)


def _packed(ops: Operands):
    """Packed NVFP4 operands (codes and scale bytes) for the packed path: the exact operands quantized anew (their
    own tensor and block scales), B as (N, K)."""
    from fp4compile.codegen.quantize import quantize_triton

    b_nk = ops.b_kn.t()
    b_nk = b_nk if b_nk.stride(1) == 1 else b_nk.contiguous()
    return (quantize_triton(ops.a16, NVFP4, (1, 16), Rounding.NEAREST),
            quantize_triton(b_nk, NVFP4, (1, 16), Rounding.NEAREST))


def check_fp4(path: str, out: torch.Tensor, ops: Operands, d_a, d_b) -> tuple[bool, float]:
    """Error over the FP32-accumulation bound (<= 1 passes), as benchmarks/bench_gemm_dense.py."""
    k = ops.a16.shape[1]
    a64, b64 = ops.a16.double(), ops.b_kn.double()
    alpha = (d_a * d_b).double()
    exact = (a64 @ b64) * alpha
    tol = (2 * k * 2.0**-24 * (a64.abs() @ b64.abs()) * alpha + 4 * 2.0**-24 * exact.abs()
           + exact.abs() * torch.finfo(torch.bfloat16).eps / 2 + torch.finfo(torch.bfloat16).smallest_normal)
    worst = float(((out.double() - exact).abs() / tol).max())
    return worst <= 1.0 and not bool(torch.isnan(out).any()), worst


def fp8_runner(kind: str, ops: Operands):
    m, n = ops.a8.shape[0], ops.b8.shape[1]
    if kind == "tw":
        sa = torch.tensor(1.0, device="cuda")
        sb = torch.tensor(1.0, device="cuda")
    else:
        sa = torch.ones(m, 1, device="cuda")
        sb = torch.ones(1, n, device="cuda")
    return lambda: torch._scaled_mm(ops.a8, ops.b8, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)


def bench_shape(name, m, n, k, layout, paths, rep, num_progs) -> dict:
    flop = 2.0 * m * n * k
    sets = [make_operands(m, n, k, layout, 100 + 2 * i) for i in range(N_SETS)]
    d_a = torch.tensor(0.75, device="cuda")
    d_b = torch.tensor(1.5e-3, device="cuda")
    row = dict(name=name, m=m, n=n, k=k, layout=layout, ms={}, ok={}, note={})

    def timed(label, make):
        try:
            fns = [make(s) for s in sets]
            row["ms"][label] = graph_ms(lambda i: fns[i](), N_SETS, rep=rep)
        except Exception as exc:  # report and go on: one path failing must not hide the others
            row["note"][label] = f"{type(exc).__name__}: {exc}"[:200]
            print(f"  {name} {label}: {row['note'][label]}", flush=True)

    timed("bf16", lambda s: (lambda: torch.mm(s.a_bf, s.b_bf)))
    timed("fp8 tw", lambda s: fp8_runner("tw", s))
    timed("fp8 rw", lambda s: fp8_runner("rw", s))
    host_bits = None
    for path in paths:
        try:
            out = fp4_runner(path, sets[0], d_a, d_b, num_progs)()
            torch.cuda.synchronize()
            if path == "triton_packed":  # its own operands: against cuBLAS on them, FP32 summation order apart
                oracle = fp4_runner("packed_check", sets[0], d_a, d_b, num_progs)().float()
                worst = float((out.float() - oracle).norm() / oracle.norm())
                ok = worst <= 1e-3  # bf16 outputs of two FP32 sums of the same exact products
            else:
                ok, worst = check_fp4(path, out, sets[0], d_a, d_b)
            if path == "triton_dequant":
                host_cfg = device_config(m, n, k, layout == "kn", torch.bfloat16, num_progs)
                host_bits = cg.gemm_dense(sets[0].a16, sets[0].b_kn, d_a, d_b, None, torch.bfloat16, config=host_cfg)
            if path == "triton_traced" and host_bits is not None and not torch.equal(out, host_bits):
                ok = False
                row["note"][path] = "bits differ from the host-descriptor kernel with the same configuration"
        except Exception as exc:
            ok, worst = False, float("nan")
            row["note"][path] = f"{type(exc).__name__}: {exc}"[:200]
        row["ok"][path] = ok
        if not ok:
            print(f"  FAIL {name} {path}: worst {worst:.3g}x bound {row['note'].get(path, '')}", flush=True)
            continue
        timed(path, lambda s, p=path: fp4_runner(p, s, d_a, d_b, num_progs))
    row["tflops"] = {label: flop / (ms * 1e-3) / 1e12 for label, ms in row["ms"].items()}
    sets.clear()
    torch.cuda.empty_cache()
    return row


def print_table(rows, labels) -> None:
    print(f"\n{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {__import__('triton').__version__}")
    print("ms, TFLOP/s, and time / bf16 time (x; < 1 is faster than cuBLAS bf16); '-' not run or failed")
    head = f"{'GEMM':14s} {'M':>6s} {'N':>6s} {'K':>6s}"
    for label in labels:
        head += f" | {label:>22s}"
    print(head)
    totals = {label: 0.0 for label in labels}
    for r in rows:
        line = f"{r['name']:14s} {r['m']:6d} {r['n']:6d} {r['k']:6d}"
        base = r["ms"].get("bf16")
        for label in labels:
            ms = r["ms"].get(label)
            if ms is None:
                line += f" | {'-':>22s}"
                totals[label] = float("nan")
                continue
            totals[label] += ms
            ratio = ms / base if base else float("nan")
            line += f" | {ms:7.3f} {r['tflops'][label]:6.0f} {ratio:6.2f}x"
        print(line)
    line = f"{'sum':14s} {'':>6s} {'':>6s} {'':>6s}"
    for label in labels:
        ratio = totals[label] / totals["bf16"] if totals.get("bf16") else float("nan")
        line += f" | {totals[label]:7.3f} {'':6s} {ratio:6.2f}x"
    print(line)
    for mode, picked in picked_sums(rows).items():
        print(f"the GEMMs above on the paths the backend picks {mode}: {picked}")


def picked_path(m: int, n: int, k: int, cudagraphs: bool) -> str:
    """The path `choose_gemm_paths` takes on sm_90 for an (M, N, K) GEMM (where the traced GEMM is available):
    the TMA GEMM where the reduction is no longer than an output side, cuBLAS as graph ops elsewhere."""
    if k <= max(m, n):
        return "triton_dequant" if cudagraphs else "triton_traced"
    return "graph_mm"


def picked_sums(rows) -> dict:
    """Summed time of each mode's picked paths over the shapes against cuBLAS BF16's, as text."""
    out = {}
    for mode, cudagraphs in (("without CUDA graphs", False), ("with CUDA graphs", True)):
        ms = [r["ms"].get(picked_path(r["m"], r["n"], r["k"], cudagraphs)) for r in rows]
        base = [r["ms"].get("bf16") for r in rows]
        if None in ms or None in base:
            out[mode] = "not all timed"
        else:
            out[mode] = f"{sum(ms):.3f} ms, {sum(ms) / sum(base):.2f}x cuBLAS bf16's {sum(base):.3f} ms"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=2048, help="model width")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch x sequence)")
    p.add_argument("--paths", default="default", help="'default' (" + ",".join(FP4_PATHS) + "), 'all', or a list")
    p.add_argument("--rep", type=int, default=100, help="ms of replays per timing")
    p.add_argument("--only", default="", help="comma-separated GEMM names (e.g. 'fc fwd,fc wgrad')")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gemm_shapes needs a CUDA device")
    paths = {"default": FP4_PATHS, "all": (*FP4_PATHS, "triton_packed")}.get(args.paths) or tuple(
        args.paths.split(","))
    num_progs = torch.cuda.get_device_properties(0).multi_processor_count
    shapes = gpt_block_shapes(args.d, args.tokens)
    if args.only:
        wanted = {s.strip() for s in args.only.split(",")}
        shapes = [s for s in shapes if s[0] in wanted]
    rows = []
    for shape in shapes:
        rows.append(bench_shape(*shape, paths, args.rep, num_progs))
        r = rows[-1]
        print(json.dumps({k: r[k] for k in ("name", "ms", "ok", "note")}), flush=True)
    print_table(rows, ["bf16", "fp8 tw", "fp8 rw", *paths])
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_gemm_shapes.json"), "w") as f:
            json.dump(dict(d=args.d, tokens=args.tokens, device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
