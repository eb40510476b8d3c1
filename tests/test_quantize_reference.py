"""The reference quantizer against docs/numerics.md section 2, bit for bit."""

import math

import pytest
import torch

import fp4compile
from fp4compile.numerics.formats import E4M3, E5M2, SCALE_FORMATS, resolve_format
from fp4compile.numerics.rounding import e2m1_values, round_to_float_format

from independent_nvfp4 import dequantize as np_dequantize
from independent_nvfp4 import philox4x32_10, quantize_nvfp4_1x16

# Expected code of each magnitude (docs/numerics.md section 2 step 5): thresholds and their ties.
THRESHOLD_CASES = [
    (0.0, 0), (0.25, 0), (0.2500001, 1), (0.5, 1), (0.7499999, 1), (0.75, 2), (1.0, 2), (1.25, 2),
    (1.2500001, 3), (1.5, 3), (1.7499999, 3), (1.75, 4), (2.0, 4), (2.5, 4), (2.5000002, 5), (3.0, 5),
    (3.4999998, 5), (3.5, 6), (4.0, 6), (5.0, 6), (5.0000005, 7), (6.0, 7),
]


def _unit_scale_block(values):
    """A (1, 32) tensor whose first block quantizes with e_b == 1: the tensor amax is 2688 (S = 1, D = 1)
    and the block holds 6 (d_b = e4m3(6 * fp32(1/6)) = 1), so ``values`` reach E2M1 rounding unscaled."""
    x = torch.zeros(1, 32)
    x[0, 0] = 6.0
    x[0, 1 : 1 + len(values)] = torch.tensor(values)
    x[0, 16] = 2688.0
    return x


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_every_e2m1_threshold_and_tie(sign):
    mags = [m for m, _ in THRESHOLD_CASES]
    for start in range(0, len(mags), 15):
        chunk = mags[start : start + 15]
        qt = fp4compile.quantize(_unit_scale_block([sign * m for m in chunk]))
        assert qt.per_tensor_scale.item() == 1.0 and qt.scale.float()[0, 0].item() == 1.0
        codes = qt.codes()[0, 1 : 1 + len(chunk)]
        for m, code in zip(chunk, codes.tolist()):
            expected = dict(THRESHOLD_CASES)[m]
            if sign < 0 and m > 0:
                expected |= 8
            assert code == expected, f"magnitude {sign * m}: code {code}, expected {expected}"


def test_e2m1_values_table():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = e2m1_values(codes)
    assert vals[:8].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert vals[9:].tolist() == [-0.5, -1, -1.5, -2, -3, -4, -6]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 16), (3, 48), (2, 5, 64), (128, 256)])
def test_matches_independent_implementation(shape, dtype):
    x = (torch.randn(shape) * torch.logspace(-3, 3, shape[-1])).to(dtype)
    qt = fp4compile.quantize(x)
    x2 = x.float().reshape(-1, shape[-1]).numpy()
    codes, scales, d = quantize_nvfp4_1x16(x2)
    assert torch.equal(qt.codes().reshape(codes.shape), torch.from_numpy(codes))
    assert torch.equal(qt.scale.float().reshape(scales.shape), torch.from_numpy(scales))
    assert qt.per_tensor_scale.item() == float(d)
    expected = torch.from_numpy(np_dequantize(codes, scales, d)).reshape(shape)
    assert torch.equal(qt.dequantize(torch.float32), expected)


def test_large_shape_matches_recomputed_spec_scales():
    x = torch.randn(1024, 2048) * 3
    qt = fp4compile.quantize(x)
    amax = x.abs().max()
    s = torch.clamp(torch.tensor(2688.0) / amax, max=torch.finfo(torch.float32).max)
    assert qt.per_tensor_scale.item() == (torch.tensor(1.0) / s).item()
    block_amax = x.abs().reshape(1024, 128, 16).amax(-1)
    d = torch.clamp(block_amax * (s * torch.tensor(1 / 6)), max=448).to(torch.float8_e4m3fn)
    assert torch.equal(qt.scale.view(torch.uint8), d.view(torch.uint8))


