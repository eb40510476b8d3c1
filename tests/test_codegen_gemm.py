"""The Triton/cuBLAS NVFP4 GEMM paths against a float64 matmul of the exact dequantized operands.

Tolerance (why): the operands ``E2M1[c] * d_b`` are exact in fp16, so the only errors are the FP32
accumulation (at most about ``K * 2^-24 * sum_k |a_k b_k|`` for any summation order, tensor-core order
included) and the roundings of alpha, ``C * alpha`` and the bias add (a few ``2^-24 |C|``). Each element must
lie within ``2 K 2^-24 (|A_u| |B_u|^T) alpha + 4 * 2^-24 |C|`` (plus half an ulp of a 16-bit output dtype).
On CPU the kernels run under ``TRITON_INTERPRET=1`` with float16 operands (the interpreter's bf16 is wrong).
"""

import pytest
import torch

triton = pytest.importorskip("triton")

import fp4compile  # noqa: E402
from fp4compile.numerics.formats import NVFP4, Rounding  # noqa: E402
from fp4compile.codegen import gemm as cg  # noqa: E402
from fp4compile.codegen import quantize as cq  # noqa: E402
from helpers import skip_module_unless_kernels_run  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PATHS = ["cublas_dequant", "triton_dequant", "triton_packed"]
OUT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])

skip_module_unless_kernels_run(cg._gemm_kernel)


def _q(x, block=(1, 16), rounding=Rounding.NEAREST, hadamard=False, seed=0):
    return cq.quantize_triton(x.to(DEVICE), NVFP4, block, rounding, seed, 0, hadamard)


def check_against_float64(c, a, b, b_transposed, bias=None):
    """Element-wise FP32-accumulation bound against the float64 product of the exact operands."""
    m, n, k = cg.check_gemm_operands(a, b, b_transposed)
    au = a.dequantize_unscaled().reshape(m, k).double().cpu()
    bu = b.dequantize_unscaled().reshape(b.shape[-2], b.shape[-1]).double().cpu()
    b_kn = bu if b_transposed else bu.t()
    alpha = (a.per_tensor_scale * b.per_tensor_scale).double().cpu()
    exact = (au @ b_kn) * alpha
    if bias is not None:
        exact = exact + bias.double().cpu()
    magnitude = (au.abs() @ b_kn.abs()) * alpha
    tol = 2 * k * 2.0**-24 * magnitude + 4 * 2.0**-24 * exact.abs()
    if c.dtype in (torch.float16, torch.bfloat16):
        tol = tol + exact.abs() * torch.finfo(c.dtype).eps / 2 + torch.finfo(c.dtype).smallest_normal
    got = c.reshape(m, n).double().cpu()
    assert got.shape == exact.shape
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isnan(got), ~finite), "NaN pattern differs"
    err = (got - exact).abs()[finite]
    worst = (err / tol[finite]).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"error {worst:.3g}x the FP32 accumulation bound"
    rel = ((got - exact)[finite].norm() / exact[finite].norm()).item() if err.numel() else 0.0
    return rel


def _layouts(m, n, k):
    """(a, b, b_transposed) for the three training GEMMs of a linear layer y = x W^T (x: (m, k), W: (n, k))."""
    x = torch.randn(m, k) * 2
    w = torch.randn(n, k) * torch.logspace(-1, 1, k)
    dy = torch.randn(m, n) * 1e-3
    qw = _q(w, block=(16, 16))
    return {
        "forward": (_q(x), qw, False),
        "input_grad": (_q(dy, rounding=Rounding.STOCHASTIC, seed=3), qw, True),
        "weight_grad": (_q(dy.t(), rounding=Rounding.STOCHASTIC, hadamard=True, seed=4), _q(x.t(), hadamard=True),
                        False),
    }


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["forward", "input_grad", "weight_grad"])
def test_three_layouts(path, layout):
    a, b, bt = _layouts(48, 80, 64)[layout]
    c = cg.gemm(a, b, bt, path=path)
    assert c.dtype == torch.float32 and c.shape == (a.shape[0], b.shape[0] if not bt else b.shape[1])
    assert check_against_float64(c, a, b, bt) < 1e-5


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_bias_and_out_dtypes(path, out_dtype):
    a, b, bt = _layouts(32, 48, 96)["forward"]
    bias = torch.randn(48).to(DEVICE)
    c = cg.gemm(a, b, bt, bias=bias, out_dtype=out_dtype, path=path)
    assert c.dtype == out_dtype
    check_against_float64(c, a, b, bt, bias)


