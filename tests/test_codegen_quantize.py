"""The Triton quantize kernels against the reference quantizer, bit for bit (docs/numerics.md section 5).

On a machine without CUDA the kernels run under ``TRITON_INTERPRET=1`` (set by tests/conftest.py before Triton
is first imported) at small sizes; on CUDA the same tests run compiled, and the ``gpu`` tests add full sizes.
"""

import math

import pytest
import torch

triton = pytest.importorskip("triton")

import fp4compile  # noqa: E402
from fp4compile.numerics.api import check_quantize_args  # noqa: E402
from fp4compile.numerics.formats import E5M2  # noqa: E402
from fp4compile.numerics.hadamard import random_hadamard_transform  # noqa: E402
from fp4compile.numerics.reference import quantize_reference, tensor_amaxes_reference  # noqa: E402
from fp4compile.numerics.rounding import e2m1_values  # noqa: E402
from fp4compile.codegen import quantize as cq  # noqa: E402
from helpers import skip_module_unless_kernels_run  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

skip_module_unless_kernels_run(cq._quantize_kernel)


def _both(x, format="nvfp4", block=None, rounding="nearest", seed=0, offset=0, hadamard=False, ref_device="cpu"):
    """(reference on ``ref_device``, Triton on ``x``'s device) for the same validated arguments."""
    a = check_quantize_args(x, format, block, rounding, hadamard)
    ref = quantize_reference(x.to(ref_device), a.format, a.block, a.rounding, seed, offset, a.hadamard)
    tri = cq.quantize_triton(x, a.format, a.block, a.rounding, seed, offset, a.hadamard)
    return ref, tri


def assert_bit_exact(ref, tri):
    """Codes, scale bytes and the tensor scale equal, zero tolerance."""
    assert tri.qdata.shape == ref.qdata.shape and tri.scale.shape == ref.scale.shape
    assert tri.scale.dtype == ref.scale.dtype
    q_ref, q_tri = ref.qdata.cpu(), tri.qdata.cpu()
    bad = (q_ref != q_tri).sum().item()
    assert bad == 0, f"{bad} code bytes differ"
    s_ref, s_tri = ref.scale.view(torch.uint8).cpu(), tri.scale.view(torch.uint8).cpu()
    bad = (s_ref != s_tri).sum().item()
    assert bad == 0, f"{bad} scale bytes differ, e.g. ref {s_ref[s_ref != s_tri][:4]} vs {s_tri[s_ref != s_tri][:4]}"
    assert tri.per_tensor_scale.cpu().view(torch.int32).item() == ref.per_tensor_scale.cpu().view(torch.int32).item()
    assert (tri.block, tri.hadamard, tri.format) == (ref.block, ref.hadamard, ref.format)


def _check(x, **kw):
    ref, tri = _both(x.to(DEVICE), **kw)
    assert_bit_exact(ref, tri)
    return tri


# --- round to nearest: the special cases of the reference tests ---------------------------------------------

THRESHOLDS = [0.0, 0.25, 0.2500001, 0.5, 0.7499999, 0.75, 1.0, 1.25, 1.2500001, 1.5, 1.7499999, 1.75, 2.0, 2.5,
              2.5000002, 3.0, 3.4999998, 3.5, 4.0, 5.0, 5.0000005, 6.0]


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_every_e2m1_threshold_and_tie(sign):
    # Blocks with e_b == 1 (tensor amax 2688 -> S = 1; block max 6 -> d_b = 1): magnitudes reach E2M1 unscaled.
    x = torch.zeros(2, 32)
    for r, start in enumerate((0, 15)):
        chunk = THRESHOLDS[start:start + 15]
        x[r, 0], x[r, 16] = 6.0, 2688.0
        x[r, 1:1 + len(chunk)] = sign * torch.tensor(chunk)
    tri = _check(x)
    assert tri.scale.float()[:, 0].tolist() == [1.0, 1.0]
    # And one expected code checked directly (not only through the reference): 2.5 is a tie that goes to 2.
    assert tri.codes().cpu()[0, 1 + THRESHOLDS.index(2.5)].item() == (4 | (8 if sign < 0 else 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 16), (3, 48), (2, 5, 64), (40, 96)])