def test_all_zero_tensor_and_blocks():
    qt = fp4compile.quantize(torch.zeros(4, 32))
    assert qt.per_tensor_scale.item() == 1.0
    assert torch.count_nonzero(qt.qdata) == 0 and torch.count_nonzero(qt.scale.float()) == 0
    x = torch.randn(4, 32)
    x[1, :16] = 0
    qt = fp4compile.quantize(x)
    assert qt.scale.float()[1, 0].item() == 0
    assert torch.count_nonzero(qt.dequantize()[1, :16]) == 0
    assert torch.count_nonzero(qt.dequantize()[1, 16:]) > 0


def test_outlier_next_to_tiny_values():
    x = torch.full((1, 16), 1e-3)
    x[0, 7] = 1e4
    qt = fp4compile.quantize(x)
    deq = qt.dequantize()
    assert deq[0, 7].item() == pytest.approx(1e4, rel=0.2)
    assert torch.count_nonzero(deq[0, torch.arange(16) != 7]) == 0  # the tiny ones flush to zero


def test_subnormal_and_underflowing_block_scales():
    # One huge block sets D; a block at 1e-6 of it gets an E4M3 subnormal scale, one at 1e-9 underflows to 0.
    x = torch.ones(3, 16)
    x[0] *= 1000.0
    x[1] *= 1000.0 * 2.0**-16
    x[2] *= 1000.0 * 1e-9
    qt = fp4compile.quantize(x)
    scales = qt.scale.float()[:, 0]
    assert scales[0].item() == 448.0  # the amax block maps to the largest E4M3 scale
    assert 0 < scales[1].item() < 2.0**-6  # subnormal E4M3 (smallest normal is 2^-6)
    assert scales[2].item() == 0.0
    assert torch.count_nonzero(qt.dequantize()[2]) == 0
    assert torch.isfinite(qt.dequantize()).all()


def test_448_clamp_without_tensor_scale():
    fmt = fp4compile.Fp4Format(16, E4M3, tensor_scale=False)
    x = torch.full((1, 16), 1e5)
    qt = fp4compile.quantize(x, fmt)
    assert qt.scale.float().item() == 448.0
    assert qt.dequantize()[0, 0].item() == 448.0 * 6  # saturates at the largest representable value


@pytest.mark.parametrize("amax", [0.0, 1e-40, 1e-30, 1.0, 1e30, 3e38])
def test_tensor_amax_extremes_stay_finite_and_close(amax):
    x = torch.linspace(-1, 1, 64).reshape(2, 32) * amax
    qt = fp4compile.quantize(x)
    deq = qt.dequantize()
    assert torch.isfinite(deq).all() and torch.isfinite(qt.per_tensor_scale)
    if amax == 0:
        assert qt.per_tensor_scale.item() == 1.0 and torch.count_nonzero(deq) == 0
    elif amax >= 1e-30:
        assert (deq - x).abs().max() <= 0.5 * x.abs().max()
        # The amax element maps to 6 * 448 * D, equal to amax up to the rounding of D = 1/S (docs/numerics.md section 2
        # step 2).
        assert abs(deq.abs().max() / x.abs().max() - 1) <= 2.0**-22


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_non_finite_input_gives_nan_blocks(bad, fmt):
    x = torch.randn(4, 64)
    x[2, 5] = bad
    qt = fp4compile.quantize(x, fmt)
    deq = qt.dequantize()
    b = qt.block[1]
    assert torch.isnan(deq[2, :b]).all()
    others = torch.ones_like(deq, dtype=torch.bool)
    others[2, :b] = False
    assert torch.isfinite(deq[others]).all()


