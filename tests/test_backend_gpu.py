"""The backend on CUDA (skipped without a GPU): Triton kernels inside a compiled training step.

Tolerances: the Triton quantizer is bit-exact with the reference, but the GEMMs sum in a different order
(tensor-core tiles vs CPU float32), so activations differ in the last bits and a few elements cross E2M1
thresholds; stochastic rounding draws from Inductor's random stream. Loss within 2% relative, gradient
norms within 10% (measured spread of independent stochastic-rounding draws is a few percent).
"""

from __future__ import annotations

import copy

import pytest
import torch

import fp4compile
from fp4compile.policy.precision import LinearPrecision
from fp4compile.recipes import nv_recipe_precisions
from fp4compile.testing import swap_in_reference
from helpers import batch
from models import GPT

pytestmark = pytest.mark.gpu


def test_compiled_step_on_cuda_uses_triton_and_matches_reference():
    torch.manual_seed(0)
    model = GPT(vocab=256, d=256, n_layer=4, n_head=4, block_size=128).cuda().to(torch.bfloat16)
    idx, tgt = (t.cuda() for t in batch(vocab=256, b=4, t=128))
    be = fp4compile.Fp4Backend(inner="inductor")
    loss = torch.compile(model, backend=be)(idx, tgt)
    loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters()}
    nv = LinearPrecision(*nv_recipe_precisions())
    names = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ref = swap_in_reference(copy.deepcopy(model), {f"transformer.h.{i}.{n}": nv for i in (1, 2) for n in names})
    ref.zero_grad()
    ref_loss = ref(idx, tgt)
    ref_loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - ref_loss.item()) <= 0.02 * abs(ref_loss.item())
    for name, p in ref.named_parameters():
        assert (grads[name] - p.grad.float()).norm() <= 0.1 * p.grad.float().norm() + 1e-6, name
    assert "fp4compile.gemm" in be.reports[0].aot_code["forward"]


def test_quantize_auto_on_cuda_is_triton_and_bit_exact():
    x = torch.randn(1000, 768, device="cuda", dtype=torch.bfloat16)
    for kwargs in (dict(), dict(block=(16, 16)), dict(rounding="stochastic", seed=3), dict(hadamard=True)):
        if kwargs.get("block") == (16, 16):
            x = x[:992]
        a = fp4compile.quantize(x, impl="auto", **kwargs)
        b = fp4compile.quantize(x, impl="reference", **kwargs)
        assert torch.equal(a.qdata, b.qdata) and torch.equal(a.scale.view(torch.uint8), b.scale.view(torch.uint8))
        assert torch.equal(a.per_tensor_scale, b.per_tensor_scale)
