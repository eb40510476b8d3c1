"""The "fp4" backend end to end on CPU: one compiled training step against the eager reference.

Tolerances: with the ``eager`` and ``aot_eager`` inner compilers the compiled step runs the same ATen ops in
the same order as eager PyTorch and draws stochastic-rounding seeds from the same generator in the same order,
so loss and every gradient must be equal bit for bit. Inductor fuses and reorders float32 arithmetic (a
last-bit difference can move an element across an E2M1 rounding threshold) and replaces ``aten.randint`` by
its own Philox stream (so stochastic-rounding draws differ): its test uses tolerances stated there.
"""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fp4compile
from fp4compile.policy.precision import HIGH, GemmPrecision, LinearPrecision, OperandPrecision, Role
from fp4compile.recipes import nv_recipe_precisions
from helpers import batch, compiled_step, reference_step
from models import GPT, Llama
from fp4compile.testing import swap_in_reference

NV = LinearPrecision(*nv_recipe_precisions())
GPT_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LLAMA_LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def _expected_gpt(blocks, cfg=NV):
    return {f"transformer.h.{i}.{n}": cfg for i in blocks for n in GPT_LINEARS}


def _assert_same_step(compiled, reference):
    loss, grads, _ = compiled
    ref_loss, ref_grads = reference
    assert torch.equal(loss, ref_loss), (loss.item(), ref_loss.item())
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), f"gradient of {name} differs: max {(g - ref_grads[name]).abs().max()}"


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
@pytest.mark.parametrize("variant", ["sdpa", "explicit_attention", "conv1d"])
def test_gpt_step_equals_eager_reference(inner, variant):
    torch.manual_seed(0)
    model = GPT(n_layer=4, explicit=variant == "explicit_attention", conv1d=variant == "conv1d")
    inputs = batch()
    compiled = compiled_step(model, inputs, inner=inner)
    # NV recipe defaults: first and last block and the (tied) head stay high precision.
    reference = reference_step(model, inputs, _expected_gpt((1, 2)))
    _assert_same_step(compiled, reference)


def test_llama_step_equals_eager_reference():
    torch.manual_seed(0)
    model = Llama(n_layer=3)
    inputs = batch()
    compiled = compiled_step(model, inputs, inner="aot_eager")
    reference = reference_step(model, inputs, {f"layers.1.{n}": NV for n in LLAMA_LINEARS})
    _assert_same_step(compiled, reference)


@pytest.mark.parametrize("in_graph", ["1", "0"])
def test_gemm_written_as_graph_ops_equals_reference(monkeypatch, in_graph):
    """The dense GEMM path written as graph ops (matmul, alpha, bias, cast; Inductor fuses the epilogue on
    CUDA) computes what `gemm_reference` computes, in the same order, so the step stays bit-exact."""
    monkeypatch.setenv("FP4COMPILE_GEMM_IN_GRAPH", in_graph)
    torch.manual_seed(0)
    model = GPT(n_layer=3)
    inputs = batch()
    compiled = compiled_step(model, inputs, inner="aot_eager")
    _assert_same_step(compiled, reference_step(model, inputs, _expected_gpt((1,))))
    code = compiled[2].reports[0].aot_code
    # Forward: 4 GEMMs of block 1, both operands exact fp16. Backward: 4 input-gradient GEMMs in the graph;
    # the weight-gradient GEMMs consume the packed x^T, so they stay on the op.
    fwd_ops = code["forward"].count("fp4compile.gemm.default")
    bwd_ops = code["backward"].count("fp4compile.gemm.default")
    assert (fwd_ops, bwd_ops) == ((0, 4) if in_graph == "1" else (4, 8)), (fwd_ops, bwd_ops)


def test_fp4_all_the_way_step_equals_reference():
    torch.manual_seed(0)
    model = GPT(n_layer=3)
    inputs = batch()
    policy = fp4compile.recipes.fp4_all_the_way()
    compiled = compiled_step(model, inputs, policy=policy, inner="aot_eager")
    cfg = LinearPrecision(policy.forward, policy.input_grad, policy.weight_grad)
    _assert_same_step(compiled, reference_step(model, inputs, _expected_gpt((0, 1, 2), cfg)))