def test_non_contiguous_input():
    base = torch.randn(64, 48)
    x = base.t()  # (48, 64), strides (1, 48)
    assert not x.is_contiguous()
    qa, qb = fp4compile.quantize(x), fp4compile.quantize(x.contiguous())
    assert torch.equal(qa.qdata, qb.qdata) and torch.equal(qa.scale.view(torch.uint8), qb.scale.view(torch.uint8))
    sliced = torch.randn(8, 128)[:, ::2]
    assert torch.equal(fp4compile.quantize(sliced).qdata, fp4compile.quantize(sliced.contiguous()).qdata)


def test_packing_round_trip_and_layout():
    codes = torch.randint(0, 16, (5, 32), dtype=torch.uint8)
    from fp4compile.numerics.qtensor import pack_codes, unpack_codes

    packed = pack_codes(codes)
    assert torch.equal(unpack_codes(packed), codes)
    assert torch.equal(packed[:, 0] & 0xF, codes[:, 0]) and torch.equal(packed[:, 0] >> 4, codes[:, 1])
    # The same bytes read as torch.float4_e2m1fn_x2 are well-formed (its layout is ours: low nibble first).
    assert packed.view(torch.float4_e2m1fn_x2).shape == (5, 16)


def test_2d_tiles_give_the_same_matrix_for_w_and_wt():
    w = torch.randn(64, 96) * torch.logspace(-2, 2, 96)
    a = fp4compile.quantize(w, block=(16, 16))
    b = fp4compile.quantize(w.t(), block=(16, 16))
    assert a.scale.shape == (4, 6) and b.scale.shape == (6, 4)
    assert torch.equal(a.dequantize(), b.dequantize().t())
    assert torch.equal(a.scale.float(), b.scale.float().t())


def test_2d_tiles_share_one_scale_per_tile():
    w = torch.randn(32, 32)
    qt = fp4compile.quantize(w, block=(16, 16))
    tile_amax = w.abs().reshape(2, 16, 2, 16).amax((1, 3))
    s = torch.tensor(2688.0) / w.abs().max()
    assert torch.equal(qt.scale, torch.clamp(tile_amax * (s * torch.tensor(1 / 6)), max=448).to(torch.float8_e4m3fn))


# --- stochastic rounding (docs/numerics.md sections 2.2 and 5) --------------------------------------------------------

def _scaled(x, qt):
    """The exact spec values x * e_b (step 4-5) that stochastic rounding rounds, clamped to [-6, 6]."""
    d = qt.block_scales() * qt.per_tensor_scale
    e = torch.clamp(torch.ones_like(d) / d, max=torch.finfo(torch.float32).max)
    return torch.clamp(x.reshape(d.shape) * e, -6, 6)


def test_stochastic_outputs_are_grid_neighbours():
    x = torch.randn(64, 64)
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    for seed in range(4):
        qt = fp4compile.quantize(x, rounding="stochastic", seed=seed)
        v = _scaled(x, qt)
        q = e2m1_values(qt.codes())
        idx = torch.searchsorted(grid, v.abs(), right=True) - 1
        lo, hi = grid[idx], grid[torch.clamp(idx + 1, max=7)]
        ok = ((q.abs() == lo) | (q.abs() == hi)) & ((q == 0) | (torch.sign(q) == torch.sign(v)))
        assert ok.all(), f"{(~ok).sum()} values not on a neighbouring grid point"
        assert torch.equal(qt.scale.float(), fp4compile.quantize(x).scale.float())


def test_stochastic_mean_converges_and_beats_nearest():
    x = torch.randn(16, 64)
    draws = [fp4compile.quantize(x, rounding="stochastic", seed=7, offset=i * 64).dequantize() for i in range(512)]
    stack = torch.stack(draws)
    err_1 = (stack[:32].mean(0) - x).abs().mean()
    err_2 = (stack.mean(0) - x).abs().mean()
    near_err = (fp4compile.quantize(x).dequantize() - x).abs().mean()
    assert err_2 < near_err / 4
    # 16x the draws: the error of the mean should fall by about 4x (1/sqrt(draws)); allow slack.
    assert err_2 < err_1 / 2.5


