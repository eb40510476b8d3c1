"""The quantize and GEMM kernels on the GPU: correctness first, then quantize bandwidth and GEMM TFLOP/s side by side.

    PYTHONPATH=. python3 benchmarks/bench_kernels.py [--quick] [--tiles] [--quantize-only] [--before OLD_QUANTIZE_PY]
    PYTHONPATH=. python3 benchmarks/bench_kernels.py --sr [--before OLD_QUANTIZE_PY]   # SR beside its RTN twins

Timings: triton.testing.do_bench (CUDA events, median) of CUDA-graph replays (GPU time: the host's Python and
launch work, over 100 us a quantize call, would otherwise hide fast kernels; the training step replays graphs
too), inputs rotated among several copies so that L2 does not flatter; the whole quantize call also eagerly. Quantize "effective" bandwidth counts the fewest bytes a quantization must move: the input read
once, codes + scale bytes (+ the fp16 operand where written) written once. Prints tables; writes JSON to
$OUT/bench_kernels.json when OUT is set.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import traceback

import torch
import triton
import triton.language as tl

from fp4compile.codegen import gemm as cg
from fp4compile.codegen import quantize as cq
from fp4compile.numerics.api import check_quantize_args
from fp4compile.numerics.formats import NVFP4, Rounding
from fp4compile.numerics.reference import quantize_reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import graph_ms, median_ms  # noqa: E402

RESULTS: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# ---------------------------------------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------------------------------------

def check_quantize(x: torch.Tensor, only: "tuple[str, ...] | None" = None) -> list[str]:
    """Bit-exactness of every variant (or those named in ``only``) against the reference (on the GPU) at full size:
    codes, scale bytes and tensor scale from the whole call (amax kernel included), and the exact fp16 operand where
    one is written."""
    lines = []
    seed_t = torch.tensor(42, device=x.device)
    cases = {
        "rtn_1x16": dict(block=None, rounding="nearest", hadamard=False, view=x),
        "sr_1x16": dict(block=None, rounding="stochastic", hadamard=False, view=x),
        "rtn_2d_16x16": dict(block=(16, 16), rounding="nearest", hadamard=False, view=x),
        "sr_hadamard_colwise": dict(block=None, rounding="stochastic", hadamard=True, view=x.t()),
        "rtn_hadamard_colwise": dict(block=None, rounding="nearest", hadamard=True, view=x.t()),
        "mxfp4": dict(block=None, rounding="nearest", hadamard=False, view=x, format="mxfp4"),
        "rtn_1x16_fp16_operand": dict(block=None, rounding="nearest", hadamard=False, view=x, deq=torch.float16),
        "sr_1x16_fp16_operand": dict(block=None, rounding="stochastic", hadamard=False, view=x, deq=torch.float16),
        "rtn_2d_16x16_colwise": dict(block=(16, 16), rounding="nearest", hadamard=False, view=x.t()),
        "sr_2d_16x16_seed_tensor": dict(block=(16, 16), rounding="stochastic", hadamard=False, view=x, seed=seed_t),
        "rtn_1x16_colwise_fp16_operand": dict(block=None, rounding="nearest", hadamard=False, view=x.t(),
                                              deq=torch.float16),
        "mxfp4_sr_hadamard_colwise": dict(block=None, rounding="stochastic", hadamard=True, view=x.t(),
                                          format="mxfp4", deq=torch.float32),
    }
    for name, c in cases.items():
        if only is not None and name not in only:
            continue
        a = check_quantize_args(c["view"], c.get("format", "nvfp4"), c["block"], c["rounding"], c["hadamard"])
        args = (c["view"], a.format, a.block, a.rounding, c.get("seed", 42), 1000, a.hadamard)
        ref = quantize_reference(*args)
        tri = cq.quantize_triton(*args, dequantized_dtype=c.get("deq"))
        tri, deq = tri if c.get("deq") else (tri, None)
        ok = (torch.equal(ref.qdata, tri.qdata) and torch.equal(ref.scale.view(torch.uint8), tri.scale.view(torch.uint8))
              and torch.equal(ref.per_tensor_scale, tri.per_tensor_scale))
        if deq is not None:
            expected = ref.dequantize_unscaled().reshape(deq.shape)
            ok = ok and torch.equal(deq.float().nan_to_num(7.0), expected.nan_to_num(7.0))
        lines.append(f"quantize {name:30s} bit-exact: {ok}")
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

#: Tile candidates of the --tiles sweep (the first ones are the defaults). Quantize: (BLOCK_R, BLOCK_K, num_warps,
#: ROW_VEC); amax: (BLOCK_R, BLOCK_K, num_warps, ROW_VEC, programs per SM); for row-major and for column-wise
#: (``x.t()``) reads.
QUANT_TILES = {"rows": [(16, 256, 4, 8), (8, 256, 4, 8), (32, 128, 4, 8), (16, 256, 8, 8)],
               "columns": [(64, 64, 4, 2), (128, 64, 4, 4), (64, 128, 4, 2), (64, 128, 8, 2)]}
AMAX_TILES = {"rows": [(16, 256, 4, 8, 16), (32, 256, 8, 8, 4), (32, 256, 4, 8, 8)],
              "columns": [(128, 64, 4, 4, 4), (64, 64, 4, 2, 8)]}
#: The tiles the previous kernels (--before) were measured with: their best of the earlier sweep.
BEFORE_TILES = {"rows": (16, 256, 4), "columns": (64, 64, 4)}


def load_module(path: str, name: str = "fp4compile.codegen._quantize_before"):
    """A copy of an earlier ``fp4compile/codegen/quantize.py`` (e.g. from ``git show``), imported as a sibling
    module so that its relative imports resolve: the kernels before the change, timed side by side."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


