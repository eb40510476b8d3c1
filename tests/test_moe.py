"""Mixtures of experts in FP4: GEMMs on stacked expert weights run one NVFP4 GEMM per expert, bit for bit the
reference quantizer's per expert; transformers' Mixtral and Qwen2-MoE under their ``experts_implementation``s,
and a hand-written mixture with an experts ``ModuleList``, get the NV recipe's structure (first and last block
and the head high, routers high with their reason, experts NVFP4 in the middle blocks).

Inner compiler ``eager`` for the structural tests: the passes and the table are what is under test.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

import fp4compile
from fp4compile.inspect.table import rows_to_markdown
from fp4compile.ops.experts import expert_ids_from_offsets, fp4_expert_grouped_mm, fp4_expert_linear
from fp4compile.policy.precision import LinearPrecision, Role
from fp4compile.policy.site import GemmSite
from fp4compile.testing.fake_quant import ReferenceFakeQuantLinear

VOCAB = 128


def _all_fp4(policy=None) -> LinearPrecision:
    """The NV recipe's three role precisions for a middle-block site."""
    policy = policy or fp4compile.recipes.nvfp4()
    site = GemmSite("n", "m", "m.weight", "linear", 64, 32, ("40", "64"), "torch.float32", layer_index=1,
                    first_layer=0, last_layer=2)
    return LinearPrecision(*(policy.decide(site, role).precision for role in Role))


def _reference_per_expert(x, w, ids, dy, cfg):
    """Each expert's rows through the eager reference (`fp4compile.testing`), forward for experts 0..E-1, then
    backward in the same order: the order the op draws its stochastic-rounding keys in."""
    order = torch.argsort(ids, stable=True)
    y, dx, dw = torch.zeros(x.shape[0], w.shape[1]), torch.zeros_like(x), torch.zeros_like(w)
    runs = []
    for e in range(w.shape[0]):
        rows = order[ids[order] == e]
        if not len(rows):
            continue
        x_e, w_e = x.detach()[rows].clone().requires_grad_(), w.detach()[e].clone().requires_grad_()
        y_e = ReferenceFakeQuantLinear.apply(x_e, w_e, None, cfg)
        y[rows] = y_e.detach()
        runs.append((e, rows, x_e, w_e, y_e))
    for e, rows, x_e, w_e, y_e in runs:
        y_e.backward(dy[rows])
        dx[rows], dw[e] = x_e.grad, w_e.grad
    return y, dx, dw


@pytest.mark.parametrize("policy", ["nvfp4", "fp4_all_the_way"])
def test_expert_linear_is_the_reference_quantizer_per_expert_bit_for_bit(policy):
    cfg = _all_fp4(fp4compile.recipes.from_name(policy))
    g = torch.Generator().manual_seed(0)
    experts, rows, k, n = 4, 45, 64, 32
    x = torch.randn(rows, k, generator=g, requires_grad=True)
    w = torch.randn(experts, n, k, generator=g, requires_grad=True)
    ids = torch.randint(0, experts, (rows,), generator=g)
    ids[ids == 2] = 1  # an expert without rows
    dy = torch.randn(rows, n, generator=g)
    torch.manual_seed(5)
    y = fp4_expert_linear(x, w, ids, cfg.encode(), torch.float32, "experts")
    y.backward(dy)
    torch.manual_seed(5)
    y_ref, dx_ref, dw_ref = _reference_per_expert(x, w, ids, dy, cfg)
    if policy == "nvfp4":  # FATW rounds x^T stochastically: the op draws that key in the backward, the reference
        # in the forward, so only the forward is compared key for key
        assert torch.equal(x.grad, dx_ref) and torch.equal(w.grad, dw_ref)
    assert torch.equal(y, y_ref)
    assert torch.equal(w.grad[2], torch.zeros_like(w.grad[2]))


def test_grouped_mm_offsets_route_sorted_rows_and_leave_the_tail_zero():
    offsets = torch.tensor([3, 3, 7, 9], dtype=torch.int32)
    assert expert_ids_from_offsets(offsets, 11).tolist() == [0, 0, 0, 2, 2, 2, 2, 3, 3, 4, 4]
    cfg = _all_fp4()
    x, w = torch.randn(11, 32), torch.randn(4, 16, 32)
    y = fp4_expert_grouped_mm(x, w.transpose(-2, -1), offsets, cfg.encode(), torch.float32)
    ids = expert_ids_from_offsets(offsets, 11)
    assert torch.equal(y, fp4_expert_linear(x, w, ids, cfg.encode(), torch.float32))
    assert torch.equal(y[9:], torch.zeros(2, 16)) and y[:9].abs().sum() > 0