def test_matches_reference_gemm_and_leading_dims():
    x = torch.randn(3, 10, 64)
    w = torch.randn(32, 64)
    a, b = _q(x), _q(w, block=(16, 16))
    ref = fp4compile.numerics.gemm.gemm_reference(a, b)
    for path in PATHS:
        c = cg.gemm(a, b, path=path)
        assert c.shape == (3, 10, 32)
        torch.testing.assert_close(c.cpu(), ref.cpu(), rtol=1e-5, atol=1e-6)


def test_non_finite_operand_gives_nan_rows():
    x = torch.randn(32, 64)
    x[5, 20] = float("inf")
    a, b = _q(x), _q(torch.randn(32, 64), block=(16, 16))
    for path in PATHS:
        c = cg.gemm(a, b, path=path).cpu()
        assert torch.isnan(c[5]).all() and torch.isfinite(c[torch.arange(32) != 5]).all()


@pytest.mark.parametrize("b_mode", ["packed", "dequantized"])
@pytest.mark.parametrize("layout", ["forward", "input_grad"])
def test_fused_quantize_gemm(b_mode, layout):
    x = torch.randn(48, 64) * torch.logspace(-2, 2, 64)
    if layout == "forward":
        b, bt = _q(torch.randn(80, 64), block=(16, 16)), False
    else:
        b, bt = _q(torch.randn(64, 80), block=(16, 16)), True
    b_deq = cq.dequantize_unscaled_triton(b, torch.float16) if b_mode == "dequantized" else None
    bias = torch.randn(80).to(DEVICE)
    c = cg.gemm_quantize_a(x.to(DEVICE), b, bt, bias=bias, b_dequantized=b_deq)
    a = _q(x)  # the fused prologue must quantize exactly like quantize_triton
    check_against_float64(c, a, b, bt, bias)
    if DEVICE == "cpu":  # same tile loop and the same fp16 operand values: bit-identical to the two-step path
        same_b_mode = "triton_packed" if b_mode == "packed" else "triton_dequant"
        assert torch.equal(c, cg.gemm(a, b, bt, bias=bias, path=same_b_mode, b_dequantized=b_deq))
    amax = cq.tensor_amax_triton(x.to(DEVICE))
    assert torch.equal(c, cg.gemm_quantize_a(x.to(DEVICE), b, bt, bias=bias, b_dequantized=b_deq, amax=amax))