def _unit_scale_rows(value, rows):
    """``rows`` copies of a unit-scale block (see `_unit_scale_block`) holding ``value`` 15 times: one call gives
    15 * rows draws of the same magnitude, each from its own random byte."""
    return _unit_scale_block([value] * 15).repeat(rows, 1)


def test_stochastic_mean_is_lo_plus_step_times_t_over_256():
    # 0.3 sits between 0 and 0.5: f = 0.6, t = floor(0.6 * 256) = 153, so E[q] = 0.5 * 153 / 256 (spec section 5).
    draws = fp4compile.quantize(_unit_scale_rows(0.3, 400), rounding="stochastic", seed=11, offset=3)
    values = draws.dequantize()[:, 1:16]
    assert abs(values.mean().item() - 0.5 * 153 / 256) < 4 * 0.5 * math.sqrt(0.6 * 0.4 / values.numel())


@pytest.mark.parametrize("lo, step", [(0.0, 0.5), (0.5, 0.5), (1.0, 0.5), (2.0, 1.0), (4.0, 2.0)])
def test_stochastic_uses_8_random_bits(lo, step):
    # Only the 8 bits below E2M1's last kept bit count (PTX cvt.rs): below 1/256 of a step nothing rounds up, and
    # 1.999/256 of a step rounds up with probability 1/256, not 1.999/256. 12000 draws per value: a 24-bit uniform
    # would round up about 47 of the first and 94 of the second; here 0 and 47 +- 7.
    rows = 800
    n = rows * 15
    for frac, t in ((0.999 / 256, 0), (1.999 / 256, 1), (128.5 / 256, 128), (255.5 / 256, 255)):
        value = lo + step * frac
        assert math.floor((torch.tensor(value).item() - lo) / step * 256) == t  # t of the float32 value
        qt = fp4compile.quantize(_unit_scale_rows(value, rows), rounding="stochastic", seed=5, offset=0)
        q = qt.dequantize()[:, 1:16]
        assert ((q == lo) | (q == lo + step)).all()
        ups = (q == lo + step).sum().item()
        if t == 0:
            assert ups == 0, (value, ups)
        else:
            p = t / 256
            assert abs(ups - n * p) < 5 * math.sqrt(n * p * (1 - p)) + 1, (value, ups, n * p)


def test_stochastic_counters_per_call_are_ceil_numel_over_16():
    # Element i draws from counter offset + i // 16: a (2, 48) call uses 6 counters, so a (1, 48) call at offset + 6
    # continues exactly where it ended. Values at unit scale (S = 1, d_b = 1 in every block).
    x = torch.rand(3, 48) * 5.9
    x[:, 0], x[:, 16], x[:, 32] = 6.0, 2688.0, 6.0
    whole = fp4compile.quantize(x, rounding="stochastic", seed=9, offset=100)
    first = fp4compile.quantize(x[:2], rounding="stochastic", seed=9, offset=100)
    last = fp4compile.quantize(x[2:], rounding="stochastic", seed=9, offset=106)
    assert whole.per_tensor_scale.item() == first.per_tensor_scale.item() == last.per_tensor_scale.item() == 1.0
    assert torch.equal(torch.cat([first.codes(), last.codes()]), whole.codes())
    assert not torch.equal(fp4compile.quantize(x[2:], rounding="stochastic", seed=9, offset=105).codes(), last.codes())


