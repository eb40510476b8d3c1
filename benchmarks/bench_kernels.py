"""Issue 5 kernels on the GPU: correctness first, then quantize bandwidth and GEMM TFLOP/s side by side.

    PYTHONPATH=. python3 benchmarks/bench_kernels.py [--quick] [--tiles]

Timings: triton.testing.do_bench (CUDA events, median), inputs rotated among several copies so that L2 does
not flatter. Quantize "effective" bandwidth counts the fewest bytes a quantization must move: the input read
once, codes + scale bytes (+ the fp16 operand where written) written once. Prints tables; writes JSON to
$OUT/bench_kernels.json when OUT is set.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys
import traceback

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from fp4compile.codegen import gemm as cg
from fp4compile.codegen import quantize as cq
from fp4compile.numerics.api import check_quantize_args
from fp4compile.numerics.formats import NVFP4, Rounding
from fp4compile.numerics.reference import quantize_reference

RESULTS: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def median_ms(fn, rotate: int = 1) -> float:
    """Median time of one call of ``fn(i)``, i cycling over ``rotate`` input sets."""
    counter = itertools.count()
    return do_bench(lambda: fn(next(counter) % rotate), warmup=25, rep=200, return_mode="median")


# ---------------------------------------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------------------------------------

def check_quantize(x: torch.Tensor) -> list[str]:
    """Bit-exactness of every variant against the reference (on the GPU) at full size."""
    lines = []
    cases = {
        "rtn_1x16": dict(block=None, rounding="nearest", hadamard=False, view=x),
        "sr_1x16": dict(block=None, rounding="stochastic", hadamard=False, view=x),
        "rtn_2d_16x16": dict(block=(16, 16), rounding="nearest", hadamard=False, view=x),
        "sr_hadamard_colwise": dict(block=None, rounding="stochastic", hadamard=True, view=x.t()),
        "rtn_hadamard_colwise": dict(block=None, rounding="nearest", hadamard=True, view=x.t()),
        "mxfp4": dict(block=None, rounding="nearest", hadamard=False, view=x, format="mxfp4"),
    }
    for name, c in cases.items():
        a = check_quantize_args(c["view"], c.get("format", "nvfp4"), c["block"], c["rounding"], c["hadamard"])
        args = (c["view"], a.format, a.block, a.rounding, 42, 1000, a.hadamard)
        ref = quantize_reference(*args)
        tri = cq.quantize_triton(*args)
        ok = (torch.equal(ref.qdata, tri.qdata) and torch.equal(ref.scale.view(torch.uint8), tri.scale.view(torch.uint8))
              and torch.equal(ref.per_tensor_scale, tri.per_tensor_scale))
        lines.append(f"quantize {name:24s} bit-exact: {ok}")
        if not ok:
            raise SystemExit(f"quantize {name} is not bit-exact: stop before timing")
    return lines


def check_gemm(m: int, n: int, k: int) -> list[str]:
    lines = []
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    qa = cq.quantize_triton(x, NVFP4, (1, 16), Rounding.NEAREST)
    qb = cq.quantize_triton(w, NVFP4, (16, 16), Rounding.NEAREST)
    au = qa.dequantize_unscaled().double()
    bu = qb.dequantize_unscaled().double()
    exact = (au @ bu.t()) * (qa.per_tensor_scale * qb.per_tensor_scale).double()
    for path in ("cublas_dequant", "triton_dequant", "triton_packed", "triton_fused_quant"):
        c = cg.gemm_quantize_a(x, qb) if path == "triton_fused_quant" else cg.gemm(qa, qb, path=path)
        rel = ((c.double() - exact).norm() / exact.norm()).item()
        lines.append(f"gemm {path:20s} {m}x{n}x{k} rel err vs float64: {rel:.2e}")
        if not rel < 1e-5:
            raise SystemExit(f"gemm {path} error {rel}: stop before timing")
    return lines


# ---------------------------------------------------------------------------------------------------------
# Quantize bandwidth
# ---------------------------------------------------------------------------------------------------------

def bench_quantize(rows: int, cols: int, tiles: bool) -> list[dict]:
    n_sets = 3
    xs = [torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) for _ in range(n_sets)]
    amaxes = [x.float().abs().max() for x in xs]
    amaxes_h = [cq.tensor_amax_triton(x.t(), hadamard=True) for x in xs]
    numel = rows * cols
    base_bytes = numel * 2 + numel // 2 + numel // 16 + 4  # read bf16, write codes + E4M3 scales (+ D)
    variants = {
        "RTN 1x16": dict(view=lambda i: xs[i], block=(1, 16), rnd=Rounding.NEAREST, had=False, amax=amaxes),
        "SR 1x16": dict(view=lambda i: xs[i], block=(1, 16), rnd=Rounding.STOCHASTIC, had=False, amax=amaxes),
        "2D 16x16": dict(view=lambda i: xs[i], block=(16, 16), rnd=Rounding.NEAREST, had=False, amax=amaxes,
                         scale_bytes=numel // 256),
        "Hadamard+colwise SR": dict(view=lambda i: xs[i].t(), block=(1, 16), rnd=Rounding.STOCHASTIC, had=True,
                                    amax=amaxes_h),
        "Hadamard+colwise RTN": dict(view=lambda i: xs[i].t(), block=(1, 16), rnd=Rounding.NEAREST, had=True,
                                     amax=amaxes_h),
        "RTN 1x16 + fp16 operand": dict(view=lambda i: xs[i], block=(1, 16), rnd=Rounding.NEAREST, had=False,
                                        amax=amaxes, deq=torch.float16),
    }
    out = []
    tile_options = [None]
    if tiles:
        tile_options = [(32, 128, 4), (16, 256, 4), (64, 64, 4), (8, 512, 4), (16, 512, 8), (32, 256, 8),
                        (8, 256, 2), (16, 128, 2), (32, 64, 2), (64, 128, 8), (128, 64, 8)]
    for name, v in variants.items():
        nbytes = base_bytes
        if "scale_bytes" in v:
            nbytes = base_bytes - numel // 16 + v["scale_bytes"]
        if v.get("deq"):
            nbytes += numel * 2
        best = None
        for tile in tile_options:
            fn_q = lambda i, t=tile: cq.quantize_triton(v["view"](i), NVFP4, v["block"], v["rnd"], 1, 0, v["had"],
                                                        v.get("deq"), amax=v["amax"][i], _tile=t)
            ms_q = median_ms(fn_q, n_sets)
            if best is None or ms_q < best[1]:
                best = (tile, ms_q)
        tile, ms_q = best
        fn_full = lambda i: cq.quantize_triton(v["view"](i), NVFP4, v["block"], v["rnd"], 1, 0, v["had"], v.get("deq"),
                                               _tile=tile)
        ms_full = median_ms(fn_full, n_sets)
        fn_amax = lambda i: cq.tensor_amax_triton(v["view"](i), hadamard=v["had"])
        ms_amax = median_ms(fn_amax, n_sets)
        out.append(dict(variant=name, tile=tile, bytes=nbytes, ms_amax_plus_quantize=ms_full, ms_quantize_pass=ms_q,
                        ms_amax_pass=ms_amax, tbps_full=nbytes / ms_full / 1e9, tbps_quantize_pass=nbytes / ms_q / 1e9))
    return out


def bench_copy() -> float:
    x = torch.empty(1 << 28, device="cuda", dtype=torch.float32)  # 1 GiB
    y = torch.empty_like(x)
    ms = median_ms(lambda i: y.copy_(x))
    return 2 * x.numel() * 4 / ms / 1e9


# ---------------------------------------------------------------------------------------------------------
# GEMM
# ---------------------------------------------------------------------------------------------------------

@triton.jit
def _mxfp4_dot_scaled_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """MXFP4 x MXFP4 through tl.dot_scaled (Triton upcasts to bf16 on Hopper), for comparison only."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk2 = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        rks = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        a = tl.load(a_ptr + rm[:, None] * (K // 2) + rk2[None, :])
        a_s = tl.load(as_ptr + rm[:, None] * (K // 32) + rks[None, :])
        b = tl.load(b_ptr + rk2[:, None] * N + rn[None, :])  # (K/2, N), packed along K
        b_s = tl.load(bs_ptr + rn[:, None] * (K // 32) + rks[None, :])
        acc = tl.dot_scaled(a, a_s, "e2m1", b, b_s, "e2m1", acc)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc)


def bench_dot_scaled(m: int, n: int, k: int) -> dict:
    try:
        a = torch.randint(0, 256, (m, k // 2), device="cuda", dtype=torch.uint8)
        a_s = torch.randint(120, 130, (m, k // 32), device="cuda", dtype=torch.uint8)
        b = torch.randint(0, 256, (k // 2, n), device="cuda", dtype=torch.uint8)
        b_s = torch.randint(120, 130, (n, k // 32), device="cuda", dtype=torch.uint8)
        c = torch.empty(m, n, device="cuda", dtype=torch.float32)
        grid = (m // 128, n // 128)
        run = lambda i: _mxfp4_dot_scaled_kernel[grid](a, a_s, b, b_s, c, m, n, k, 128, 128, 128, num_warps=8,
                                                       num_stages=3)
        ms = median_ms(run)
        return dict(ms=ms, tflops=2 * m * n * k / ms / 1e9)
    except Exception as exc:  # report, never stop the benchmark
        return dict(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")


GEMM_SHAPES = [
    # (name, M, N, K, layout): C (M, N) with reduction K
    ("square", 8192, 8192, 8192, "forward"),
    ("qkv fwd", 8192, 2304, 768, "forward"),
    ("proj fwd", 8192, 768, 768, "forward"),
    ("fc1 fwd", 8192, 3072, 768, "forward"),
    ("fc2 fwd", 8192, 768, 3072, "forward"),
    ("qkv dgrad", 8192, 768, 2304, "input_grad"),
    ("fc1 dgrad", 8192, 768, 3072, "input_grad"),
    ("fc2 dgrad", 8192, 3072, 768, "input_grad"),
    ("qkv wgrad", 2304, 768, 8192, "weight_grad"),
    ("fc1 wgrad", 3072, 768, 8192, "weight_grad"),
    ("fc2 wgrad", 768, 3072, 8192, "weight_grad"),
    ("proj wgrad", 768, 768, 8192, "weight_grad"),
]


def bench_gemm(shapes) -> list[dict]:
    out = []
    n_sets = 3
    for name, m, n, k, layout in shapes:
        sets = []
        for _ in range(n_sets):
            if layout == "forward":  # x (M, K) . W (N, K)
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
                qa, a16 = cq.quantize_triton(x, NVFP4, (1, 16), Rounding.NEAREST, dequantized_dtype=torch.float16)
                qb, b16 = cq.quantize_triton(w, NVFP4, (16, 16), Rounding.NEAREST, dequantized_dtype=torch.float16)
                bt, bf = False, (x, w.t())
            elif layout == "input_grad":  # dy (M, K=N_out) . W stored (K, N)
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                w = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
                qa, a16 = cq.quantize_triton(x, NVFP4, (1, 16), Rounding.STOCHASTIC, 1, 0,
                                             dequantized_dtype=torch.float16)
                qb, b16 = cq.quantize_triton(w, NVFP4, (16, 16), Rounding.NEAREST, dequantized_dtype=torch.float16)
                bt, bf = True, (x, w)
            else:  # dy^T (M=N_out, K=tokens) . x^T (N=N_in, K=tokens), both read column-wise from row-major
                dy = torch.randn(k, m, device="cuda", dtype=torch.bfloat16)
                xx = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
                qa, a16 = cq.quantize_triton(dy.t(), NVFP4, (1, 16), Rounding.STOCHASTIC, 1, 0, True,
                                             dequantized_dtype=torch.float16)
                qb, b16 = cq.quantize_triton(xx.t(), NVFP4, (1, 16), Rounding.NEAREST, 0, 0, True,
                                             dequantized_dtype=torch.float16)
                x = None
                bt, bf = False, (dy.t(), xx)
            sets.append(dict(qa=qa, qb=qb, a16=a16, b16=b16, x=x, bt=bt, bf=bf,
                             amax=cq.tensor_amax_triton(x) if x is not None else None))
        flops = 2 * m * n * k
        row = dict(shape=name, m=m, n=n, k=k, layout=layout)
        ms = median_ms(lambda i: torch.mm(*sets[i]["bf"]), n_sets)
        row["cublas_bf16"] = flops / ms / 1e9
        for path in ("cublas_dequant", "triton_dequant", "triton_packed", "triton_fused_quant"):
            if path == "triton_fused_quant" and layout == "weight_grad":
                continue  # both operands need the RHT along tokens: not a prologue quantization
            try:
                if path == "triton_fused_quant":
                    fn = lambda i: cg.gemm_quantize_a(sets[i]["x"], sets[i]["qb"], sets[i]["bt"],
                                                      b_dequantized=sets[i]["b16"], amax=sets[i]["amax"])
                else:
                    fn = lambda i, p=path: cg.gemm(sets[i]["qa"], sets[i]["qb"], sets[i]["bt"], path=p,
                                                   a_dequantized=sets[i]["a16"], b_dequantized=sets[i]["b16"])
                fn(0)
                torch.cuda.synchronize()
                ms = median_ms(fn, n_sets)
                row[path] = flops / ms / 1e9
            except Exception as exc:
                row[path] = None
                row[path + "_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        paths = [p for p in ("cublas_dequant", "triton_dequant", "triton_packed") if row.get(p)]
        row["best_path"] = max(paths, key=lambda p: row[p])
        row["best_pct_of_bf16"] = 100 * row[row["best_path"]] / row["cublas_bf16"]
        row["dot_scaled_mxfp4"] = None
        out.append(row)
        del sets
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer GEMM shapes")
    parser.add_argument("--tiles", action="store_true", help="sweep quantize tile shapes")
    parser.add_argument("--quantize-only", action="store_true", help="skip the GEMM part")
    args = parser.parse_args()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    RESULTS.update(gpu=props.name, torch=torch.__version__, triton=triton.__version__, command=" ".join(sys.argv))
    print(f"{RESULTS['date']}  {props.name}  torch {torch.__version__}  triton {triton.__version__}", flush=True)

    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) * 3
    x[17, 4242] = 1e4
    lines = check_quantize(x) + check_gemm(8192, 3072, 768)
    print("\n".join(lines), flush=True)
    RESULTS["correctness"] = lines
    del x

    RESULTS["copy_tbps"] = bench_copy()
    print(f"device copy: {RESULTS['copy_tbps']:.2f} TB/s (read + write)", flush=True)
    q = bench_quantize(8192, 8192, args.tiles)
    RESULTS["quantize"] = q
    print("\nquantize 8192x8192 bf16 (effective TB/s = minimal bytes / time)")
    print(f"{'variant':26s} {'tile':>14s} {'amax+quant us':>14s} {'TB/s':>6s} {'quant pass us':>14s} {'TB/s':>6s} "
          f"{'amax us':>8s}")
    for r in q:
        print(f"{r['variant']:26s} {str(r['tile']):>14s} {1e3 * r['ms_amax_plus_quantize']:14.1f} {r['tbps_full']:6.2f} "
              f"{1e3 * r['ms_quantize_pass']:14.1f} {r['tbps_quantize_pass']:6.2f} {1e3 * r['ms_amax_pass']:8.1f}",
              flush=True)

    for key, kern in (("quantize", cq._quantize_kernel), ("amax", cq._amax_kernel)):
        try:
            for caches in kern.device_caches.values():
                for variant in caches[0].values():
                    print(f"  compiled {key}: {variant.n_regs} registers, {variant.n_spills} spills, "
                          f"{variant.metadata.num_warps} warps")
        except Exception as exc:
            print(f"  (no register report: {exc})")
    if args.quantize_only:
        return
    shapes = GEMM_SHAPES[:3] if args.quick else GEMM_SHAPES
    g = bench_gemm(shapes)
    for row in g:
        if row["shape"] in ("square", "qkv fwd", "fc1 fwd"):
            row["dot_scaled_mxfp4"] = bench_dot_scaled(row["m"], row["n"], row["k"])
    RESULTS["gemm"] = g
    print("\nGEMM TFLOP/s (operands already quantized; fused = quantize x inside the GEMM, amax given)")
    hdr = f"{'shape':11s} {'M':>5s} {'N':>5s} {'K':>5s} {'bf16':>6s} {'cublas_dq':>9s} {'triton_dq':>9s} " \
          f"{'packed':>7s} {'fused':>6s} {'best':>15s} {'%bf16':>6s} {'dot_scaled':>10s}"
    print(hdr)
    fmt = lambda v: f"{v:.0f}" if isinstance(v, float) else "-"  # noqa: E731
    for r in g:
        ds = r["dot_scaled_mxfp4"]
        ds_s = "-" if ds is None else (f"{ds['tflops']:.0f}" if "tflops" in ds else "error")
        print(f"{r['shape']:11s} {r['m']:5d} {r['n']:5d} {r['k']:5d} {fmt(r['cublas_bf16']):>6s} "
              f"{fmt(r.get('cublas_dequant')):>9s} {fmt(r.get('triton_dequant')):>9s} {fmt(r.get('triton_packed')):>7s} "
              f"{fmt(r.get('triton_fused_quant')):>6s} {r['best_path']:>15s} {r['best_pct_of_bf16']:6.1f} {ds_s:>10s}")
    for r in g:
        for key, val in r.items():
            if key.endswith("_error") or (key == "dot_scaled_mxfp4" and val and "error" in val):
                print(f"  {r['shape']} {key}: {val}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_kernels.json"), "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except Exception:
        traceback.print_exc()
        raise
