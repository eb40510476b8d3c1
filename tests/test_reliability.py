"""Reliability on CPU: non-finite values, shapes and dtypes, micro-batches, checkpoint regions, determinism
and resume, and a property-based fuzz of the quantizer and of small models through the backend."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.checkpoint import checkpoint

import fp4compile
from fp4compile.policy.precision import LinearPrecision
from fp4compile.recipes import nv_recipe_precisions
from helpers import batch
from models import GPT
from fp4compile.testing import swap_in_reference

NV = LinearPrecision(*nv_recipe_precisions())
ALL_LAYERS = fp4compile.recipes.nvfp4(high_precision_first_blocks=0, high_precision_last_blocks=0)


def _compile(model, policy=ALL_LAYERS, inner="eager", **kw):
    be = fp4compile.Fp4Backend(policy=policy, inner=inner, verify=True, **kw)
    return torch.compile(model, backend=be), be


# --- non-finite values ----------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["weight", "activation"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_reach_loss_and_gradients(where, bad):
    torch.manual_seed(0)
    model = GPT(n_layer=2)
    cm, be = _compile(model)
    if where == "weight":
        with torch.no_grad():
            model.transformer.h[1].mlp.c_fc.weight[3, 5] = bad
        idx, tgt = batch()
    else:
        with torch.no_grad():
            model.transformer.wpe.weight[7, 2] = bad  # poisons the activations of position 7
        idx, tgt = batch()
    loss = cm(idx, tgt)
    loss.backward()
    assert not torch.isfinite(loss)
    grad = model.transformer.h[1].mlp.c_fc.weight.grad
    assert not torch.isfinite(grad).all()


def test_non_finite_gradient_propagates_and_grad_scaler_skips_the_step():
    torch.manual_seed(0)
    model = GPT(n_layer=2)
    cm, _ = _compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    before = copy.deepcopy(model.state_dict())
    loss = cm(*batch())
    scaler.scale(loss * float("inf")).backward()  # an overflowing loss scale: gradients become non-finite
    assert not all(torch.isfinite(p.grad).all() for p in model.parameters())
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**16  # the scaler saw the overflow...
    for k, v in model.state_dict().items():  # ...and skipped the step
        assert torch.equal(v, before[k]), k


# --- shapes and dtypes -------------------------------------------------------------------------------------

def test_a_batch_of_one_token():
    torch.manual_seed(0)
    model = GPT(n_layer=2)
    cm, be = _compile(model, inner="aot_eager")
    loss = cm(*batch(b=1, t=1))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    ref = swap_in_reference(copy.deepcopy(model), {f"transformer.h.{i}.{n}": NV for i in range(2)
                                                   for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")})
    model.zero_grad()
    torch.manual_seed(1)
    a = cm(*batch(b=1, t=1))
    torch.manual_seed(1)
    b = ref(*batch(b=1, t=1))
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_model_dtypes(dtype):
    torch.manual_seed(0)
    model = GPT(n_layer=2).to(dtype)
    cm, be = _compile(model)
    loss = cm(*batch())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad.dtype == dtype and torch.isfinite(p.grad).all() for p in model.parameters())
    assert {r.precision for r in be.rows()} == {"nvfp4", "high"}


def test_gradient_accumulation_over_micro_batches_equals_the_sum():
    torch.manual_seed(0)
    model = GPT(n_layer=2)
    cm, _ = _compile(model, inner="aot_eager")
    torch.manual_seed(5)
    for seed in range(3):
        cm(*batch(seed=seed)).backward()
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters()}
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    torch.manual_seed(5)
    for seed in range(3):
        model.zero_grad()
        cm(*batch(seed=seed)).backward()
        for n, p in model.named_parameters():
            total[n] += p.grad
    for n in total:  # same draws in the same order: the sum matches up to float32 summation order
        torch.testing.assert_close(accumulated[n], total[n], rtol=1e-6, atol=1e-7)


class _Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.h = nn.ModuleList([nn.Linear(32, 32) for _ in range(3)])

    def forward(self, x):
        for i, layer in enumerate(self.h):
            if i == 1:
                x = checkpoint(lambda y, l=layer: torch.relu(l(y)), x, use_reentrant=False)
            else:
                x = torch.relu(layer(x))
        return x.square().mean()


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_checkpoint_regions_are_rewritten_and_match_the_reference(inner):
    torch.manual_seed(0)
    model = _Checkpointed()
    x = torch.randn(4, 32)
    cm, be = _compile(model, inner=inner)
    torch.manual_seed(1)
    loss = cm(x)
    loss.backward()
    assert {(r.module, r.precision) for r in be.rows()} == {(f"h.{i}", "nvfp4") for i in range(3)}
    ref = swap_in_reference(copy.deepcopy(model), {f"h.{i}": NV for i in range(3)})
    ref.zero_grad()
    torch.manual_seed(1)
    ref_loss = ref(x)
    ref_loss.backward()
    assert torch.equal(loss, ref_loss)
    # Recomputing the region in backward redraws no random bits in forward (it is round-to-nearest), so
    # gradients agree exactly.
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p.grad, q.grad), n


# --- determinism and resume ------------------------------------------------------------------------------

def _train(model, steps, start=0, opt_state=None, rng_state=None, counter_step=0):
    cm, be = _compile(model, inner="aot_eager")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    if rng_state is not None:
        torch.set_rng_state(rng_state)
    losses = []
    for step in range(start, start + steps):
        loss = cm(*batch(seed=step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, opt


def test_two_runs_from_the_same_seed_are_bitwise_identical():
    runs = []
    for _ in range(2):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = GPT(n_layer=2)
        losses, _ = _train(model, 4)
        runs.append((losses, copy.deepcopy(model.state_dict())))
    assert runs[0][0] == runs[1][0]
    for k in runs[0][1]:
        assert torch.equal(runs[0][1][k], runs[1][1][k]), k


def test_resume_at_step_k_continues_bitwise_like_the_uninterrupted_run():
    """What to save: model and optimizer state, torch's RNG state (it keys stochastic rounding; on GPU also
    torch.cuda.get_rng_state_all()), and the StepCounter if a schedule is used."""
    torch.manual_seed(0)
    model = GPT(n_layer=2)
    initial = copy.deepcopy(model.state_dict())
    full, _ = _train(model, 6)

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(n_layer=2)
    model.load_state_dict(initial)
    first, opt = _train(model, 3)
    checkpoint_state = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), torch.get_rng_state())

    torch._dynamo.reset()
    torch.manual_seed(1234)  # a different process state: everything must come from the checkpoint
    resumed = GPT(n_layer=2)
    resumed.load_state_dict(checkpoint_state[0])
    second, _ = _train(resumed, 3, start=3, opt_state=checkpoint_state[1], rng_state=checkpoint_state[2])
    assert first + second == full


# --- property-based fuzz -----------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 6),
    blocks=st.integers(1, 4),
    scale_exp=st.integers(-40, 40),
    fmt=st.sampled_from(["nvfp4", "mxfp4"]),
    rounding=st.sampled_from(["nearest", "stochastic"]),
    seed=st.integers(0, 2**63 - 1),
)
def test_fuzz_quantizer_invariants(rows, blocks, scale_exp, fmt, rounding, seed):
    b = 16 if fmt == "nvfp4" else 32
    g = torch.Generator().manual_seed(seed % 2**31)
    x = torch.randn(rows, blocks * b, generator=g) * 2.0**scale_exp
    x[0, 0] = 0.0
    qt = fp4compile.quantize(x, fmt, rounding=rounding, seed=seed)
    deq = qt.dequantize()
    assert deq.shape == x.shape and torch.isfinite(deq).all()
    # Signs never flip; zero stays zero; nothing exceeds the block's representable maximum.
    assert torch.all((deq == 0) | (torch.sign(deq) == torch.sign(x)))
    assert deq[0, 0] == 0
    # s = d_b * D is the block's step unit; products below are exact up to one float32 rounding (slack 2^-20).
    s = (qt.block_scales() * qt.per_tensor_scale).reshape(x.shape)
    slack = 1 + 2.0**-20
    assert torch.all(deq.abs() <= 6 * s * slack)
    # Nearest rounding: within half the widest grid gap (2, so 1 unit) of x, unless the element saturated
    # (|x| above 6 units: error |x| - 6 units) or its block scale underflowed to zero (error |x|).
    if rounding == "nearest":
        bound = torch.where(s == 0, x.abs(), torch.maximum(s, x.abs() - 6 * s)) * slack
        assert torch.all((deq - x).abs() <= bound)


class _Random(nn.Module):
    def __init__(self, widths, bias):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(a, b, bias=bias) for a, b in zip(widths[:-1], widths[1:])])

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x.square().mean()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    widths=st.lists(st.sampled_from([8, 16, 24, 32, 48, 100]), min_size=2, max_size=4),
    tokens=st.integers(1, 40),
    bias=st.booleans(),
)
def test_fuzz_small_models_through_the_backend(widths, tokens, bias):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Random(widths, bias)
    x = torch.randn(tokens, widths[0])
    policy = fp4compile.recipes.nvfp4(high_precision_first_blocks=0, high_precision_last_blocks=0, quantize_output_head=True)
    cm, be = _compile(model, policy=policy)
    loss = cm(x)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    for row in be.rows():
        if row.role == "forward":
            divisible = int(row.shape[2]) % 16 == 0 and int(row.shape[1]) % 16 == 0
            assert (row.precision == "nvfp4") == divisible, row
    # The high-precision control through the same backend equals eager exactly.
    torch._dynamo.reset()
    ref = copy.deepcopy(model)
    ref.zero_grad()
    cm2, _ = _compile(ref, policy=fp4compile.recipes.high_precision())
    assert torch.equal(cm2(x), _Random.forward(ref, x))