def test_table_names_exactly_the_expected_gemms():
    torch.manual_seed(0)
    _, _, be = compiled_step(GPT(n_layer=4, explicit=True), batch())
    rows = be.rows()
    modules = {r.module for r in rows}
    # Attention matmuls (QK^T, PV), norms, embeddings and the loss are not weight GEMMs: no rows.
    assert modules == {f"transformer.h.{i}.{n}" for i in range(4) for n in GPT_LINEARS} | {"lm_head"}
    assert len(rows) == 3 * len(modules)
    quantized = {(r.module, r.role) for r in rows if r.precision == "nvfp4"}
    assert quantized == {(f"transformer.h.{i}.{n}", role.value) for i in (1, 2) for n in GPT_LINEARS for role in Role}
    head = [r for r in rows if r.module == "lm_head"]
    assert all(r.precision == "high" and "output head" in r.reason for r in head)
    layers = {r.module: r.layer for r in rows}
    assert layers["transformer.h.3.mlp.c_fc"] == 3 and layers["lm_head"] is None
    fwd = next(r for r in rows if r.module == "transformer.h.1.mlp.c_fc" and r.role == "forward")
    assert fwd.shape == ("2*32", "128", "32") and fwd.lhs == "nvfp4 1x16 RN" and fwd.rhs == "nvfp4 16x16 RN"
    wgrad = next(r for r in rows if r.module == "transformer.h.1.mlp.c_fc" and r.role == "weight_grad")
    assert wgrad.lhs == "nvfp4 1x16 SR +RHT" and wgrad.rhs == "nvfp4 1x16 RN +RHT"


def test_everything_but_weight_gemms_is_untouched():
    torch.manual_seed(0)
    _, _, be = compiled_step(GPT(n_layer=4, explicit=True), batch())
    report = be.reports[0]
    before, after = report.pass_code[0][1], report.pass_code[-1][1]
    assert after.count("fp4compile_ops_linear_fp4_linear(") == 8
    for op in ("layer_norm", "softmax", "gelu", "embedding", "cross_entropy", "masked_fill"):
        assert before.count(op) == after.count(op) > 0, op
    # The attention matmuls (QK^T and PV, 4 layers x 2) stay plain `@` products; weight GEMMs never were `@`.
    assert before.count(" @ ") == after.count(" @ ") == 8


def test_glob_override_moves_exactly_the_targeted_sites():
    torch.manual_seed(0)
    model = GPT(n_layer=4)
    _, _, base = compiled_step(model, batch())
    model.zero_grad()
    _, _, over = compiled_step(model, batch(), policy=fp4compile.recipes.nvfp4(high_precision=["*.attn.*"]))
    a = {(r.module, r.role): r.precision for r in base.rows()}
    b = {(r.module, r.role): r.precision for r in over.rows()}
    changed = {k for k in a if a[k] != b[k]}
    assert changed == {(f"transformer.h.{i}.attn.{n}", role.value) for i in (1, 2) for n in ("c_attn", "c_proj") for role in Role}
    assert all(b[k] == "high" for k in changed)


@pytest.mark.parametrize(
    "policy, expected",
    [
        (fp4compile.recipes.nvfp4(high_precision_layers=[2]), {1}),
        (fp4compile.recipes.nvfp4(high_precision_layers=[-2]), {1}),
        (fp4compile.recipes.nvfp4(high_precision_first_blocks=0, high_precision_last_blocks=2), {0, 1}),
    ],
)
def test_layer_overrides(policy, expected):
    torch.manual_seed(0)
    _, _, be = compiled_step(GPT(n_layer=4), batch(), policy=policy)
    assert {r.layer for r in be.rows() if r.precision == "nvfp4"} == expected


