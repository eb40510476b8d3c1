"""The activations' and gradients' tensor amaxes as graph ops (`fp4compile.ops.linear._activation_amaxes`).

The amax after the RHT (docs/numerics.md section 3.3) depends on the order of the butterfly adds; these tests
check that the ATen form `tensor_amax_along` (read in the ``(tokens, features)`` layout) gives the reference's
bits, on data where a different order gives different bits, eagerly and compiled by Inductor, and that a
compiled training step no longer calls the ``fp4compile::amax`` op for activations and gradients.
"""

from __future__ import annotations

import re

import pytest
import torch

from fp4compile.numerics.hadamard import hadamard_matrix
from fp4compile.numerics.reference import tensor_amax_along, tensor_amaxes_reference
from tests.helpers import batch, compiled_step
from tests.models import GPT

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _order_sensitive(tokens: int, features: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """(tokens, features) values of mixed magnitudes (1 next to 2^-9..2^9 and a few 2^20), so the butterflies'
    sums round, and differently for a different order of the adds."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=g) * torch.exp2(torch.randint(-9, 10, (tokens, features), generator=g))
    x[torch.rand(tokens, features, generator=g) < 0.02] *= 2.0**20
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_amax_along_tokens_is_the_references_bits(dtype):
    x2 = _order_sensitive(256, 48, dtype)
    ref_rht, ref_plain = tensor_amaxes_reference(x2.t(), True)
    got_rht = tensor_amax_along(x2, True, dim=0)
    assert got_rht.dtype == torch.float32 and got_rht.shape == ()
    assert got_rht.view(torch.int32) == ref_rht.view(torch.int32)
    assert tensor_amax_along(x2, False).view(torch.int32) == ref_plain.view(torch.int32)
    # Along features (the row-wise operand with a transform of its own): the reference on x2 itself.
    assert tensor_amax_along(x2, True).view(torch.int32) == tensor_amaxes_reference(x2, True)[0].view(torch.int32)


def test_order_matters_on_the_test_data():
    """The data above tells orders apart: the RHT as a float32 matrix product (another summation order) gives
    other bits for some seed, so the bit comparisons above can fail."""
    m = hadamard_matrix(torch.float32)
    differs = 0
    for seed in range(8):
        x2 = _order_sensitive(256, 48, torch.float32, seed)
        runs = x2.t().reshape(48, 16, 16)  # (features, runs, 16)
        by_matmul = (runs @ m.t()).abs().amax()
        ref = tensor_amaxes_reference(x2.t(), True)[0]
        differs += int(by_matmul.view(torch.int32) != ref.view(torch.int32))
    assert differs > 0


def test_amax_along_tokens_special_values():
    x2 = torch.zeros(32, 16)
    assert tensor_amax_along(x2, True, dim=0) == 0
    x2[3, 5] = float("inf")
    assert tensor_amax_along(x2, True, dim=0) == float("inf")
    x2[7, 2] = float("nan")
    assert tensor_amax_along(x2, True, dim=0).isnan() and tensor_amax_along(x2, False).isnan()
    assert tensor_amax_along(torch.zeros(0, 16), True, dim=0) == 0


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amax_along_tokens_under_inductor_is_the_references_bits(dtype):
    """Inductor fuses the sign flips, butterflies and maximum into its own kernels (C++ on CPU, Triton on CUDA):
    still the reference's bits (no reassociation, products exact so FMA contraction changes nothing)."""
    x2 = _order_sensitive(512, 64, dtype).to(DEVICE)
    fn = torch.compile(lambda t: torch.stack([tensor_amax_along(t, True, dim=0), tensor_amax_along(t, False)]),
                       backend="inductor", fullgraph=True)
    got = fn(x2).cpu()
    assert torch.equal(got.view(torch.int32), tensor_amaxes_reference(x2.t().cpu(), True).view(torch.int32))


def _launched_kernels(code: str) -> list[str]:
    """Names of the Triton kernels an AOT graph launches (on CUDA the traced ``triton_op`` bodies)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    names = []
    for idx in re.findall(r"triton_kernel_wrapper_functional\(kernel_idx = (\d+)", code):
        kernel = kernel_side_table.get_kernel(int(idx))
        while not callable(getattr(kernel, "__code__", None)) and hasattr(kernel, "fn"):
            kernel = kernel.fn  # Autotuner -> JITFunction -> the Python function
        names.append(getattr(kernel, "__name__", "?"))
    return names


def test_training_graphs_have_no_amax_op_for_activations():
    """The AOT forward and backward graphs of a GPT step compute every activation and gradient amax as ATen
    reductions: no ``fp4compile::amax`` op (CPU) and no amax kernel for them (CUDA, where the ops are traced into
    their kernels); the weights' amax stays in their quantization, whose producer, the optimizer, is outside the
    graph: one reduction per weight in the forward graph, none in the backward (the input gradient reuses the
    forward's quantized weight)."""
    model = GPT(vocab=64, d=32, n_layer=3, n_head=2, block_size=32).to(DEVICE)  # block 1 is quantized
    _, _, be = compiled_step(model, tuple(t.to(DEVICE) for t in batch()), inner="aot_eager")
    codes = {label: code for report in be.reports for label, code in report.aot_code.items()}
    assert set(codes) >= {"forward", "backward"}, sorted(codes)
    joined = "\n".join(codes.values())
    assert "aten.amax" in joined
    assert "fp4compile.amax" not in joined
    if DEVICE == "cpu":
        assert "fp4compile.quantize" in joined
    else:
        fp4_sites = sum(1 for r in be.rows() if r.precision != "high" and r.role == "forward")
        assert fp4_sites == 4
        assert _launched_kernels(codes["forward"]).count("_amax_kernel") == fp4_sites  # the weights
        assert "_amax_kernel" not in _launched_kernels(codes["backward"])