def test_random_shapes_and_dtypes(shape, dtype):
    x = (torch.randn(shape) * torch.logspace(-3, 3, shape[-1])).to(dtype)
    _check(x)


def test_all_zero_tensor_and_zero_blocks():
    tri = _check(torch.zeros(4, 32))
    assert tri.per_tensor_scale.item() == 1.0 and torch.count_nonzero(tri.qdata) == 0
    x = torch.randn(4, 32)
    x[1, :16] = 0
    _check(x)


def test_outlier_next_to_tiny_values():
    x = torch.full((2, 16), 1e-3)
    x[0, 7] = 1e4
    x[1, 3] = -1e4
    _check(x)


def test_subnormal_and_underflowing_block_scales():
    x = torch.ones(4, 16)
    x[0] *= 1000.0
    x[1] *= 1000.0 * 2.0**-16
    x[2] *= 1000.0 * 1e-9
    x[3] = torch.linspace(-1, 1, 16) * 1000.0 * 2.0**-13  # every subnormal E4M3 byte region
    tri = _check(x)
    scales = tri.scale.float()[:, 0].cpu()
    assert scales[0] == 448.0 and 0 < scales[1] < 2.0**-6 and scales[2] == 0.0


def test_every_e4m3_scale_byte():
    # Block maxima that sweep every E4M3 value and the midpoints between neighbours (ties to even).
    grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (grid[:-1] + grid[1:]) / 2
    targets = torch.cat([grid, mids, mids * (1 + 2**-20), mids * (1 - 2**-20)])
    targets = torch.cat([targets, torch.zeros(16 - targets.numel() % 16)]) if targets.numel() % 16 else targets
    # Row r holds the target block max in element 0; the tensor amax 2688 makes S = 1, so d_b = e4m3(t * fp32(1/6)).
    x = torch.zeros(targets.numel(), 32)
    x[:, 0] = targets * 6
    x[0, 16] = 2688.0
    tri = _check(x)
    assert len(set(tri.scale.view(torch.uint8)[:, 0].tolist())) == 127