def test_role_override_and_custom_rule():
    torch.manual_seed(0)
    rule = fp4compile.Rule(HIGH, modules=("*.mlp.c_proj",), roles=("input_grad",))
    policy = fp4compile.recipes.nvfp4(high_precision_roles=["weight_grad"], rules=[rule])
    _, _, be = compiled_step(GPT(n_layer=4), batch(), policy=policy)
    rows = [r for r in be.rows() if r.layer in (1, 2)]
    assert all(r.precision == "high" for r in rows if r.role == "weight_grad")
    assert all(r.precision == "high" for r in rows if r.role == "input_grad" and r.module.endswith("mlp.c_proj"))
    assert all(r.precision == "nvfp4" for r in rows if r.role == "forward")


class _OnlyMlp:
    """A user policy class: MLP forward GEMMs in NVFP4, everything else high precision."""

    def decide(self, site, role):
        if ".mlp." in site.module and role is Role.FORWARD:
            return fp4compile.Decision(NV.forward, "custom: MLP forward")
        return fp4compile.Decision(HIGH, "custom: everything else")


def test_user_policy_class():
    torch.manual_seed(0)
    model = GPT(n_layer=2)
    inputs = batch()
    compiled = compiled_step(model, inputs, policy=_OnlyMlp(), inner="aot_eager")
    rows = compiled[2].rows()
    assert {(r.module, r.role) for r in rows if r.precision == "nvfp4"} == {
        (f"transformer.h.{i}.mlp.{n}", "forward") for i in range(2) for n in ("c_fc", "c_proj")
    }
    cfg = LinearPrecision(NV.forward, HIGH, HIGH)
    ref = {f"transformer.h.{i}.mlp.{n}": cfg for i in range(2) for n in ("c_fc", "c_proj")}
    _assert_same_step(compiled, reference_step(model, inputs, ref))


def test_policy_returning_garbage_raises_type_error():
    class Bad:
        def decide(self, site, role):
            return "nvfp4"

    with pytest.raises(Exception, match="must return a fp4compile.Decision"):
        compiled_step(GPT(n_layer=2), batch(), policy=Bad())