def test_random_bytes_layout():
    from fp4compile.numerics.philox import random_bytes

    # Byte i % 4 (least significant first) of word (i % 16) // 4 at counter offset + i // 16.
    got = random_bytes(7, 40, 37, torch.device("cpu")).tolist()
    expected = [(philox4x32_10(40 + i // 16, 7)[(i % 16) // 4] >> (8 * (i % 4))) & 0xFF for i in range(37)]
    assert got == expected


@pytest.mark.parametrize("seed, offset", [(0, 0), (7, 123), (2**40 + 5, 2**33 + 3)])
@pytest.mark.parametrize("shape", [(16, 16), (3, 48), (2, 5, 64)])
def test_stochastic_matches_independent_implementation(shape, seed, offset):
    x = torch.randn(shape) * torch.logspace(-2, 2, shape[-1])
    qt = fp4compile.quantize(x, rounding="stochastic", seed=seed, offset=offset)
    codes, scales, _ = quantize_nvfp4_1x16(x.reshape(-1, shape[-1]).numpy(), stochastic=True, seed=seed, offset=offset)
    assert torch.equal(qt.codes().reshape(codes.shape), torch.from_numpy(codes))
    assert torch.equal(qt.scale.float().reshape(scales.shape), torch.from_numpy(scales))


def test_stochastic_keeps_grid_points_and_saturates():
    # Grid points have t = 0 and never move, in both signs; a value beyond 6 * d_b clamps to 6 and stays there.
    grid = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    x = _unit_scale_block(grid + [-g for g in grid]).repeat(64, 1)
    qt = fp4compile.quantize(x, rounding="stochastic", seed=1, offset=0)
    assert torch.equal(qt.codes()[:, :16], fp4compile.quantize(x).codes()[:, :16])
    y = torch.full((64, 16), 1.0)
    y[:, 0] = 6.3  # d_b = e4m3(6.3 / 6) = 1 (rounded down), so 6.3 scales past 6 and clamps to it
    qy = fp4compile.quantize(torch.cat([y, torch.full((64, 16), 2688.0)], dim=1), rounding="stochastic", seed=2)
    assert (qy.scale.float()[:, 0] == 1.0).all()
    assert (qy.codes()[:, 0] == 7).all()


def test_stochastic_seed_and_offset_semantics():
    x = torch.randn(32, 64)
    a = fp4compile.quantize(x, rounding="stochastic", seed=1, offset=0)
    b = fp4compile.quantize(x, rounding="stochastic", seed=1, offset=0)
    c = fp4compile.quantize(x, rounding="stochastic", seed=1, offset=1000)
    d = fp4compile.quantize(x, rounding="stochastic", seed=2, offset=0)
    assert torch.equal(a.qdata, b.qdata)
    assert not torch.equal(a.qdata, c.qdata)
    assert not torch.equal(a.qdata, d.qdata)
    seed_t = fp4compile.quantize(x, rounding="stochastic", seed=torch.tensor(1), offset=torch.tensor(0))
    assert torch.equal(a.qdata, seed_t.qdata)


def test_philox_known_answer():
    from fp4compile.numerics.philox import philox4x32

    # Random123's known-answer vectors for Philox4x32-10: counter 0, key 0, and counter/key all ones.
    words = [w.item() for w in philox4x32(torch.tensor([0]), 0)]
    assert words == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


# --- Hadamard -----------------------------------------------------------------------------------------

def test_hadamard_matches_matrix_and_is_orthogonal():
    from fp4compile.numerics.hadamard import hadamard_matrix, random_hadamard_transform

    m = hadamard_matrix()
    assert torch.allclose(m @ m.t(), torch.eye(16, dtype=torch.float64), atol=0, rtol=0)
    x = torch.randn(8, 64)
    y = random_hadamard_transform(x)
    expected = (x.double().reshape(8, 4, 16) @ m.t()).reshape(8, 64)
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(random_hadamard_transform(y, inverse=True), x, rtol=1e-6, atol=1e-6)
    # Orthogonal on each run: dot products along the transformed axis are preserved.
    a, b = torch.randn(16, 32, dtype=torch.float64), torch.randn(16, 32, dtype=torch.float64)
    ta = random_hadamard_transform(a.float().t().contiguous()).double().t()
    tb = random_hadamard_transform(b.float().t().contiguous()).double().t()
    torch.testing.assert_close(ta.t() @ tb, a.float().double().t() @ b.float().double(), rtol=1e-5, atol=1e-5)


def test_hadamard_amax_taken_after_transform():
    x = torch.zeros(1, 16)
    x[0, 0] = 4.0  # after the RHT every element is +-1
    qt = fp4compile.quantize(x, hadamard=True)
    assert qt.dequantize().abs().max().item() == 1.0
    assert qt.per_tensor_scale.item() == (torch.tensor(1.0) / (torch.tensor(2688.0) / 1.0)).item()


# --- MXFP4 and other scale formats ----------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp4_ceil"])
def test_mxfp4_scales_are_powers_of_two(fmt):
    x = torch.randn(8, 128) * torch.logspace(-4, 4, 128)
    qt = fp4compile.quantize(x, fmt)
    assert qt.scale.dtype == torch.float8_e8m0fnu and qt.scale.shape == (8, 4)
    s = qt.scale.float()
    mant, _ = torch.frexp(s)
    assert torch.all(mant == 0.5)
    assert qt.per_tensor_scale.item() == 1.0
    amax_b = x.abs().reshape(8, 4, 32).amax(-1)
    if fmt == "mxfp4":
        assert torch.equal(s, 2.0 ** (torch.floor(torch.log2(amax_b)) - 2))
    else:
        assert torch.all(6 * s >= amax_b) and torch.all(3 * s < amax_b)  # the smallest that does not saturate


@pytest.mark.parametrize("name", sorted(SCALE_FORMATS))
def test_every_scale_format_quantizes_with_small_error(name):
    fmt = fp4compile.Fp4Format(
        16, SCALE_FORMATS[name], tensor_scale=name != "e8m0", scale_rounding="floor" if name == "e8m0" else "nearest"
    )
    x = torch.randn(16, 64)
    deq = fp4compile.quantize_dequantize(x, fmt)
    rel = ((deq - x).norm() / x.norm()).item()
    assert rel < (0.35 if name == "e1m6" else 0.2), rel
    assert resolve_format(fmt.spec) == fmt


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_scale_format_emulation_matches_torch(fmt):
    x = torch.cat([torch.rand(20000) * fmt.max_value, torch.rand(20000) * fmt.min_value * 64, torch.zeros(1)])
    x = torch.cat([x, torch.tensor([fmt.min_value / 2, fmt.min_value * 1.5, fmt.max_value])])
    assert torch.equal(round_to_float_format(x, fmt), x.to(fmt.torch_dtype).float())


@pytest.mark.parametrize("block", [8, 16, 32, 64, 128])
def test_block_sizes(block):
    x = torch.randn(4, 256)
    qt = fp4compile.quantize(x, block=(1, block))
    assert qt.scale.shape == (4, 256 // block) and qt.format.block_size == block


# --- argument errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, x, match",
    [
        ({}, torch.randn(4, 100), r"size 100.*not divisible by the block size 16"),
        ({"format": "fp5"}, torch.randn(4, 16), r"unknown format 'fp5'"),
        ({"rounding": "up"}, torch.randn(4, 16), r"rounding must be one of"),
        ({}, torch.arange(32).reshape(2, 16), r"must be float32, bfloat16 or float16.*torch.int64"),
        ({"block": (2, 16)}, torch.randn(4, 16), r"block must be \(1, b\) or \(b, b\)"),
        ({"block": (16, 16)}, torch.randn(8, 16), r"multiple of 16 rows, got 8"),
        ({"impl": "cuda"}, torch.randn(4, 16), r"impl must be one of"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, x, match):
    with pytest.raises(ValueError, match=match):
        fp4compile.quantize(x, **kwargs)


def test_quantize_dequantize_keeps_dtype_and_shape():
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    y = fp4compile.quantize_dequantize(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert torch.equal(y, fp4compile.quantize(x).dequantize(torch.bfloat16))