def scale_order_sensitive_rows(tensor_amax=3.3):
    """A (rows, 16) tensor whose block maxima give a different E4M3 scale if ``amax_b * (S * (1/6))`` were
    computed in another order (``(amax_b * S) * (1/6)``): near-midpoints of E4M3, found by search."""
    t = torch.tensor(tensor_amax)
    s = torch.tensor(2688.0) / t
    grid = torch.arange(1, 126, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (grid[:-1] + grid[1:]) / 2
    found = []
    for ulps in range(-64, 65):
        m = mids * 6 / s * (1 + ulps * 2.0**-23)
        m = m[m < t]
        spec = (m * (s * torch.tensor(1 / 6))).clamp(max=448).to(torch.float8_e4m3fn).view(torch.uint8)
        other = ((m * s) * torch.tensor(1 / 6)).clamp(max=448).to(torch.float8_e4m3fn).view(torch.uint8)
        found.append(m[spec != other])
    maxima = torch.cat(found)
    assert maxima.numel() >= 8
    x = torch.randn(maxima.numel() + 1, 16).clamp(-1, 1) * 0.5
    x[:-1, 0] = maxima * torch.sign(torch.randn(maxima.numel()))
    x[:-1] *= (x[:-1, :1].abs() / x[:-1].abs().amax(1, keepdim=True)).clamp(max=1)
    x[:-1, 0] = maxima
    x[-1, 3] = tensor_amax
    return x


def test_block_scale_product_order():
    _check(scale_order_sensitive_rows())


@pytest.mark.parametrize("amax", [0.0, 1e-40, 1e-30, 1.0, 1e30, 3e38])
def test_tensor_amax_extremes(amax):
    _check(torch.linspace(-1, 1, 64).reshape(2, 32) * amax)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("fmt, block", [("nvfp4", None), ("mxfp4", None), ("nvfp4", (16, 16))])
def test_non_finite_input_gives_nan_blocks(bad, fmt, block):
    x = torch.randn(32, 64)
    x[2, 5] = bad
    tri = _check(x, format=fmt, block=block)
    deq = tri.dequantize().cpu()
    assert torch.isnan(deq[2, :tri.block[1]]).all()
    assert torch.isfinite(deq[16:]).all()


def test_non_contiguous_inputs_read_through_strides():
    base = torch.randn(64, 48).to(DEVICE)
    xt = base.t()
    x2, _, _ = cq._as_2d_view(xt)
    assert x2.data_ptr() == base.data_ptr() and x2.stride() == (1, 48)  # no transpose copy
    _check(xt)
    _check(torch.randn(8, 128)[:, ::2])
    _check(torch.randn(4, 32, 6).permute(2, 0, 1))  # (6, 4, 32) with leading axes that do not collapse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_2d_tiles(dtype):
    w = (torch.randn(64, 96) * torch.logspace(-2, 2, 96)).to(dtype)
    _check(w, block=(16, 16))
    _check(w.t(), block=(16, 16))  # the same tiles seen from W^T, through strides


@pytest.mark.parametrize("block", [(1, 8), (1, 32), (1, 64), (32, 32)])
def test_other_block_sizes(block):
    _check(torch.randn(64, 128) * 3, block=block)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp4_ceil"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4(fmt, dtype):
    x = (torch.randn(16, 128) * torch.logspace(-30, 30, 128)).to(dtype)
    x[3, :32] = 0  # a zero block: the smallest scale
    x[4, 32:64] = torch.tensor([1.5 * 2.0**k for k in range(32)])  # amax exactly at the CEIL threshold
    x[5, :32] = 1e-42  # fp32 subnormal block maxima
    _check(x, format=fmt)


def test_unsupported_scale_format_falls_back_to_reference(caplog):
    fmt = fp4compile.Fp4Format(16, E5M2, tensor_scale=True)
    x = torch.randn(8, 32)
    with caplog.at_level("INFO", logger="fp4compile.codegen.quantize"):
        ref, tri = _both(x.to(DEVICE), format=fmt)
    assert_bit_exact(ref, tri)
    assert "falling back to the reference" in caplog.text


def test_public_api_dispatches_to_triton():
    x = torch.randn(32, 64).to(DEVICE)
    a = fp4compile.quantize(x, impl="triton")
    b = fp4compile.quantize(x.cpu(), impl="reference")
    assert_bit_exact(b, a)


# --- stochastic rounding ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed, offset", [(0, 0), (7, 123), (2**40 + 5, 2**33 + 3), (torch.tensor(3), torch.tensor(9))])
@pytest.mark.parametrize("block", [(1, 16), (16, 16)])
def test_stochastic_bit_exact(seed, offset, block):
    x = torch.randn(48, 64) * 2
    _check(x, rounding="stochastic", seed=seed, offset=offset, block=block)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("block", [(1, 8), (1, 32), (16, 16)])
def test_stochastic_block_shapes_and_formats(fmt, block):
    # Every grid interval and both rounding paths of `_e2m1_stochastic` (|v| < 1 by comparison, >= 1 by carry).
    x = torch.randn(32, 128) * torch.logspace(-2, 2, 128)
    x[3, :32] = torch.linspace(-6, 6, 32)
    _check(x, format=fmt, block=block, rounding="stochastic", seed=13, offset=5)


def test_bf16_subnormal_inputs():
    # bf16 subnormals (fp32 subnormals once widened) next to a large tensor amax: blocks whose scale underflows
    # to 0, so e_b = FLT_MAX scales them up to the E2M1 range, where stochastic rounding needs their exact value.
    x = torch.zeros(4, 32, dtype=torch.bfloat16)
    x[0, :16] = -1e-38
    x[1, :16] = torch.linspace(-1e-38, 1e-38, 16).to(torch.bfloat16)
    x[2, :16] = 3e-39
    x[3, 5] = 1e4
    _check(x, rounding="stochastic", seed=42, offset=1000)
    _check(x)


def test_stochastic_bit_exact_partial_tiles_and_strides():
    _check(torch.randn(3, 5, 48), rounding="stochastic", seed=1, offset=17)
    _check(torch.randn(80, 48).t(), rounding="stochastic", seed=2, offset=0)


@pytest.mark.parametrize("shape", [(5, 24), (7, 40), (33, 8)])
def test_stochastic_blocks_of_8_straddling_rows(shape):
    # K % 16 == 8: a Philox call's 16 elements span two rows, so the kernel draws per chunk of 8 (counter and half).
    _check(torch.randn(shape) * 3, block=(1, 8), rounding="stochastic", seed=21, offset=3)


@pytest.mark.parametrize("block", [(1, 32), (1, 64), (32, 32)])
def test_stochastic_several_counters_per_block(block):
    # Blocks wider than 16 hold several 16-element groups, each with its own counter.
    _check(torch.randn(64, 192) * torch.logspace(-1, 1, 192), block=block, rounding="stochastic", seed=8, offset=99)


def test_stochastic_tiny_and_signed_zero_values():
    # Magnitudes far below a grid step (down to fp32 subnormals once scaled) truncate to t = 0 and round to 0, with
    # their sign; -0.0 and 0.0 give code 0. Exact small magnitudes next to 1/512 steps test the truncation itself.
    x = torch.zeros(8, 48)
    x[:, 0] = 1.0
    x[:, 1:16] = torch.tensor([1e-36, -1e-36, 1e-40, -1e-42, 3e-35, 1e-30, 1e-20, 2.0**-126, 2.0**-112, 2.0**-113,
                               1e-45, -0.0, 0.0, 1e-38, -5e-39])
    x[:, 16], x[:, 32] = 6.0, 2688.0  # the second block at unit scale (S = 1, d_b = 1): its values reach E2M1 as is
    x[:, 17:32] = torch.tensor([2.0**-9, 2.0**-9 - 2.0**-30, 2.0**-9 + 2.0**-30, 1 - 2.0**-24, 0.5 - 2.0**-25, 0.5,
                                1.0 + 2.0**-9 - 2.0**-22, 2 - 2.0**-22, 4 - 2.0**-21, 6 - 2.0**-21, -2.0**-10,
                                3 * 2.0**-10, -(255 * 2.0**-9), 255.5 * 2.0**-9, 5.0])
    tri = _check(x, rounding="stochastic", seed=4, offset=0)
    codes = tri.codes().cpu()
    assert (codes[:, 1:16] & 7 == 0).all()
    assert (codes[:, [1, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]] == 0).all() and (codes[:, [2, 4, 15]] == 8).all()
    assert tri.scale.float()[:, 1].eq(1.0).all() and codes[:, 18].eq(0).all()  # t = 0 just below 1/512


def _scaled_values(x, qt):
    d = qt.block_scales().cpu() * qt.per_tensor_scale.cpu()
    e = torch.clamp(torch.ones_like(d) / d, max=torch.finfo(torch.float32).max)
    return torch.clamp(x.reshape(d.shape) * e, -6, 6)


def test_stochastic_statistics():
    # 256 independent draws in one call: every row repeats x, and rows use different Philox counters.
    x = torch.randn(4, 64)
    reps = 256
    xs = x.repeat(reps, 1)
    qt = cq.quantize_triton(xs.to(DEVICE), fp4compile.NVFP4, (1, 16), fp4compile.Rounding.STOCHASTIC, 5, 0)
    # Each output is one of the two grid neighbours of the exact scaled value, with its sign.
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    v = _scaled_values(xs, qt)
    q = e2m1_values(qt.codes().cpu())
    idx = torch.searchsorted(grid, v.abs(), right=True) - 1
    lo, hi = grid[idx], grid[torch.clamp(idx + 1, max=7)]
    ok = ((q.abs() == lo) | (q.abs() == hi)) & ((q == 0) | (torch.sign(q) == torch.sign(v)))
    assert ok.all()
    # The mean converges (to within 1/256 of a grid step of the input) and beats round to nearest; its error falls
    # like 1/sqrt(draws).
    deq = qt.dequantize().cpu().reshape(reps, 4, 64)
    err_16 = (deq[:16].mean(0) - x).abs().mean()
    err_256 = (deq.mean(0) - x).abs().mean()
    near = (cq.quantize_triton(x.to(DEVICE), fp4compile.NVFP4, (1, 16), fp4compile.Rounding.NEAREST)
            .dequantize().cpu() - x).abs().mean()
    assert err_256 < near / 4
    assert err_256 < err_16 / 2.5
    # A single value between grid points: 0.3 in a unit-scale block has f = 0.6, t = floor(0.6 * 256) = 153, and
    # rounds up with probability 153 / 256 (spec section 5); 0.5 + 0.999 / 512 (t = 0) never rounds up.
    y = torch.zeros(64, 48)
    y[:, 0], y[:, 16], y[:, 32] = 6.0, 6.0, 2688.0
    y[:, 1:16] = 0.3
    y[:, 17:32] = 0.5 + 0.999 / 512
    qy = cq.quantize_triton(y.to(DEVICE), fp4compile.NVFP4, (1, 16), fp4compile.Rounding.STOCHASTIC, 11, 0)
    deq = qy.dequantize().cpu()
    mean = deq[:, 1:16].mean().item()
    assert abs(mean - 0.5 * 153 / 256) < 4 * 0.5 * math.sqrt(0.24 / (64 * 15))
    assert (deq[:, 17:32] == 0.5).all()


def test_stochastic_seed_and_offset_semantics():
    x = torch.randn(32, 64).to(DEVICE)
    q = lambda seed, offset: cq.quantize_triton(x, fp4compile.NVFP4, (1, 16), fp4compile.Rounding.STOCHASTIC,
                                               seed, offset).qdata
    a = q(1, 0)
    assert torch.equal(a, q(1, 0))
    assert not torch.equal(a, q(1, 1000))
    assert not torch.equal(a, q(2, 0))


# --- Hadamard and the column-wise form ----------------------------------------------------------------------

@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hadamard_bit_exact(rounding, dtype):
    x = (torch.randn(32, 64) * torch.logspace(-2, 2, 64)).to(dtype)
    _check(x, hadamard=True, rounding=rounding, seed=4, offset=8)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_hadamard_column_wise_from_row_major_activation(rounding):
    # The weight-gradient operand: activations (tokens, features) quantized along tokens, read via x.t().
    act = torch.randn(96, 48, dtype=torch.bfloat16).to(DEVICE)
    act[5, 7] = 40.0  # an outlier the RHT spreads over 16 tokens
    tri = _check(act.t(), hadamard=True, rounding=rounding, seed=9, offset=2)
    assert tri.qdata.shape == (48, 48) and tri.scale.shape == (48, 6)


@pytest.mark.parametrize("block", [(1, 8), (1, 32), (16, 16)])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_hadamard_other_blocks(block, rounding):
    # RHT runs of 16 that span two blocks of 8, or lie inside blocks of 32 and 16x16 tiles; column-wise too.
    x = torch.randn(64, 96) * torch.logspace(-2, 2, 96)
    _check(x, hadamard=True, block=block, rounding=rounding, seed=3, offset=1)
    _check(x.t(), hadamard=True, block=block, rounding=rounding, seed=3, offset=1)


@pytest.mark.parametrize("tile", [(16, 32, 2, 2, 1), (32, 64, 4, 4, 2), (64, 16, 4, 1, 4), (16, 64, 4, 8, 8)])
def test_tile_shapes(tile):
    # Other tiles, row vectors and (amax) programs per SM, (BLOCK_R, BLOCK_K, warps, ROW_VEC, programs per SM) as
    # --tiles sweeps them on the GPU, give the same bits, partial tiles included.
    x = torch.randn(48, 96).to(DEVICE)
    for view, had, rounding in ((x, False, "stochastic"), (x.t(), True, "stochastic"), (x, False, "nearest")):
        a = check_quantize_args(view, "nvfp4", None, rounding, had)
        ref = quantize_reference(view.cpu(), a.format, a.block, a.rounding, 7, 3, a.hadamard)
        tri, deq = cq.quantize_triton(view, a.format, a.block, a.rounding, 7, 3, a.hadamard, torch.float16,
                                      _tile=tile[:4])
        assert_bit_exact(ref, tri)
        assert torch.equal(deq.cpu().float(), ref.dequantize_unscaled().reshape(deq.shape))
        amax = cq.tensor_amax_triton(view, hadamard=had, _tile=tile)
        expected = (random_hadamard_transform(view.float().cpu()) if had else view.float().cpu()).abs().max()
        assert amax.item() == expected.item()


def test_hadamard_amax_after_transform():
    x = torch.zeros(1, 16)
    x[0, 0] = 4.0  # after the RHT every element is +-1
    tri = _check(x, hadamard=True)
    assert cq.tensor_amax_triton(x.to(DEVICE), hadamard=True).item() == 1.0
    assert tri.dequantize().abs().max().item() == 1.0


def test_tensor_amax_kernel():
    x = torch.randn(70, 48).to(DEVICE)
    assert cq.tensor_amax_triton(x).item() == x.abs().max().item()
    assert cq.tensor_amax_triton(x.t()).item() == x.abs().max().item()
    x[3, 4] = float("nan")
    assert math.isnan(cq.tensor_amax_triton(x).item())


@pytest.mark.parametrize("tile", [None, (16, 32, 2, 2, 1), (64, 16, 4, 1, 4)])
def test_both_tensor_amaxes_from_one_read(tile):
    # One pass over the (features, tokens) view gives the amax after the RHT along tokens and the plain amax,
    # each equal to its own reduction (the reference's), partial tiles included; NaN reaches both.
    x = torch.randn(80, 48) * 3
    x[5, 7] = -40.0  # the plain maximum; the RHT spreads it to 10 in its run
    view = x.to(DEVICE).t()
    got = cq.tensor_amaxes_triton(view, _tile=tile).cpu()
    expected = torch.stack([random_hadamard_transform(x.t().float()).abs().max(), x.abs().max()])
    assert torch.equal(got, expected), (got, expected)
    assert torch.equal(tensor_amaxes_reference(x.t()), expected)
    assert torch.equal(cq.tensor_amaxes_triton(view, hadamard=False).cpu(), expected[1].repeat(2))
    x[70, 3] = float("nan")
    assert cq.tensor_amaxes_triton(x.to(DEVICE).t(), _tile=tile).isnan().all()
    # A quantization given its amax equals the one that computes it.
    a = check_quantize_args(view, "nvfp4", None, "nearest", True)
    assert_bit_exact(quantize_reference(x.t()[:, :64].contiguous(), a.format, a.block, a.rounding, hadamard=True),
                     cq.quantize_triton(view[:, :64], a.format, a.block, a.rounding, hadamard=True,
                                        amax=cq.tensor_amaxes_triton(view[:, :64])[0]))


# --- the exact dequantized operand ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block", [(1, 16), (16, 16)])
@pytest.mark.parametrize("shape", [(32, 64), (48, 80)])  # (48, 80): partial tiles along both axes
def test_dequantized_operand_is_exact(dtype, block, shape):
    x = torch.randn(shape) * torch.logspace(-4, 4, shape[1])
    x[1, 3] = float("inf")
    ref, tri = _both(x.to(DEVICE), block=block)
    expected = ref.dequantize_unscaled().reshape(shape)
    out = cq.dequantize_unscaled_triton(tri, dtype).cpu()
    assert out.dtype == dtype
    # Exact: the float32 values survive the cast, NaN blocks stay NaN.
    assert torch.equal(out.float().nan_to_num(123.0), expected.nan_to_num(123.0))
    assert torch.equal(expected.to(dtype).float().nan_to_num(123.0), expected.nan_to_num(123.0))
    # The same operand written by the quantize kernel itself.
    a = check_quantize_args(x, "nvfp4", block, "nearest", False)
    _, fused = cq.quantize_triton(x.to(DEVICE), a.format, a.block, a.rounding, dequantized_dtype=dtype)
    assert torch.equal(fused.cpu().float().nan_to_num(123.0), expected.nan_to_num(123.0))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("hadamard", [False, True])
def test_dequantized_operand_column_wise(rounding, hadamard):
    # The operand written by the quantize kernel for x.t() (and after the RHT): E2M1[c] * d_b, -0.0 included.
    x = torch.randn(48, 64) * 4
    x[:16, 3] = -0.0
    a = check_quantize_args(x.t(), "nvfp4", None, rounding, hadamard)
    ref = quantize_reference(x.t(), a.format, a.block, a.rounding, 5, 0, a.hadamard)
    tri, deq = cq.quantize_triton(x.t().to(DEVICE), a.format, a.block, a.rounding, 5, 0, a.hadamard,
                                  dequantized_dtype=torch.float16)
    assert_bit_exact(ref, tri)
    expected = ref.dequantize_unscaled().reshape(64, 48)
    assert torch.equal(deq.cpu().float(), expected)
    assert torch.equal(torch.signbit(deq.cpu().float()), torch.signbit(expected))


def test_dequantized_operand_mxfp4():
    x = torch.randn(16, 64)
    ref, tri = _both(x.to(DEVICE), format="mxfp4")
    out = cq.dequantize_unscaled_triton(tri, torch.bfloat16).cpu()
    assert torch.equal(out.float(), ref.dequantize_unscaled().reshape(16, 64))


# --- full sizes on the GPU -----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8192, 8192), (8192, 3072), (3, 1000, 768)])
@pytest.mark.parametrize("variant", ["rtn", "sr", "2d", "hadamard_colwise"])
def test_full_size_bit_exact_on_gpu(shape, variant):
    if variant == "2d" and math.prod(shape[:-1]) % 16:
        pytest.skip("16x16 tiles need a multiple of 16 rows")
    x = (torch.randn(shape, device="cuda") * 3).to(torch.bfloat16)
    x.view(-1)[12345] = 300.0
    if variant == "rtn":
        ref, tri = _both(x, ref_device="cuda")
    elif variant == "sr":
        ref, tri = _both(x, rounding="stochastic", seed=1234, offset=2**20, ref_device="cuda")
    elif variant == "2d":
        ref, tri = _both(x, block=(16, 16), ref_device="cuda")
    else:
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] % 16:
            x2 = x2[: x2.shape[0] // 16 * 16]
        ref, tri = _both(x2.t(), hadamard=True, rounding="stochastic", seed=3, offset=7, ref_device="cuda")
    assert_bit_exact(ref, tri)


@pytest.mark.gpu
def test_gpu_matches_cpu_reference():
    # The CUDA reference is checked above; here one full-size case against the CPU reference as well.
    x = torch.randn(2048, 3072, device="cuda") * torch.logspace(-3, 3, 3072, device="cuda")
    ref, tri = _both(x, ref_device="cpu")
    assert_bit_exact(ref, tri)
    ref, tri = _both(x, rounding="stochastic", seed=5, offset=11, ref_device="cpu")
    assert_bit_exact(ref, tri)