class _Odd(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc_in = torch.nn.Linear(100, 32)
        self.fc_out = torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.fc_out(torch.relu(self.fc_in(x))).square().mean()


def test_in_features_100_falls_back_with_a_reason(caplog):
    torch.manual_seed(0)
    policy = fp4compile.recipes.nvfp4(high_precision_first_blocks=0, high_precision_last_blocks=0, quantize_output_head=True)
    with caplog.at_level(logging.WARNING, logger="fp4compile"):
        _, grads, be = compiled_step(_Odd(), (torch.randn(4, 8, 100),), policy=policy)
    rows = {(r.module, r.role): r for r in be.rows()}
    assert rows[("fc_in", "forward")].precision == "high"
    assert "reduction size 100 is not divisible by the block size 16" in rows[("fc_in", "forward")].reason
    assert "weight dimension 100" in rows[("fc_in", "input_grad")].reason or "100" in rows[("fc_in", "input_grad")].reason
    assert rows[("fc_in", "weight_grad")].precision == "nvfp4"  # tokens are the reduction axis there
    assert all(rows[("fc_out", r.value)].precision == "nvfp4" for r in Role)
    assert "fall back to high precision" in caplog.text and "fc_in" in caplog.text
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_token_count_not_divisible_by_16_is_padded_exactly():
    torch.manual_seed(0)
    model = GPT(n_layer=3)
    inputs = batch(b=3, t=5)  # 15 tokens
    compiled = compiled_step(model, inputs, inner="aot_eager")
    _assert_same_step(compiled, reference_step(model, inputs, _expected_gpt((1,))))


def test_no_graph_breaks_and_ten_steps_compile_once():
    torch.manual_seed(0)
    model = GPT(n_layer=3)
    be = fp4compile.Fp4Backend(inner="eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cm = torch.compile(model, backend=be)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(10):
        loss = cm(*batch(seed=step))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert len(be.reports) == 1
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    explanation = torch._dynamo.explain(model)(*batch())
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_schedule_switch_compiles_once_per_phase(inner):
    torch.manual_seed(0)
    counter = fp4compile.StepCounter()
    policy = fp4compile.recipes.nvfp4(schedule=fp4compile.schedules.late_switch(3))
    be = fp4compile.Fp4Backend(policy=policy, inner=inner, step_counter=counter)
    cm = torch.compile(GPT(n_layer=3), backend=be)
    for step in range(6):
        cm(*batch(seed=step)).backward()
        counter.advance()
    assert [r.phase for r in be.reports] == ["fp4", "late_switch"]
    late = [r for r in be.reports[1].rows if r.layer == 1]
    assert all(r.precision == "high" and "late_switch" in r.reason for r in late if r.role == "forward")
    assert all(r.precision == "nvfp4" for r in late if r.role != "forward")


def test_no_grad_forward_rounds_to_nearest_and_is_deterministic():
    torch.manual_seed(0)
    model = GPT(n_layer=3)
    policy = fp4compile.recipes.nvfp4(rules=[fp4compile.Rule(GemmPrecision(
        OperandPrecision("nvfp4", (1, 16), "stochastic"), OperandPrecision("nvfp4", (16, 16))), modules=("transformer.h.1.*",),
        roles=("forward",))])
    cm = torch.compile(model.eval(), backend=fp4compile.Fp4Backend(policy=policy, inner="aot_eager"))
    with torch.no_grad():
        a = cm(*batch())
        b = cm(*batch())
    assert torch.equal(a, b)
    # The stochastic forward rule is honoured as round-to-nearest without autograd: equal to the RN reference.
    rn = LinearPrecision(NV.forward, HIGH, HIGH)
    with torch.no_grad():
        ref = swap_in_reference(copy.deepcopy(model), _expected_gpt((1,), rn))(*batch())
    assert torch.equal(a, ref)


def test_dynamic_batch_and_sequence_do_not_recompile_per_size():
    torch.manual_seed(0)
    be = fp4compile.Fp4Backend(inner="eager")
    torch._dynamo.reset()
    cm = torch.compile(GPT(n_layer=3), backend=be)
    for b, t in [(2, 16), (3, 16), (4, 16), (5, 16), (2, 32), (2, 24)]:
        loss = cm(*batch(b=b, t=t))
        loss.backward()
        assert torch.isfinite(loss)
    # One static compile, then automatic dynamic shapes; never one per size.
    assert len(be.reports) <= 3


def test_dump_env_writes_precision_table(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("FP4COMPILE_DUMP", str(tmp_path))
    torch.manual_seed(0)
    compiled_step(GPT(n_layer=3), batch())
    rows = json.loads((tmp_path / "precision_table.json").read_text())
    assert len(rows) == 3 * 13
    assert {"module", "role", "precision", "reason", "shape"} <= set(rows[0])
    assert {r["role"] for r in rows} == {"forward", "input_grad", "weight_grad"}
    assert {r["precision"] for r in rows} == {"nvfp4", "high"}


def test_string_backend_with_options_in_a_fresh_process(tmp_path):
    script = textwrap.dedent(
        """
        import torch, sys
        sys.path.insert(0, %r)
        from models import GPT
        torch.manual_seed(0)
        m = GPT(n_layer=3)
        idx = torch.randint(0, 64, (2, 16))
        loss = torch.compile(m, backend="fp4", options={"inner": "eager"})(idx, idx)
        loss.backward()
        assert "fp4compile" in sys.modules  # loaded through the entry point, not imported by us
        import fp4compile
        policy = fp4compile.recipes.high_precision()
        loss2 = torch.compile(GPT(n_layer=3), backend="fp4", options={"policy": policy, "inner": "eager"})(idx, idx)
        print("ok", float(loss), float(loss2))
        """
        % os.path.dirname(__file__)
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")


def test_registry_gives_one_backend_per_configuration_and_model():
    model, other = GPT(n_layer=2), GPT(n_layer=2)
    assert fp4compile.backend(model=model) is fp4compile.backend(model=model)
    assert fp4compile.backend(model=model) is not fp4compile.backend(model=other)
    assert fp4compile.backend(model=model) is not fp4compile.backend()


def test_unknown_backend_option_is_a_clear_error():
    from fp4compile.capture.compiler import fp4_backend

    with pytest.raises(ValueError, match=r"unknown option\(s\) \['polcy'\]"):
        fp4_backend(None, [], options={"polcy": 1})


@pytest.mark.slow
def test_inductor_step_matches_reference_within_tolerance():
    """Inductor: an all-round-to-nearest recipe (no random draws) matches the reference closely; the default
    NV recipe (stochastic rounding with Inductor's own random stream) matches in loss and statistically."""
    torch.manual_seed(0)
    model = GPT(n_layer=3)
    inputs = batch()
    fwd, _, _ = nv_recipe_precisions()
    rn = OperandPrecision("nvfp4", (1, 16))
    rn_cfg = LinearPrecision(fwd, GemmPrecision(rn, fwd.rhs), GemmPrecision(
        OperandPrecision("nvfp4", (1, 16), "nearest", True), OperandPrecision("nvfp4", (1, 16), "nearest", True)))
    policy = fp4compile.Recipe("rn", rn_cfg.forward, rn_cfg.input_grad, rn_cfg.weight_grad, 1, 1)
    loss, grads, be = compiled_step(model, inputs, policy=policy, inner="inductor")
    ref_loss, ref_grads = reference_step(model, inputs, _expected_gpt((1,), rn_cfg))
    assert "fp4compile.quantize" in be.reports[0].aot_code["forward"]
    # Inductor's fused float32 kernels differ from eager in the last bits; a few elements then cross an E2M1
    # threshold. Loss within 1e-5 relative; each gradient within 2% of its norm.
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    for name, g in grads.items():
        r = ref_grads[name]
        assert (g - r).norm() <= 0.02 * r.norm() + 1e-8, name


def test_reduce_overhead_mode_asks_for_cuda_graphs(monkeypatch):
    from fp4compile.capture import compiler

    seen = {}
    monkeypatch.setattr(compiler.Fp4Backend, "__call__", lambda self, gm, ex, **kw: seen.setdefault("cg", self.cudagraphs))
    compiler.fp4_backend(None, [], options={"inner": "eager"}, mode="reduce-overhead")
    assert seen["cg"] is True
    assert compiler.backend(inner="eager", cudagraphs=True) != compiler.backend(inner="eager", cudagraphs=False)


def test_process_observer_sees_quantizations_and_scoped_one_wins():
    from fp4compile.ops.observe import observe_quantization, set_process_observer

    process, scoped = [], []
    x = torch.randn(32, 64)
    previous = set_process_observer(lambda label, t, qt: process.append(label))
    try:
        torch.ops.fp4compile.quantize(x, "nvfp4|1x16|nearest|-", None, "m:forward:lhs")
        with observe_quantization(lambda label, t, qt: scoped.append(label)):
            torch.ops.fp4compile.quantize(x, "nvfp4|1x16|nearest|-", None, "m:input_grad:lhs")
    finally:
        set_process_observer(previous)
    torch.ops.fp4compile.quantize(x, "nvfp4|1x16|nearest|-", None, "m:weight_grad:lhs")
    assert process == ["m:forward:lhs"] and scoped == ["m:input_grad:lhs"]


class _Chained(torch.nn.Module):
    """Three linears, each FP4 site fed directly by the one before it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 16)

    def forward(self, x):
        x = self.a(x)
        x = x + self.b(x)
        return self.c(x).square().mean()


def test_fp4_site_fed_by_another_fp4_site_equals_eager_reference():
    """The second site's input is the first site's output, which the rewrite has already replaced."""
    torch.manual_seed(0)
    model = _Chained()
    inputs = (torch.randn(4, 8, 32),)
    policy = fp4compile.recipes.nvfp4(high_precision_first_blocks=0, high_precision_last_blocks=0,
                                      quantize_output_head=True)
    compiled = compiled_step(model, inputs, policy=policy)
    assert {r.module for r in compiled[2].rows() if r.precision == "nvfp4"} == {"a", "b", "c"}
    _assert_same_step(compiled, reference_step(model, inputs, {n: NV for n in ("a", "b", "c")}))
