"""One FP4 training step against the same step in high precision: the output and every gradient above an SQNR
bound derived from the format (torchao's float8 integration tests hold 20 dB for float8; FP4 is coarser).

The other end-to-end tests compare the backend with `fp4compile.testing`'s module swap, which runs the same
reference quantizer and GEMM: a shared oracle, blind to a bug in both (a GEMM that drops its ``D_a * D_b``,
say). Here the oracle is plain PyTorch in float32, which shares nothing with the quantized path.

The bound (docs/numerics.md, "Quantizing" and "GEMM"). One quantization of a standard normal tensor with 1x16
blocks has an SQNR of 20.4 dB with round-to-nearest and 17.2 dB with stochastic rounding in NVFP4, 18.8 and
16.0 dB in MXFP4 (E2M1 elements; measured with `fp4compile.quantize` on a 1024x1024 normal tensor; the
16-point Hadamard transform leaves them unchanged). A GEMM of two quantized operands adds both errors; if every
GEMM a value passes through adds an independent error of that size, the noise powers add, so a value behind
``n`` quantized GEMMs has an SQNR of at least ``q - 10 log10(2 n)`` dB, ``q`` the per-operand SQNR:

- the output passes through the 8 forward GEMMs of the model's 2 blocks (round-to-nearest operands):
  NVFP4 20.4 - 12.0 = 8.4 dB, MXFP4 18.8 - 12.0 = 6.8 dB;
- a gradient passes through those and the 8 backward GEMMs whose gradient operand rounds stochastically:
  NVFP4 17.2 - 15.1 = 2.1 dB, MXFP4 16.0 - 15.1 = 0.9 dB.

Residual connections carry part of each value around the GEMMs, so the measured SQNRs lie 4-7 dB above these
bounds (here output 13.9-15.5 dB and worst gradient 6.0-6.7 dB over the three recipes; 5.8-8.7 dB for the worst
gradient over other model seeds and sizes): the derivation is the bound, the difference the margin. A
reference GEMM that drops its ``D_a * D_b`` brings the NVFP4 outputs to -2 dB (each LayerNorm renormalizes, so
not further; MXFP4 has no per-tensor scale); a GEMM off by a factor of 2 has 0 dB. That quantization happened at all is checked too: every linear of the blocks runs its
three GEMMs in FP4 (precision table), and the output is below 30 dB (an unquantized step gives over 100 dB).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import fp4compile
from helpers import batch
from models import GPT

# Per-operand SQNR (dB) of one quantization of standard normal data, (round to nearest, stochastic).
PER_OPERAND_SQNR_DB = {"nvfp4": (20.4, 17.2), "mxfp4": (18.8, 16.0)}
FORWARD_GEMMS_IN_PATH = 8  # 2 blocks x (qkv, attention projection, MLP up, MLP down)
ALL_GEMMS_IN_PATH = 16  # and their input-gradient GEMMs
QUANTIZED_AT_MOST_DB = 30.0

#: recipe name -> (format of its operands, its constructor with every block quantized)
RECIPES = {
    "nvfp4": ("nvfp4", lambda: fp4compile.recipes.nvfp4(high_precision_first_blocks=0, high_precision_last_blocks=0)),
    "mxfp4": ("mxfp4", lambda: fp4compile.recipes.mxfp4(high_precision_first_blocks=0, high_precision_last_blocks=0)),
    "fp4_all_the_way": ("nvfp4", fp4compile.recipes.fp4_all_the_way),
}


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """``10 log10(|reference|^2 / |reference - approx|^2)``; inf when equal."""
    noise = (reference.double() - approx.double()).pow(2).sum()
    return float(10 * torch.log10(reference.double().pow(2).sum() / noise))


def bound_db(per_operand_db: float, gemms: int) -> float:
    """The SQNR of a value behind ``gemms`` quantized GEMMs of two operands each whose noise powers add."""
    return per_operand_db - 10 * math.log10(2 * gemms)


class GPTLogits(nn.Module):
    """The test GPT returning its logits (the output whose SQNR is measured) instead of the loss."""

    def __init__(self, gpt: nn.Module) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = self.gpt.transformer
        x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in t.h:
            x = block(x)
        return self.gpt.lm_head(t.ln_f(x))


def _step(model: nn.Module, idx: torch.Tensor, cotangent: torch.Tensor):
    """Output and gradients of one step with a fixed output gradient (no loss: the gradients' error comes from the
    backward GEMMs, not from a softmax of noisy logits)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # stochastic-rounding keys
    out = model(idx)
    out.backward(cotangent)
    return out.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}


def _model_and_data():
    model = GPTLogits(GPT(vocab=64, d=64, n_layer=2, n_head=2, block_size=32))
    idx, _ = batch(vocab=64, b=2, t=32)
    cotangent = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(2))
    return model, idx, cotangent


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_fp4_step_is_within_the_format_bound_of_the_high_precision_step(recipe):
    fmt, make_policy = RECIPES[recipe]
    model, idx, cotangent = _model_and_data()
    ref_out, ref_grads = _step(model, idx, cotangent)  # eager float32: no fp4compile code runs

    be = fp4compile.Fp4Backend(policy=make_policy(), inner="aot_eager")
    out, grads = _step(torch.compile(model, backend=be), idx, cotangent)

    quantized = [r for r in be.rows() if r.precision != "high"]
    assert len(quantized) == 3 * FORWARD_GEMMS_IN_PATH, [(r.module, r.role, r.precision) for r in be.rows()]
    rtn_db, sr_db = PER_OPERAND_SQNR_DB[fmt]
    out_bound, grad_bound = bound_db(rtn_db, FORWARD_GEMMS_IN_PATH), bound_db(sr_db, ALL_GEMMS_IN_PATH)
    out_db = sqnr_db(ref_out, out)
    assert out_bound <= out_db <= QUANTIZED_AT_MOST_DB, f"output SQNR {out_db:.1f} dB, bound {out_bound:.1f} dB"
    grad_db = {name: sqnr_db(ref_grads[name], g) for name, g in grads.items()}
    worst = sorted(grad_db.items(), key=lambda kv: kv[1])[:3]
    assert worst[0][1] >= grad_bound, f"gradient SQNRs below {grad_bound:.1f} dB: {worst}"


def test_high_precision_recipe_step_equals_the_eager_step():
    """The control: with every GEMM in high precision the compiled step is the eager step (float32 to within
    reassociation, over 100 dB), so the bounds above measure quantization alone."""
    model, idx, cotangent = _model_and_data()
    ref_out, ref_grads = _step(model, idx, cotangent)
    be = fp4compile.Fp4Backend(policy=fp4compile.recipes.high_precision(), inner="aot_eager")
    out, grads = _step(torch.compile(model, backend=be), idx, cotangent)
    assert all(r.precision == "high" for r in be.rows())
    assert sqnr_db(ref_out, out) > 100
    assert all(sqnr_db(ref_grads[n], g) > 100 for n, g in grads.items())
