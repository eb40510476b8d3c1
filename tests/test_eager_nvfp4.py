"""The independent eager NV recipe (`fp4compile.testing.eager_nvfp4`), the yardstick of the training studies.

It shares no code with fp4compile's quantizer, so these tests hold it to the specification from outside:
round to nearest gives the reference's values exactly wherever the order of FP32 operations is fixed (1x16 and
16x16 blocks without the Hadamard transform); with the transform, the same codes and scales up to the last bit of
the tensor scale; its stochastic rounding is unbiased (exact mode) or rounds up with ``floor(f * 256) / 256``
(8-bit mode, docs/numerics.md section 2.2); and its layer's three GEMMs are the recipe's, checked against
fp4compile's reference GEMMs to float32 summation order.
"""

from __future__ import annotations

import pytest
import torch

import fp4compile
from fp4compile.policy.precision import LinearPrecision
from fp4compile.recipes import nv_recipe_precisions
from fp4compile.testing import ReferenceFakeQuantLinear
from fp4compile.testing.eager_nvfp4 import EagerNvfp4Config, EagerNvfp4Linear, quantize_dequantize, swap_in_eager_nvfp4


def _data(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.exp(2 * torch.randn(rows, 1, generator=g))


@pytest.mark.parametrize("tile_rows", [1, 16])
def test_round_to_nearest_equals_the_reference(tile_rows):
    x = _data(128, 256)
    u, d = quantize_dequantize(x, tile_rows, stochastic=False)
    ref = fp4compile.quantize(x, "nvfp4", (tile_rows, 16), "nearest", impl="reference").dequantize()
    assert torch.equal(u * d, ref)


def test_round_to_nearest_with_the_hadamard_transform_matches_up_to_the_tensor_scale():
    x = _data(64, 512, seed=1)
    u, d = quantize_dequantize(x, 1, stochastic=False, hadamard=True)
    qt = fp4compile.quantize(x, "nvfp4", (1, 16), "nearest", hadamard=True, impl="reference")
    ref = qt.dequantize()
    # Same codes and block scales: the unscaled operands agree exactly; only D's last bit may differ.
    torch.testing.assert_close(u * d, ref, rtol=2**-22, atol=0)


@pytest.mark.parametrize("sr_bits", [None, 8])
def test_stochastic_rounding_below_one_256th_of_a_step(sr_bits):
    """A block whose maximum is 6 has scale 1 in scaled units, so an element ``v`` below 0.5 rounds up to 0.5 with
    probability ``f = v / 0.5``: exactly that in the exact mode, and never when ``f < 1/256`` in the 8-bit mode."""
    torch.manual_seed(0)
    f = 15 / 4096  # below 1/256
    x = torch.tensor([6.0] + [0.5 * f] * 15).repeat(4096, 1)
    u, d = quantize_dequantize(x, 1, stochastic=True, sr_bits=sr_bits)
    values = (u * d)[:, 1:]
    assert set(values.unique().tolist()) <= {0.0, 0.5}
    ups = int((values == 0.5).sum())
    if sr_bits == 8:
        assert ups == 0
    else:
        expected, std = values.numel() * f, (values.numel() * f * (1 - f)) ** 0.5
        assert abs(ups - expected) < 5 * std, (ups, expected)


def test_the_layer_runs_the_recipes_three_gemms():
    """Round to nearest everywhere (no random draws): forward, input and weight gradients equal fp4compile's
    reference layer with the same precisions up to float32 summation order and the Hadamard tensor scale's bit."""
    torch.manual_seed(0)
    x = _data(64, 48, seed=2).requires_grad_()
    w = (0.1 * _data(32, 48, seed=3)).requires_grad_()
    b = torch.randn(32, requires_grad=True)
    dy = _data(64, 32, seed=4)
    cfg = EagerNvfp4Config(stochastic_gradients=False)
    y = EagerNvfp4Linear.apply(x, w, b, cfg)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)
    fwd, dgrad, wgrad = nv_recipe_precisions()
    nearest = lambda p: type(p)(*(type(o)(o.format, o.block, "nearest", o.hadamard) for o in (p.lhs, p.rhs)))  # noqa: E731
    ref_cfg = LinearPrecision(fwd, nearest(dgrad), nearest(wgrad))
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y_ref = ReferenceFakeQuantLinear.apply(x2, w2, b2, ref_cfg)
    rx, rw, rb = torch.autograd.grad(y_ref, (x2, w2, b2), dy)
    for got, ref in ((y, y_ref), (gx, rx), (gw, rw), (gb, rb)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_swap_names_a_layer_that_is_not_linear():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())
    with pytest.raises(ValueError, match="'1' is not an nn.Linear"):
        swap_in_eager_nvfp4(model, ["1"])
    with pytest.raises(ValueError, match="'head' is not an nn.Linear"):
        swap_in_eager_nvfp4(model, ["head"])


def test_shapes_that_are_not_whole_blocks_are_refused():
    with pytest.raises(ValueError, match=r"\(16, 24\) is not a whole number of 1x16 blocks"):
        quantize_dequantize(torch.ones(16, 24), 1, stochastic=False)