def test_expert_linear_rejects_shapes_naming_the_site():
    with pytest.raises(ValueError, match="model.layers.1.mlp.experts.*\\(8, 32\\)"):
        fp4_expert_linear(torch.randn(8, 32), torch.randn(16, 32), torch.zeros(8, dtype=torch.long),
                          _all_fp4().encode(), torch.float32, "model.layers.1.mlp.experts")


# --- transformers' mixtures of experts and a hand-written one: sites, placement, head ------------------------

def _transformers():
    return pytest.importorskip("transformers")


def _ids(b=2, t=16, seed=0):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def _mixtral(experts_implementation, layers=3):
    config = _transformers().MixtralConfig(num_hidden_layers=layers, hidden_size=64, intermediate_size=128,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                           num_local_experts=4, num_experts_per_tok=2, bos_token_id=0,
                                           eos_token_id=0)
    model = _transformers().MixtralForCausalLM(config)
    model.set_experts_implementation(experts_implementation)
    return model


def _qwen2_moe():
    config = _transformers().Qwen2MoeConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=128,
                                            moe_intermediate_size=64, shared_expert_intermediate_size=128,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                            num_experts=4, num_experts_per_tok=2, bos_token_id=0, eos_token_id=0)
    return _transformers().Qwen2MoeForCausalLM(config)


def _train(model, steps=1, with_model=False, policy=None, inner="eager", **inputs):
    be = fp4compile.Fp4Backend(policy=policy, inner=inner, verify=True, model=model if with_model else None)
    compiled = torch.compile(model, backend=be)
    for _ in range(steps):
        out = compiled(**inputs)
        loss = out.loss if hasattr(out, "loss") else out.float().square().mean()
        loss.backward()
    return be


def _forward_rows(be):
    """Forward rows by weight path (a stacked-weight site's module holds two weights)."""
    return {r.weight or r.module: r for r in be.rows() if r.role == "forward"}


def _check_moe_structure(rows, layers, stack, experts_weights, router, heads=("lm_head.weight",)):
    """Blocks 0 and last high naming ``stack``; middle blocks' expert GEMMs NVFP4 with one row per stacked
    weight; routers high with the tile reason; the head high."""
    for i in range(layers):
        for name in experts_weights:
            row = rows[f"{stack}.{i}.{name}"]
            assert row.layer == i, (name, row.layer)
            if i in (0, layers - 1):
                assert row.precision == "high" and f"block(s) of {stack} stay" in row.reason, row.reason
            else:
                assert row.precision == "nvfp4", (name, row.reason)
        gate = rows[f"{stack}.{i}.{router}"]
        assert gate.precision == "high" and (i in (0, layers - 1) or "not divisible by the 16x16 tile" in gate.reason)
    for head in heads:
        assert rows[head].precision == "high" and "output head" in rows[head].reason


@pytest.mark.parametrize("implementation", ["grouped_mm", "grouped_mm-bf16", "batched_mm"])
def test_mixtral_experts_are_fp4_sites_per_stacked_weight(implementation):
    """In float32 transformers runs grouped_mm as its own fallback op, in bfloat16 as torch._grouped_mm."""
    model = _mixtral(implementation.removesuffix("-bf16"))
    if implementation.endswith("-bf16"):
        model = model.to(torch.bfloat16)
    be = _train(model, input_ids=_ids(), labels=_ids())
    rows = _forward_rows(be)
    experts = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    _check_moe_structure(rows, 3, "model.layers", experts, "mlp.gate.weight")
    middle = rows["model.layers.1.mlp.experts.down_proj"]
    assert middle.module == "model.layers.1.mlp.experts"
    assert sum(r.weight.endswith(experts) for r in rows.values()) == 6  # one row per expert group and weight
    table = rows_to_markdown(be.rows())
    assert "| model.layers.1.mlp.experts: down_proj, 4 experts | forward | nvfp4 |" in table
    code = be.reports[-1].pass_code[-1][1]
    calls = [line for line in code.splitlines() if "= fp4compile_ops_experts_fp4_expert_" in line]
    assert len(calls) == 2, calls  # the middle block's two expert GEMMs