#: The stochastic-rounding variants and their round-to-nearest twins (``--sr``), and the correctness cases run first.
SR_TWINS = (("SR 1x16", "RTN 1x16"), ("Hadamard+colwise SR", "Hadamard+colwise RTN"))
SR_CHECKS = ("rtn_1x16", "sr_1x16", "sr_hadamard_colwise", "rtn_hadamard_colwise", "sr_1x16_fp16_operand",
             "sr_2d_16x16_seed_tensor", "mxfp4_sr_hadamard_colwise")


def bench_quantize(rows: int, cols: int, tiles: bool, before=None, only: "tuple[str, ...] | None" = None) -> list[dict]:
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
    amax_cache: dict = {}
    for name, v in variants.items():
        if only is not None and name not in only:
            continue
        kind = "columns" if v["had"] else "rows"
        nbytes = base_bytes
        if "scale_bytes" in v:
            nbytes = base_bytes - numel // 16 + v["scale_bytes"]
        if v.get("deq"):
            nbytes += numel * 2
        args = lambda i: (v["view"](i), NVFP4, v["block"], v["rnd"], 1, 0, v["had"], v.get("deq"))  # noqa: E731
        sweep = {}
        for tile in ([None] + QUANT_TILES[kind]) if tiles else [None]:
            sweep[str(tile)] = graph_ms(lambda i, t=tile: cq.quantize_triton(*args(i), amax=v["amax"][i], _tile=t),
                                        n_sets)
            print(f"  {name:24s} quantize pass, tile {str(tile):18s} {1e3 * sweep[str(tile)]:8.1f} us", flush=True)
        tile = min(sweep, key=sweep.get)
        ms_q = sweep[tile]
        tile_arg = None if tile == "None" else eval(tile)
        ms_full = median_ms(lambda i: cq.quantize_triton(*args(i), _tile=tile_arg), n_sets)
        ms_graph = graph_ms(lambda i: cq.quantize_triton(*args(i), _tile=tile_arg), n_sets)
        if v["had"] not in amax_cache:
            amax_sweep = {}
            for at in ([None] + AMAX_TILES[kind]) if tiles else [None]:
                amax_sweep[str(at)] = graph_ms(
                    lambda i, t=at: cq.tensor_amax_triton(v["view"](i), hadamard=v["had"], _tile=t), n_sets)
                print(f"  {name:24s} amax pass, tile {str(at):22s} {1e3 * amax_sweep[str(at)]:8.1f} us", flush=True)
            amax_cache[v["had"]] = amax_sweep
        row = dict(variant=name, tile=tile, bytes=nbytes, ms_amax_plus_quantize=ms_full, ms_quantize_pass=ms_q,
                   ms_amax_plus_quantize_graph=ms_graph, tbps_graph=nbytes / ms_graph / 1e9,
                   ms_amax_pass=amax_cache[v["had"]]["None"], amax_sweep=amax_cache[v["had"]], quantize_sweep=sweep,
                   tbps_full=nbytes / ms_full / 1e9, tbps_quantize_pass=nbytes / ms_q / 1e9)
        if before is not None:
            bt = BEFORE_TILES[kind]
            row["before"] = dict(
                tile=bt,
                ms_quantize_pass=graph_ms(lambda i: before.quantize_triton(*args(i), amax=v["amax"][i], _tile=bt),
                                          n_sets),
                ms_amax_plus_quantize=median_ms(lambda i: before.quantize_triton(*args(i), _tile=bt), n_sets),
                ms_amax_plus_quantize_graph=graph_ms(lambda i: before.quantize_triton(*args(i), _tile=bt), n_sets),
                ms_amax_pass=graph_ms(lambda i: before.tensor_amax_triton(v["view"](i), hadamard=v["had"]), n_sets))
        out.append(row)
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
        # CUDA-graph replays, as the training step runs them (eager timing adds the host's launch work, which
        # hides small GEMMs: the earlier table was timed that way).
        ms = graph_ms(lambda i: torch.mm(*sets[i]["bf"]), n_sets)
        row["cublas_bf16"] = flops / ms / 1e9
        for path in ("cublas_dequant", "triton_dequant", "triton_packed", "triton_fused_quant"):
            if path == "triton_fused_quant" and layout == "weight_grad":
                continue  # both operands need the RHT along tokens: not a prologue quantization
            try:
                # bf16 results, as the training step's GEMMs and the cuBLAS bf16 baseline write them.
                if path == "triton_fused_quant":
                    fn = lambda i: cg.gemm_quantize_a(sets[i]["x"], sets[i]["qb"], sets[i]["bt"],
                                                      out_dtype=torch.bfloat16, b_dequantized=sets[i]["b16"],
                                                      amax=sets[i]["amax"])
                else:
                    fn = lambda i, p=path: cg.gemm(sets[i]["qa"], sets[i]["qb"], sets[i]["bt"], path=p,
                                                   out_dtype=torch.bfloat16, a_dequantized=sets[i]["a16"],
                                                   b_dequantized=sets[i]["b16"])
                fn(0)
                torch.cuda.synchronize()
                ms = graph_ms(fn, n_sets)
                row[path] = flops / ms / 1e9
            except Exception as exc:
                row[path] = None
                row[path + "_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        paths = [p for p in ("cublas_dequant", "triton_dequant", "triton_packed") if row.get(p)]
        row["best_path"] = max(paths, key=lambda p: row[p])
        row["best_pct_of_bf16"] = 100 * row[row["best_path"]] / row["cublas_bf16"]
        row["picked_path"] = cg.choose_gemm_path(m, n, k)
        row["picked_pct_of_bf16"] = 100 * (row.get(row["picked_path"]) or 0.0) / row["cublas_bf16"]
        row["dot_scaled_mxfp4"] = None
        out.append(row)
        sets = None  # free this shape's operands (the lambdas' cell too) before emptying the cache
        torch.cuda.empty_cache()
    return out


#: Activation shapes (tokens, features) of a GPT-2-small step: the inputs and output gradients of its linears.
ACTIVATION_SHAPES = [(8192, 768), (8192, 2304), (8192, 3072)]
#: Tiles of the dequantize sweep, (BLOCK_R, BLOCK_K, num_warps); the first is the default.
DEQUANT_TILES = [(8, 512, 4), (16, 256, 4), (32, 256, 8), (32, 128, 4)]
#: More tiles for the one-pass amax pair (column-wise reads), (BLOCK_R, BLOCK_K, warps, ROW_VEC, programs per SM).
AMAX_PAIR_TILES = [(128, 64, 4, 4, 8), (256, 32, 4, 8, 4), (128, 128, 8, 4, 4), (64, 128, 4, 2, 4)]


def bench_operand_passes(tiles: bool, before=None) -> list[dict]:
    """Per activation shape, the passes around its quantizations, checked then timed (CUDA-graph GPU times):
    its two tensor amaxes (plain, for the row-wise quantization; through the RHT along tokens, for the weight
    gradient) as two reductions and as one (`tensor_amaxes_triton`); and the dequantization of its saved x^T
    (RHT + 1x16 along tokens, round to nearest) into the fp16 weight-gradient operand."""
    out = []
    for tokens, features in ACTIVATION_SHAPES:
        xs = [torch.randn(tokens, features, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        pair = cq.tensor_amaxes_triton(xs[0].t())
        amax_ok = (pair[0].item() == cq.tensor_amax_triton(xs[0].t(), hadamard=True).item()
                   and pair[1].item() == xs[0].float().abs().max().item())
        qts = [cq.quantize_triton(x.t(), NVFP4, (1, 16), Rounding.NEAREST, hadamard=True) for x in xs]
        deq = cq.dequantize_unscaled_triton(qts[0])
        deq_ok = torch.equal(deq.float(), qts[0].dequantize_unscaled().reshape(deq.shape))
        if not (amax_ok and deq_ok):
            raise SystemExit(f"{tokens}x{features}: amax pair exact {amax_ok}, dequantize exact {deq_ok}")
        numel = tokens * features
        row = dict(shape=f"{tokens}x{features}", amax_pair_exact=amax_ok, dequantize_exact=deq_ok,
                   ms_two_amax=graph_ms(lambda i: (cq.tensor_amax_triton(xs[i]),
                                                   cq.tensor_amax_triton(xs[i].t(), hadamard=True)), 3),
                   ms_one_amax=graph_ms(lambda i: cq.tensor_amaxes_triton(xs[i].t()), 3))
        sweep = {str(t): graph_ms(lambda i, t=t: cq.dequantize_unscaled_triton(qts[i], _tile=t), 3)
                 for t in (DEQUANT_TILES if tiles else DEQUANT_TILES[:1])}
        row.update(dequantize_sweep=sweep, dequantize_tile=min(sweep, key=sweep.get), ms_dequantize=min(sweep.values()),
                   dequantize_bytes=numel * 2 + numel // 2 + numel // 16)
        row["tbps_dequantize"] = row["dequantize_bytes"] / row["ms_dequantize"] / 1e9
        row["tbps_one_amax"] = numel * 2 / row["ms_one_amax"] / 1e9
        if before is not None:
            row["ms_dequantize_before"] = graph_ms(lambda i: before.dequantize_unscaled_triton(qts[i]), 3)
        if tiles:
            row["one_amax_sweep"] = {str(t): graph_ms(lambda i, t=t: cq.tensor_amaxes_triton(xs[i].t(), _tile=t), 3)
                                     for t in AMAX_TILES["columns"] + AMAX_PAIR_TILES}
        # The four quantizations of an activation in the NV recipe's step, amax given (the pass alone).
        amax_pairs = [cq.tensor_amaxes_triton(x.t()) for x in xs]
        quantizations = {
            "x rows RTN +fp16": (lambda i: xs[i], Rounding.NEAREST, False, torch.float16, 1),
            "x^T RHT RTN": (lambda i: xs[i].t(), Rounding.NEAREST, True, None, 0),
            "dy rows SR +fp16": (lambda i: xs[i], Rounding.STOCHASTIC, False, torch.float16, 1),
            "dy^T RHT SR +fp16": (lambda i: xs[i].t(), Rounding.STOCHASTIC, True, torch.float16, 0),
        }
        row["quantize"] = {}
        for name, (view, rnd, had, deq, which) in quantizations.items():
            kind = "columns" if had else "rows"
            nbytes = numel * 2 + numel // 2 + numel // 16 + (numel * 2 if deq else 0)
            sweep = {str(t): graph_ms(lambda i, t=t: cq.quantize_triton(view(i), NVFP4, (1, 16), rnd, 1, 0, had, deq,
                                                                      amax=amax_pairs[i][which], _tile=t), 3)
                     for t in ([None] + QUANT_TILES[kind] if tiles else [None])}
            best = min(sweep, key=sweep.get)
            row["quantize"][name] = dict(us=1e3 * sweep[best], tile=best, tbps=nbytes / sweep[best] / 1e9,
                                         us_default=1e3 * sweep["None"])
        out.append(row)
        xs = qts = None  # free this shape's tensors (the lambdas' cells too)
    return out


def bench_gemm_in_graph(shapes, autotune: bool) -> list[dict]:
    """The GEMM as the backend writes it into the graph (`fp4compile.ops.linear._dense_gemm`): ``mm`` of the exact
    fp16 operands with a float32 result, ``* alpha``, cast to bf16, compiled by Inductor on its own (in the
    training step Inductor fuses the epilogue into the next kernel instead). Against cuBLAS bf16 in the same layout.
    With ``autotune``, also Inductor's max-autotune (its Triton GEMM templates, epilogue fused, against cuBLAS)."""
    def graph_gemm(a, b, alpha):
        return (torch.mm(a, b, out_dtype=torch.float32) * alpha).to(torch.bfloat16)

    modes = {"default": torch.compile(graph_gemm, dynamic=False)}
    if autotune:
        modes["max-autotune"] = torch.compile(graph_gemm, mode="max-autotune-no-cudagraphs", dynamic=False)
    out = []
    for name, m, n, k, layout in shapes:
        a = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(3)]
        # the stored layouts: W (N, K) read transposed (forward), W (K, N) (input grad), x^T (N, K=tokens)
        b = [(torch.randn(k, n, device="cuda", dtype=torch.float16) if layout == "input_grad"
              else torch.randn(n, k, device="cuda", dtype=torch.float16).t()) for _ in range(3)]
        alpha = torch.tensor(0.37, device="cuda")
        flops = 2 * m * n * k
        row = dict(shape=name, m=m, n=n, k=k, layout=layout)
        ab = [(x.bfloat16(), y.bfloat16()) for x, y in zip(a, b)]
        row["cublas_bf16"] = flops / graph_ms(lambda i: torch.mm(*ab[i]), 3) / 1e9
        row["mm_fp32_out"] = flops / graph_ms(lambda i: torch.mm(a[i], b[i], out_dtype=torch.float32), 3) / 1e9
        for mode, fn in modes.items():
            expected = graph_gemm(a[0], b[0], alpha)
            got = fn(a[0], b[0], alpha)
            if not torch.equal(got, expected):
                row[mode + "_max_diff"] = (got.float() - expected.float()).abs().max().item()
            row[mode] = flops / graph_ms(lambda i, fn=fn: fn(a[i], b[i], alpha), 3) / 1e9
        out.append(row)
        print(f"  {name:11s} " + " ".join(f"{key} {val:.0f}" if isinstance(val, float) else f"{key} {val}"
                                          for key, val in row.items() if key not in ("shape", "layout")), flush=True)
    return out


def print_quantize_table(q: list[dict], with_before: bool) -> None:
    print("\nquantize 8192x8192 bf16 (effective TB/s = minimal bytes / time; CUDA-graph GPU times: quant = amax "
          "given, graph = amax + quant; full = amax + quant eagerly, host included)")
    print(f"{'variant':24s} {'tile':>27s} {'quant us':>8s} {'TB/s':>5s} {'full us':>7s} {'graph us':>8s} {'TB/s':>5s} "
          f"{'amax us':>7s}" + (f" | {'before: quant':>13s} {'full':>6s} {'graph':>6s} {'amax':>5s} | "
                                 f"{'x quant':>7s} {'x graph':>7s}" if with_before else ""))
    for r in q:
        line = (f"{r['variant']:24s} {r['tile']:>27s} {1e3 * r['ms_quantize_pass']:8.1f} {r['tbps_quantize_pass']:5.2f} "
                f"{1e3 * r['ms_amax_plus_quantize']:7.1f} {1e3 * r['ms_amax_plus_quantize_graph']:8.1f} "
                f"{r['tbps_graph']:5.2f} {1e3 * r['ms_amax_pass']:7.1f}")
        if with_before:
            b = r["before"]
            line += (f" | {1e3 * b['ms_quantize_pass']:13.1f} {1e3 * b['ms_amax_plus_quantize']:6.1f} "
                     f"{1e3 * b['ms_amax_plus_quantize_graph']:6.1f} {1e3 * b['ms_amax_pass']:5.1f} | "
                     f"{b['ms_quantize_pass'] / r['ms_quantize_pass']:7.2f} "
                     f"{b['ms_amax_plus_quantize_graph'] / r['ms_amax_plus_quantize_graph']:7.2f}")
        print(line, flush=True)


def print_register_report() -> None:
    for key, kern in (("quantize", cq._quantize_kernel), ("amax", cq._amax_kernel)):
        try:
            for caches in kern.device_caches.values():
                for variant in caches[0].values():
                    print(f"  compiled {key}: {variant.n_regs} registers, {variant.n_spills} spills, "
                          f"{variant.metadata.num_warps} warps")
        except Exception as exc:
            print(f"  (no register report: {exc})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer GEMM shapes")
    parser.add_argument("--tiles", action="store_true", help="sweep quantize tile shapes")
    parser.add_argument("--quantize-only", action="store_true", help="skip the GEMM part")
    parser.add_argument("--before", metavar="PATH", help="an earlier quantize.py to time side by side (e.g. "
                        "git show HEAD~1:fp4compile/codegen/quantize.py > /tmp/q.py)")
    parser.add_argument("--gemm-only", action="store_true", help="skip the quantize part")
    parser.add_argument("--passes", action="store_true", help="only the amax and dequantize passes at GPT-2 shapes")
    parser.add_argument("--gemm-in-graph", action="store_true", help="only the GEMM as written into the graph")
    parser.add_argument("--autotune", action="store_true", help="with --gemm-in-graph: Inductor max-autotune too")
    parser.add_argument("--sr", action="store_true", help="only stochastic rounding beside its round-to-nearest "
                        "twins (1x16, Hadamard + column-wise), checked first, and copy bandwidth")
    args = parser.parse_args()
    before = load_module(args.before) if args.before else None
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    RESULTS.update(gpu=props.name, torch=torch.__version__, triton=triton.__version__, command=" ".join(sys.argv))
    print(f"{RESULTS['date']}  {props.name}  torch {torch.__version__}  triton {triton.__version__}", flush=True)

    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) * 3
    x[17, 4242] = 1e4
    x[5, :64] = 0.0  # zero blocks
    x[6, :32] = -0.0  # negative zeros keep code 0
    x[7, :32] = -1e-38  # tiny values next to the outlier's tensor scale: subnormal or zero block scales
    x[4000:4016, 16:32] = 1e-3  # a 16x16 tile of one value below the tensor's other blocks
    if args.sr:
        lines = check_quantize(x, only=SR_CHECKS)
        print("\n".join(lines), flush=True)
        RESULTS["correctness"] = lines
        del x
        RESULTS["copy_tbps"] = bench_copy()
        print(f"device copy: {RESULTS['copy_tbps']:.2f} TB/s (read + write)", flush=True)
        q = bench_quantize(8192, 8192, args.tiles, before, only=tuple(n for pair in SR_TWINS for n in pair))
        RESULTS["quantize"] = q
        print_quantize_table(q, before is not None)
        by_name = {r["variant"]: r for r in q}
        RESULTS["sr_over_rtn"] = {}
        print("\nstochastic rounding against its round-to-nearest twin (time ratios, same run)")
        for sr, rtn in SR_TWINS:
            a, b = by_name[sr], by_name[rtn]
            ratios = dict(quantize_pass=a["ms_quantize_pass"] / b["ms_quantize_pass"],
                          quantize_pass_default_tiles=a["quantize_sweep"]["None"] / b["quantize_sweep"]["None"],
                          amax_plus_quantize_graph=a["ms_amax_plus_quantize_graph"] / b["ms_amax_plus_quantize_graph"])
            if before is not None:
                ratios["before_quantize_pass"] = a["before"]["ms_quantize_pass"] / b["before"]["ms_quantize_pass"]
            RESULTS["sr_over_rtn"][sr] = ratios
            print(f"  {sr:22s} / {rtn:22s}: quantize pass {ratios['quantize_pass']:.3f}x (tiles {a['tile']} / "
                  f"{b['tile']}; default tiles {ratios['quantize_pass_default_tiles']:.3f}x), amax + quantize "
                  f"{ratios['amax_plus_quantize_graph']:.3f}x"
                  + (f" (before: quantize pass {ratios['before_quantize_pass']:.3f}x)" if before else ""), flush=True)
        print_register_report()
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "bench_kernels.json"), "w") as f:
                json.dump(RESULTS, f, indent=1, default=str)
        return
    if args.passes or args.gemm_in_graph:
        del x
        if args.passes:
            RESULTS["passes"] = bench_operand_passes(args.tiles, before)
            print("\namax and dequantize passes (CUDA-graph GPU us; exact: checked against the reference first)")
            for r in RESULTS["passes"]:
                print(f"{r['shape']:10s} amax two passes {1e3 * r['ms_two_amax']:6.1f}  one pass {1e3 * r['ms_one_amax']:6.1f}"
                      f" ({r['tbps_one_amax']:.2f} TB/s) | dequantize x^T {1e3 * r['ms_dequantize']:6.1f} "
                      f"({r['tbps_dequantize']:.2f} TB/s, tile {r['dequantize_tile']})"
                      + (f" before {1e3 * r['ms_dequantize_before']:6.1f}" if before else "")
                      + f"  sweep {r['dequantize_sweep']}", flush=True)
                if "one_amax_sweep" in r:
                    print("   amax pair tiles: " + ", ".join(f"{t} {1e3 * v:.1f}" for t, v in r["one_amax_sweep"].items()))
                for name, q in r["quantize"].items():
                    print(f"   quantize {name:18s} {q['us']:6.1f} us {q['tbps']:5.2f} TB/s (tile {q['tile']}; "
                          f"default {q['us_default']:.1f})")
        if args.gemm_in_graph:
            RESULTS["gemm_in_graph"] = bench_gemm_in_graph(GEMM_SHAPES, args.autotune)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "bench_kernels.json"), "w") as f:
                json.dump(RESULTS, f, indent=1, default=str)
        return
    if args.gemm_only:
        del x
        lines = check_gemm(8192, 3072, 768)
        print("\n".join(lines), flush=True)
        RESULTS["correctness"] = lines
    else:
        lines = check_quantize(x) + ([] if args.quantize_only else check_gemm(8192, 3072, 768))
        print("\n".join(lines), flush=True)
        RESULTS["correctness"] = lines
        del x

        RESULTS["copy_tbps"] = bench_copy()
        print(f"device copy: {RESULTS['copy_tbps']:.2f} TB/s (read + write)", flush=True)
        q = bench_quantize(8192, 8192, args.tiles, before)
        RESULTS["quantize"] = q
        print_quantize_table(q, before is not None)
        print_register_report()
        if args.quantize_only:
            if os.environ.get("OUT"):
                with open(os.path.join(os.environ["OUT"], "bench_kernels.json"), "w") as f:
                    json.dump(RESULTS, f, indent=1, default=str)
            return
    shapes = GEMM_SHAPES[:3] if args.quick else GEMM_SHAPES
    g = bench_gemm(shapes)
    for row in g:
        if row["shape"] in ("square", "qkv fwd", "fc1 fwd"):
            row["dot_scaled_mxfp4"] = bench_dot_scaled(row["m"], row["n"], row["k"])
    RESULTS["gemm"] = g
    print("\nGEMM TFLOP/s (operands already quantized; fused = quantize x inside the GEMM, amax given)")
    hdr = f"{'shape':11s} {'M':>5s} {'N':>5s} {'K':>5s} {'bf16':>6s} {'cublas_dq':>9s} {'triton_dq':>9s} " \
          f"{'packed':>7s} {'fused':>6s} {'best':>15s} {'%bf16':>6s} {'picked':>15s} {'%bf16':>6s} {'dot_scaled':>10s}"
    print(hdr)
    fmt = lambda v: f"{v:.0f}" if isinstance(v, float) else "-"  # noqa: E731
    for r in g:
        ds = r["dot_scaled_mxfp4"]
        ds_s = "-" if ds is None else (f"{ds['tflops']:.0f}" if "tflops" in ds else "error")
        print(f"{r['shape']:11s} {r['m']:5d} {r['n']:5d} {r['k']:5d} {fmt(r['cublas_bf16']):>6s} "
              f"{fmt(r.get('cublas_dequant')):>9s} {fmt(r.get('triton_dequant')):>9s} {fmt(r.get('triton_packed')):>7s} "
              f"{fmt(r.get('triton_fused_quant')):>6s} {r['best_path']:>15s} {r['best_pct_of_bf16']:6.1f} "
              f"{r['picked_path']:>15s} {r['picked_pct_of_bf16']:6.1f} {ds_s:>10s}")
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