def test_fused_prologue_is_bit_exact_quantization():
    # An A whose exact product reveals any code error: B = identity blocks, so C = A_u * D_a * D_b exactly.
    x = torch.randn(32, 64) * 3
    x[0, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2) * (2688 / 6 / 448)
    from test_codegen_quantize import scale_order_sensitive_rows

    x = torch.cat([x, scale_order_sensitive_rows(float(x.abs().max())).repeat(1, 4)])
    x = x[: x.shape[0] // 16 * 16]
    eye = torch.eye(64)
    b = _q(eye, block=(16, 16))
    c = cg.gemm_quantize_a(x.to(DEVICE), b).cpu()
    a = _q(x)
    expected = (a.dequantize_unscaled().reshape(-1, 64).cpu() * (b.dequantize_unscaled().cpu().diagonal())) * (
        a.per_tensor_scale * b.per_tensor_scale).cpu()
    assert torch.equal(c, expected)


def test_dequantized_operands_passed_in():
    a, b, bt = _layouts(32, 48, 64)["input_grad"]
    a16 = cq.dequantize_unscaled_triton(a, torch.float16)
    b16 = cq.dequantize_unscaled_triton(b, torch.float16)
    c1 = cg.gemm(a, b, bt, path="triton_dequant", a_dequantized=a16, b_dequantized=b16)
    c2 = cg.gemm(a, b, bt, path="triton_dequant")
    assert torch.equal(c1, c2)


def test_path_rule_on_sm90(monkeypatch):
    # On sm_90+ (no native FP4): the fused-epilogue Triton GEMM unless the reduction is longer than both output
    # sides (weight gradients), where cuBLAS's product was measured faster; CPU tensors never take either.
    monkeypatch.setattr(cg, "_sm90_or_newer", lambda index: True)
    monkeypatch.setattr(cg, "native_fp4_available", lambda index=0: False)
    for m, n, k in ((8192, 2304, 768), (8192, 768, 3072), (8192, 8192, 8192)):
        assert cg.choose_gemm_path(m, n, k, device="cuda") == "triton_dequant", (m, n, k)
    for m, n, k in ((768, 3072, 8192), (2304, 768, 8192), (768, 768, 8192)):
        assert cg.choose_gemm_path(m, n, k, device="cuda") == "cublas_dequant", (m, n, k)
    assert cg.choose_gemm_path(8192, 2304, 768, device="cpu") == "cublas_dequant"


def test_path_choice_and_fallbacks():
    assert cg.choose_gemm_path(8192, 768, 768) in cg.GEMM_PATHS
    assert cg.choose_gemm_path(64, 64, 64, fmt=fp4compile.MXFP4) == "reference"
    x = torch.randn(16, 64)
    a = fp4compile.quantize(x.to(DEVICE), "mxfp4", impl="triton")
    b = fp4compile.quantize(torch.randn(32, 64).to(DEVICE), "mxfp4", impl="triton")
    c = cg.gemm(a, b)  # MXFP4: reference path (logged)
    torch.testing.assert_close(c.cpu(), fp4compile.numerics.gemm.gemm_reference(a, b).cpu())
    with pytest.raises(ValueError, match="unknown path"):
        cg.gemm(_q(x), _q(torch.randn(32, 64)), path="magic")


# --- full sizes on the GPU -----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("mnk", [(8192, 3072, 768), (8192, 768, 3072), (3000, 2304, 768)])
@pytest.mark.parametrize("layout", ["forward", "input_grad", "weight_grad"])
def test_full_size_layouts_on_gpu(mnk, layout):
    m, n, k = mnk
    if layout == "weight_grad" and m % 16:
        m = m // 16 * 16  # the token axis is the reduction axis there: blocks of 16 need a multiple of 16
    a, b, bt = _layouts(m, n, k)[layout]
    for path in PATHS:
        c = cg.gemm(a, b, bt, bias=torch.randn(c_n := (b.shape[1] if bt else b.shape[0]), device="cuda"),
                    out_dtype=torch.bfloat16, path=path)
        assert c.shape[-1] == c_n
        c = cg.gemm(a, b, bt, path=path)
        assert check_against_float64(c, a, b, bt) < 1e-5, path


@pytest.mark.gpu
def test_full_size_8192_cubed_and_odd_leading_shape():
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    a, b = _q(x), _q(w, block=(16, 16))
    for path in PATHS:
        assert check_against_float64(cg.gemm(a, b, path=path), a, b, False) < 1e-5, path
    check_against_float64(cg.gemm_quantize_a(x, b), a, b, False)
    x3 = torch.randn(3, 1000, 768, device="cuda", dtype=torch.bfloat16)
    w3 = torch.randn(2304, 768, device="cuda", dtype=torch.bfloat16)
    a3, b3 = _q(x3), _q(w3, block=(16, 16))
    for path in PATHS:
        c = cg.gemm(a3, b3, path=path)
        assert c.shape == (3, 1000, 2304)
        assert check_against_float64(c, a3, b3, False) < 1e-5, path
    c = cg.gemm_quantize_a(x3, b3)
    assert c.shape == (3, 1000, 2304)
    check_against_float64(c, a3, b3, False)


# --- gemm_dense: the TMA kernel (Hopper) and its pointer-load fallback -----------------------------------------

def _dense_case(m, n, k, b_kn_stored, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g).half().to(DEVICE)
    if b_kn_stored:
        b_kn = torch.randn(k, n, generator=g).half().to(DEVICE)
    else:
        b_kn = torch.randn(n, k, generator=g).half().to(DEVICE).t()
    d_a = torch.tensor(0.37, device=DEVICE)
    d_b = torch.tensor(1.9e-3, device=DEVICE)
    bias = torch.randn(n, generator=g).to(DEVICE)
    return a, b_kn, d_a, d_b, bias


def dense_reference(a, b_kn, d_a, d_b, bias):
    """float64 product of `gemm_dense`'s operands and its FP32-accumulation bound (as `check_against_float64`),
    on the operands' device."""
    k = a.shape[1]
    a64, b64 = a.double(), b_kn.double()
    alpha = (d_a * d_b).double()  # one fp32 product, as the kernel forms it
    exact = (a64 @ b64) * alpha + (bias.double() if bias is not None else 0)
    tol = 2 * k * 2.0**-24 * (a64.abs() @ b64.abs()) * alpha + 4 * 2.0**-24 * exact.abs()
    return exact, tol


def check_dense(c, ref):
    exact, tol = ref
    if c.dtype in (torch.float16, torch.bfloat16):
        tol = tol + exact.abs() * torch.finfo(c.dtype).eps / 2 + torch.finfo(c.dtype).smallest_normal
    worst = ((c.double() - exact).abs() / tol).max().item()
    assert worst <= 1.0, f"error {worst:.3g}x the FP32 accumulation bound"


_DENSE_INTERP_CONFIGS = [
    cg.DenseConfig(32, 32, 32, 2, 4, 1),
    cg.DenseConfig(32, 64, 16, 2, 4, 1, epi_split=True),
    cg.DenseConfig(32, 32, 16, 2, 4, 1, schedule="split"),
    cg.DenseConfig(32, 64, 16, 1, 4, 1, schedule="split", epi_split=True),
    cg.DenseConfig(32, 32, 16, 2, 4, 1, schedule="headtail"),
]


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter runs the TMA kernel on CPU; the GPU tests below")
@pytest.mark.parametrize("config", _DENSE_INTERP_CONFIGS, ids=lambda c: c.name())
@pytest.mark.parametrize("b_kn_stored", [False, True], ids=["B(N,K)", "B(K,N)"])
@pytest.mark.parametrize("mnk,progs", [((48, 80, 64), 4), ((100, 72, 96), 5), ((64, 96, 256), 7),
                                       ((64, 64, 256), 13)])
def test_dense_tma_kernel_interpreted(config, b_kn_stored, mnk, progs):
    # Ragged edges (TMA zero fill and clipped stores), several tiles per program, whole waves plus split
    # leftover tiles, head/tail cuts.
    a, b_kn, d_a, d_b, bias = _dense_case(*mnk, b_kn_stored)
    for out_dtype, with_bias in ((torch.float32, True), (torch.float16, False)):
        c = cg.gemm_dense(a, b_kn, d_a, d_b, bias if with_bias else None, out_dtype, config=config,
                          _force_tma=True, _num_progs=progs)
        assert c.dtype == out_dtype and c.shape == (mnk[0], mnk[1])
        check_dense(c, dense_reference(a, b_kn, d_a, d_b, bias if with_bias else None))
    assert not cg._FLAGS or all(int(f.abs().sum()) == 0 for f in cg._FLAGS.values()), "tile flags left set"


def test_dense_schedule_args():
    split, headtail = cg.DenseConfig(schedule="split"), cg.DenseConfig(schedule="headtail")
    # (SCHEDULE, SPLIT_K, DP_TILES, K_HEAD, workspace slots) for (tiles, k-steps, programs)
    assert cg._schedule_args(split, 144, 128, 132) == (1, 11, 132, 0, 120)  # GPT-2 fc1 weight grad, 128x128
    assert cg._schedule_args(split, 36, 128, 132) == (1, 3, 0, 0, 72)  # proj weight grad
    assert cg._schedule_args(split, 264, 128, 132) == (0, 1, 0, 0, 0)  # whole waves: data-parallel
    assert cg._schedule_args(headtail, 108, 128, 132) == (2, 1, 0, 107, 108)  # qkv weight grad: 5 tails each
    assert cg._schedule_args(headtail, 144, 128, 132)[0] == 1  # more tiles than programs: split
    assert cg._schedule_args(cg.DenseConfig(schedule="split", split_k=4), 36, 128, 132)[:2] == (1, 4)
    # the interpreted cases above do take the cut schedules
    assert cg._schedule_args(split, 12, 6, 5)[0] == 1 and cg._schedule_args(headtail, 4, 16, 13)[0] == 2


def test_dense_fallback_and_out():
    a, b_kn, d_a, d_b, bias = _dense_case(40, 24, 48, False)
    out = torch.full((40, 24), float("nan"), device=DEVICE)
    c = cg.gemm_dense(a, b_kn, d_a, d_b, bias, torch.float32, out=out)
    assert c is out
    check_dense(c, dense_reference(a, b_kn, d_a, d_b, bias))
    assert cg.dense_tma_supported(a, b_kn, torch.float32) == (
        DEVICE == "cuda" and torch.cuda.get_device_capability()[0] >= 9)
    with pytest.raises(ValueError):
        cg.gemm_dense(a, b_kn, d_a, d_b, out=torch.empty(40, 24, device=DEVICE))  # bf16 default, fp32 out


@pytest.mark.gpu
@pytest.mark.parametrize("mnk,b_kn_stored", [((8192, 2304, 768), False), ((8192, 768, 3072), True),
                                               ((3072, 768, 8192), False), ((768, 768, 8192), False),
                                               ((1000, 776, 520), True)])
def test_dense_full_size_on_gpu(mnk, b_kn_stored):
    a, b_kn, d_a, d_b, bias = _dense_case(*mnk, b_kn_stored)
    ref = dense_reference(a, b_kn, d_a, d_b, bias)
    configs = [None, cg.DenseConfig(128, 128, 64, 8, 8, 4, schedule="split"),
               cg.DenseConfig(128, 128, 64, 8, 4, 4, schedule="headtail"),
               cg.DenseConfig(128, 256, 64, 8, 8, 3, epi_split=True)]
    for config in configs:
        c = torch.full(mnk[:2], float("nan"), device="cuda", dtype=torch.bfloat16)
        cg.gemm_dense(a, b_kn, d_a, d_b, bias, torch.bfloat16, config=config, out=c)
        check_dense(c, ref)
        if config is not None and config.schedule != "dp":  # the cut schedules add partials in a fixed order
            assert torch.equal(c, cg.gemm_dense(a, b_kn, d_a, d_b, bias, torch.bfloat16, config=config))


# --- the device-descriptor variant (path "triton_traced", fp4compile/codegen/gemm_device_tma.py) ----------------

@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter runs the TMA kernels on CPU; the GPU tests below")
@pytest.mark.parametrize("config", [c for c in _DENSE_INTERP_CONFIGS if c.schedule == "dp"], ids=lambda c: c.name())
@pytest.mark.parametrize("b_kn_stored", [False, True], ids=["B(N,K)", "B(K,N)"])
@pytest.mark.parametrize("mnk,progs", [((48, 80, 64), 4), ((100, 72, 96), 5)])
def test_device_descriptor_kernel_is_the_host_kernels_bits(config, b_kn_stored, mnk, progs):
    """Same program, descriptors made in the kernel: the FP32-accumulation bound, and the host-descriptor
    kernel's bits (same tiles, same k order)."""
    from fp4compile.codegen.gemm_device_tma import gemm_dense_device

    a, b_kn, d_a, d_b, bias = _dense_case(*mnk, b_kn_stored)
    for out_dtype, with_bias in ((torch.float32, True), (torch.float16, False)):
        bias_arg = bias if with_bias else None
        c = gemm_dense_device(a, b_kn, d_a, d_b, bias_arg, out_dtype, config=config, num_progs=progs)
        assert c.dtype == out_dtype and c.shape == (mnk[0], mnk[1])
        check_dense(c, dense_reference(a, b_kn, d_a, d_b, bias_arg))
        host = cg.gemm_dense(a, b_kn, d_a, d_b, bias_arg, out_dtype, config=config, _force_tma=True,
                             _num_progs=progs)
        assert torch.equal(c, host)


def test_device_config_is_data_parallel():
    from fp4compile.codegen.gemm_device_tma import device_config

    cfg = device_config(3072, 768, 8192, False, torch.bfloat16, 132)  # a "headtail" shape in the table
    assert cfg.schedule == "dp" and cfg.split_k == 0
    assert device_config(8192, 2304, 768, False, torch.bfloat16, 132) == cg.DENSE_CONFIG_TABLE[(8192, 2304, 768, False)]
    # a 4-byte output: 128x256 tiles store in halves with at most 3 stages (shared memory)
    fitted = device_config(8192, 3072, 768, False, torch.float32, 132)
    assert fitted.epi_split and fitted.num_stages <= 3


@pytest.mark.gpu
@pytest.mark.parametrize("mnk,b_transposed", [((8192, 2304, 768), False), ((8192, 768, 3072), True),
                                              ((1000, 776, 520), False)])
def test_traced_gemm_op_under_inductor_is_the_eager_kernels_bits(mnk, b_transposed):
    """``fp4compile::gemm_dense_traced`` compiled by Inductor (its code launches the kernel; descriptors made on
    the device, scratch from the allocator) gives the bits of the host-descriptor kernel with the same
    configuration, forward and in a backward (autograd's thread, where the allocator ContextVar is unset)."""
    import fp4compile.ops.triton_ops  # noqa: F401  (registers the op)
    from fp4compile.codegen.gemm_device_tma import device_config

    m, n, k = mnk
    a, b_kn, d_a, d_b, bias = _dense_case(m, n, k, b_transposed)
    b16 = b_kn if b_transposed else b_kn.t()
    bias = bias.to(torch.bfloat16)
    cfg = device_config(m, n, k, b_transposed, torch.bfloat16, torch.cuda.get_device_properties(0).multi_processor_count)
    eager = cg.gemm_dense(a, b_kn, d_a, d_b, bias, torch.bfloat16, config=cfg)
    check_dense(eager, dense_reference(a, b_kn, d_a, d_b, bias))
    fn = torch.compile(lambda a_, b_: torch.ops.fp4compile.gemm_dense_traced(a_, b_, d_a, d_b, bias, b_transposed,
                                                                              torch.bfloat16), backend="inductor")
    assert torch.equal(fn(a, b16), eager)

    # In a backward: the compiled backward graph runs on autograd's engine thread.
    class AddGemmInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g + torch.ops.fp4compile.gemm_dense_traced(a, b16, d_a, d_b, bias, b_transposed,
                                                              torch.bfloat16).float()

    x = torch.zeros(m, n, device="cuda", requires_grad=True)
    torch.compile(lambda t: AddGemmInBackward.apply(t).sum(), backend="inductor")(x).backward()
    assert torch.equal(x.grad, 1 + eager.float())