def test_qwen2_moe_experts_and_shared_expert():
    be = _train(_qwen2_moe(), with_model=True, input_ids=_ids(), labels=_ids())
    rows = _forward_rows(be)
    _check_moe_structure(rows, 3, "model.layers", ("mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                                                    "mlp.shared_expert.up_proj.weight"), "mlp.gate.weight")
    shared_gate = rows["model.layers.1.mlp.shared_expert_gate.weight"]
    assert shared_gate.precision == "high" and shared_gate.reason.startswith("fallback:")


class _Expert(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w1, self.w2 = nn.Linear(d, 2 * d, bias=False), nn.Linear(2 * d, d, bias=False)

    def forward(self, x):
        return self.w2(torch.relu(self.w1(x)))


class _MoEBlock(nn.Module):
    """Attention-free block: a router over an experts ``ModuleList``, every expert run on every token and
    weighted by its routing weight (top-2, zero elsewhere)."""

    def __init__(self, d, experts=4):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, d)
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(_Expert(d) for _ in range(experts))

    def forward(self, x):
        x = x + self.proj(self.norm(x))
        h = self.norm(x)
        weights = torch.softmax(self.router(h), -1)
        top, index = weights.topk(2, dim=-1)
        dense = torch.zeros_like(weights).scatter(-1, index, top)
        return x + sum(dense[..., i:i + 1] * expert(h) for i, expert in enumerate(self.experts))


class _HandMoE(nn.Module):
    def __init__(self, d=32, layers=3):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(_MoEBlock(d) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


@pytest.mark.parametrize("with_model", [False, True])
def test_hand_written_moe_with_an_experts_module_list(with_model):
    model = _HandMoE()
    be = _train(model, with_model=with_model, ids=_ids())
    rows = _forward_rows(be)
    experts = tuple(f"experts.{e}.{w}.weight" for e in range(4) for w in ("w1", "w2"))
    _check_moe_structure(rows, 3, "blocks", experts + ("proj.weight",), "router.weight", heads=("head.weight",))


def test_fallback_warning_has_one_line_per_reason_with_its_count(caplog):
    policy = fp4compile.recipes.nvfp4(high_precision_first_blocks=0, high_precision_last_blocks=0)
    with caplog.at_level(logging.WARNING, logger="fp4compile"):
        _train(_HandMoE(), policy=policy, ids=_ids())
    warnings = [r.getMessage() for r in caplog.records if "fall back to high precision" in r.getMessage()]
    assert len(warnings) == 1, warnings
    lines = warnings[0].splitlines()
    assert "6 GEMM role(s)" in lines[0] and len(lines) == 3, lines
    assert lines[1].startswith("  3 x W: weight dimension 4 is not divisible by the 16x16 tile (e.g. blocks.0.router")
    assert lines[2].startswith("  3 x dy: reduction size 4 is not divisible by the block size 16")


# --- graph breaks: the model's names and structure in every graph ----------------------------------------------

def test_mixtral_eager_loop_graph_breaks_keep_the_models_names_without_the_model(caplog):
    """The eager expert loop splits Dynamo's graph; the backend finds the compiled model itself, so every graph
    names its sites from the model and places them in its stack, and it warns that the looped experts stay
    high precision."""
    model = _mixtral("eager")
    with caplog.at_level(logging.WARNING, logger="fp4compile"):
        be = _train(model, input_ids=_ids(), labels=_ids())
    assert len(be.reports) > 2  # the graph is split
    rows = _forward_rows(be)
    assert set(rows) <= {n for n, _ in model.named_parameters()}, sorted(rows)
    for i in range(3):
        attention = rows[f"model.layers.{i}.self_attn.o_proj.weight"]
        assert attention.layer == i and "output head" not in attention.reason
        assert (attention.precision == "high") == (i in (0, 2)), attention.reason
        assert "output head" not in rows[f"model.layers.{i}.mlp.gate.weight"].reason
    assert "output head" in rows["lm_head.weight"].reason
    messages = [r.getMessage() for r in caplog.records]
    assert any("model.layers.0.mlp.experts" in m and "set_experts_implementation('grouped_mm')" in m
               for m in messages), messages


def test_graph_break_in_a_compiled_function_warns_that_the_structure_is_lost(caplog):
    """A compiled function (not a module) gives the backend no model to find: it warns and says how to fix it."""
    model = _HandMoE()

    def step(ids):
        x = model.embed(ids)
        for block in model.blocks:
            x = block(x)
            torch._dynamo.graph_break()
        return model.head(model.norm(x))

    be = fp4compile.Fp4Backend(inner="eager", verify=True)
    with caplog.at_level(logging.WARNING, logger="fp4compile"):
        torch.compile(step, backend=be)(_ids()).square().mean().backward()
    warned = [r.getMessage() for r in caplog.records if "could not find the model" in r.getMessage()]
    assert len(warned) == 1 and "options={'model': model}" in warned[0], warned


def test_backward_with_the_model_across_graph_breaks_with_dynamic_token_counts():
    """Given the model, a graph of activations only (the experts' activation function, traced with a symbolic
    token count after a graph break) is compiled once for all sizes, not fixed to its first call's."""
    model = _mixtral("eager")
    be = _train(model, with_model=True, policy=fp4compile.recipes.high_precision(), inner="aot_eager",
                input_ids=_ids(), labels=_ids())
    assert all(p.grad is not None for p in model.parameters() if p.dim() == 2)
    assert len(be.reports) > 2
