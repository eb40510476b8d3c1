"""Models nobody here wrote, as users write them: Hugging Face transformers models from tiny random
configurations (no weights are downloaded), ``nn.TransformerEncoder`` and ``nn.MultiheadAttention``, block
stacks under any names.

What is checked: the precision table says what the NV recipe means (first and last block of every block
stack and the output head in high precision, the rest NVFP4, with the stack named in the reason), module paths
are the names ``model.named_modules()`` gives (so rules written with them apply), and a second step of the
same shape compiles nothing. Inner compiler ``eager``: the passes and the table are what is under test.
"""

from __future__ import annotations

import collections
import copy
import logging

import pytest
import torch
import torch.nn as nn

import fp4compile

VOCAB = 128


def _transformers():
    """transformers (a dev dependency), or skip the test."""
    return pytest.importorskip("transformers")


def _ids(b=2, t=16, seed=0):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def _train(model, *args, steps=2, policy=None, with_model=False, **inputs):
    """``steps`` compiled training steps on the same inputs; returns the backend and the compile count after
    each step."""
    be = fp4compile.Fp4Backend(policy=policy, inner="eager", verify=True, model=model if with_model else None)
    compiled = torch.compile(model, backend=be)
    counts = []
    for _ in range(steps):
        out = compiled(*args, **inputs)
        loss = out.loss if hasattr(out, "loss") else out.float().square().mean()
        loss.backward()
        counts.append(len(be.reports))
    return be, counts


def _forward_rows(be):
    return {r.module: r for r in be.rows() if r.role == "forward"}


def _assert_nv_structure(rows, stacks: dict[str, int], heads: set[str]):
    """Per stack (path -> block count): blocks 0 and last high precision naming the stack, the others
    NVFP4; ``heads`` high precision as the output head; every site in a stack or a head."""
    for module, row in rows.items():
        if module in heads:
            assert row.precision == "high" and "output head" in row.reason, (module, row.reason)
            continue
        stack = next((s for s in stacks if module.startswith(s + ".")), None)
        assert stack is not None, f"{module} lies in no expected stack ({row.reason})"
        block = int(module[len(stack) + 1:].split(".")[0])
        assert row.layer == block, (module, row.layer)
        if block in (0, stacks[stack] - 1):
            assert row.precision == "high" and f"block(s) of {stack} stay" in row.reason, (module, row.reason)
        else:
            assert row.precision == "nvfp4", (module, row.reason)
    assert heads <= set(rows)


def _gpt2():
    config = _transformers().GPT2Config(n_layer=3, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return _transformers().GPT2LMHeadModel(config)


def _llama():
    config = _transformers().LlamaConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      bos_token_id=0, eos_token_id=0)
    return _transformers().LlamaForCausalLM(config)


def _t5():
    config = _transformers().T5Config(num_layers=3, num_decoder_layers=4, d_model=64, d_ff=128, d_kv=16, num_heads=4,
                                   vocab_size=VOCAB, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return _transformers().T5ForConditionalGeneration(config)


def _bert():
    config = _transformers().BertConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=128,
                                     num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=32)
    return _transformers().BertForMaskedLM(config)


@pytest.mark.parametrize("with_model", [False, True])
def test_gpt2_tied_head_blocks_and_one_compile(with_model):
    model = _gpt2()
    be, counts = _train(model, with_model=with_model, input_ids=_ids(), labels=_ids())
    rows = _forward_rows(be)
    assert counts[0] == counts[1], "the second step of the same shape compiled again"
    assert set(rows) == {f"transformer.h.{i}.{n}" for i in range(3)
                         for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")} | {"lm_head"}
    _assert_nv_structure(rows, {"transformer.h": 3}, {"lm_head"})
    assert rows["lm_head"].weight == "transformer.wte.weight"  # tied: the embedding's own name


@pytest.mark.parametrize("with_model", [False, True])
def test_llama_paths_are_named_modules_names_and_rules_by_them_apply(with_model):
    model = _llama()
    policy = fp4compile.recipes.nvfp4(high_precision=["model.layers.1.self_attn.*"])
    be, counts = _train(model, policy=policy, with_model=with_model, input_ids=_ids(), labels=_ids())
    rows = _forward_rows(be)
    assert counts[0] == counts[1]
    names = dict(model.named_modules())
    assert set(rows) <= set(names) and len(rows) == 3 * 7 + 1, sorted(rows)
    for module, row in rows.items():
        if module.startswith("model.layers.1.self_attn."):
            assert row.precision == "high" and "model.layers.1.self_attn.*" in row.reason
    rest = {m: r for m, r in rows.items() if not m.startswith("model.layers.1.self_attn.")}
    _assert_nv_structure(rest, {"model.layers": 3}, {"lm_head"})


def test_llama_gradient_checkpointing_keeps_the_names_given_the_model():
    """Under Hugging Face's gradient checkpointing Dynamo compiles ``model.model``'s forward as a frame of its
    own; with the model the sites still carry the model's names and its stack."""
    model = _llama()
    # transformers 5.24 renamed it (the old name warns); older releases have only the old name.
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    be, _ = _train(model, steps=1, with_model=True, input_ids=_ids(), labels=_ids())
    rows = _forward_rows(be)
    assert set(rows) <= set(dict(model.named_modules())) and len(rows) == 3 * 7 + 1, sorted(rows)
    _assert_nv_structure(rows, {"model.layers": 3}, {"lm_head"})


def test_rule_matching_no_site_warns_with_the_nearest_paths(caplog):
    policy = fp4compile.recipes.nvfp4(high_precision=["layers.1.self_attn.*"])
    with caplog.at_level(logging.WARNING, logger="fp4compile"):
        _train(_llama(), steps=1, policy=policy, input_ids=_ids(), labels=_ids())
    warned = [r.getMessage() for r in caplog.records if "'layers.1.self_attn.*' matches none" in r.getMessage()]
    assert len(warned) == 1 and "model.layers.1.self_attn." in warned[0], warned


def test_t5_encoder_and_decoder_stacks_each_keep_their_first_and_last_block():
    model = _t5()
    be, counts = _train(model, with_model=True, input_ids=_ids(), labels=_ids(seed=1))
    rows = _forward_rows(be)
    assert counts[0] == counts[1]
    assert sum(m.startswith("encoder.block.") for m in rows) == 3 * 6
    assert sum(m.startswith("decoder.block.") for m in rows) == 4 * 10
    _assert_nv_structure(rows, {"encoder.block": 3, "decoder.block": 4}, {"lm_head"})


def test_t5_stacks_without_the_model():
    """Without the model each stack still keeps its own first and last block. (The decoder's paths may start
    at ``block.``: on some torch versions Dynamo compiles ``decoder``'s forward as a frame of its own.)"""
    be, _ = _train(_t5(), steps=1, input_ids=_ids(), labels=_ids(seed=1))
    blocks: dict[str, dict[int, set[str]]] = collections.defaultdict(lambda: collections.defaultdict(set))
    for module, row in _forward_rows(be).items():
        if row.layer is not None:
            stack = module[: module.index(f".{row.layer}.")]
            blocks[stack][row.layer].add(row.precision)
    assert {len(b) for b in blocks.values()} == {3, 4} and len(blocks) == 2, dict(blocks)
    for stack, by_block in blocks.items():
        last = max(by_block)
        assert all(p == ({"high"} if i in (0, last) else {"nvfp4"}) for i, p in by_block.items()), (stack, by_block)


def test_bert_mlm_prediction_head_stays_high_precision():
    """The output head is everything after the last block: BERT's MLM transform and its (tied) decoder."""
    model = _bert()
    be, counts = _train(model, input_ids=_ids(), labels=_ids(seed=1))
    rows = _forward_rows(be)
    assert counts[0] == counts[1]
    heads = {"cls.predictions.transform.dense", "cls.predictions.decoder"}
    _assert_nv_structure(rows, {"bert.encoder.layer": 3}, heads)
    assert rows["cls.predictions.decoder"].weight == "bert.embeddings.word_embeddings.weight"


class _Classifier(nn.Module):
    """An input projection, ``nn.TransformerEncoder`` (``nn.MultiheadAttention`` inside), a classifier."""

    def __init__(self, d=64, layers=3):
        super().__init__()
        self.proj = nn.Linear(32, d)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True),
                                             layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        return self.head(self.encoder(self.proj(x)))


_ENCODER_LINEARS = ("self_attn", "self_attn.out_proj", "linear1", "linear2")


@pytest.mark.parametrize("with_model", [False, True])
def test_transformer_encoder_attention_projections_are_sites(with_model):
    model = _Classifier()
    be, counts = _train(model, with_model=with_model, x=torch.randn(2, 16, 32))
    rows = _forward_rows(be)
    assert counts[0] == counts[1]
    assert set(rows) == {f"encoder.layers.{i}.{n}" for i in range(3) for n in _ENCODER_LINEARS} | {"proj", "head"}
    assert rows["encoder.layers.1.self_attn"].weight == "encoder.layers.1.self_attn.in_proj_weight"
    assert rows["proj"].precision == "nvfp4" and rows["proj"].layer is None  # before the stack: not the head
    _assert_nv_structure({m: r for m, r in rows.items() if m != "proj"}, {"encoder.layers": 3}, {"head"})


def _vit_like(layers=4, d=64):
    """torchvision's ViT layout: blocks ``encoder.layers.encoder_layer_<i>`` in a Sequential, each with an
    ``mlp`` Sequential of two Linears (``mlp.0``, ``mlp.3``) and ``nn.MultiheadAttention``; ``heads.head``."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.self_attention = nn.MultiheadAttention(d, 4, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(0.0), nn.Linear(2 * d, d), nn.Dropout(0.0))

        def forward(self, x):
            y = self.ln_1(x)
            x = x + self.self_attention(y, y, y, need_weights=False)[0]
            return x + self.mlp(self.ln_2(x))

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Module()
            self.encoder.layers = nn.Sequential(collections.OrderedDict(
                (f"encoder_layer_{i}", Block()) for i in range(layers)))
            self.heads = nn.Sequential(collections.OrderedDict(head=nn.Linear(d, 10)))

        def forward(self, x):
            return self.heads(self.encoder.layers(x)[:, 0])

    return ViT()


@pytest.mark.parametrize("with_model", [False, True])
def test_stack_with_named_blocks_is_found_by_structure(with_model):
    model = _vit_like()
    be, _ = _train(model, with_model=with_model, x=torch.randn(2, 16, 64))
    rows = _forward_rows(be)
    per_block = ("self_attention", "self_attention.out_proj", "mlp.0", "mlp.3")
    assert set(rows) == {f"encoder.layers.encoder_layer_{i}.{n}" for i in range(4) for n in per_block} | {"heads.head"}
    for module, row in rows.items():
        if module == "heads.head":
            assert row.precision == "high" and "output head" in row.reason
            continue
        block = int(module.split("encoder_layer_")[1].split(".")[0])
        assert row.layer == block, (module, row.layer)
        assert (row.precision == "high") == (block in (0, 3)), (module, row.reason)
        if block in (0, 3):
            assert "of encoder.layers stay" in row.reason


def test_stack_at_the_root_of_a_sequential():
    block = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Linear(32, 64), *(copy.deepcopy(block) for _ in range(4)), nn.Linear(64, 10))
    be, _ = _train(model, torch.randn(2, 16, 32))
    rows = _forward_rows(be)
    assert rows["0"].precision == "nvfp4" and rows["0"].layer is None
    assert rows["5"].precision == "high" and "output head" in rows["5"].reason
    for i in range(1, 5):
        for name in _ENCODER_LINEARS:
            row = rows[f"{i}.{name}"]
            assert row.layer == i and (row.precision == "high") == (i in (1, 4)), (i, name, row.reason)


# --- nn.MultiheadAttention split into its projections: the same numbers as eager ------------------------

def _mha_case(name):
    torch.manual_seed(0)
    d, L, S, N = 32, 8, 6, 2
    kwargs, call = {}, {"need_weights": False}
    q = torch.randn(N, L, d)
    k = v = q
    if name == "self_masks_weights":
        q = k = v = torch.randn(L, N, d)
        mask = torch.zeros(N, L, dtype=torch.bool)
        mask[0, -2:] = True
        # Both masks boolean: mixed mask types make nn.MultiheadAttention warn, and Dynamo not compile it.
        call = {"key_padding_mask": mask, "attn_mask": torch.rand(L, L) > 0.8, "need_weights": True,
                "average_attn_weights": False}
    elif name == "causal":
        kwargs = {"batch_first": True}
        call = {"attn_mask": nn.Transformer.generate_square_subsequent_mask(L), "is_causal": True,
                "need_weights": False}
    elif name == "unbatched":
        q = k = v = torch.randn(L, d)
    elif name == "kdim_vdim":
        kwargs = {"batch_first": True, "kdim": 16, "vdim": 24}
        k, v = torch.randn(N, S, 16), torch.randn(N, S, 24)
    elif name == "packed_cross":
        kwargs = {"batch_first": True}
        k = v = torch.randn(N, S, d)
    elif name == "bias_kv":
        kwargs = {"batch_first": True, "add_bias_kv": True}
    kwargs.setdefault("batch_first", name not in ("self_masks_weights", "unbatched"))
    return nn.MultiheadAttention(d, 4, **kwargs), (q, k, v), call


def _mha_step(module, inputs, call, backend=None):
    q, k, v = (t.clone().requires_grad_() for t in inputs)
    if inputs[1] is inputs[0]:
        k = v = q
    fn = torch.compile(module, backend=backend) if backend is not None else module
    out, weights = fn(q, k, v, **call)
    (out.square().sum() + (weights.sum() if weights is not None else 0)).backward()
    return out, weights, q.grad, [p.grad for p in module.parameters()]


@pytest.mark.parametrize("case", ["self_masks_weights", "causal", "unbatched", "kdim_vdim", "packed_cross", "bias_kv"])
def test_multihead_attention_split_matches_eager(case):
    """In high precision the split call computes what ``F.multi_head_attention_forward`` computes: outputs,
    weights and gradients equal to float32 rounding."""
    module, inputs, call = _mha_case(case)
    expected = _mha_step(copy.deepcopy(module), inputs, call)
    be = fp4compile.Fp4Backend(policy=fp4compile.recipes.high_precision(), inner="aot_eager", verify=True)
    got = _mha_step(module, inputs, call, be)
    for a, b in zip(expected[:3], got[:3]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(expected[3], got[3]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    rows = [(r.weight, r.reason) for r in be.rows() if r.role == "forward"]
    if case == "bias_kv":  # not split: one row for the call, high precision with the reason
        assert len(rows) == 1 and "add_bias_kv" in rows[0][1]
    elif case == "packed_cross":  # q, k and v on row slices of in_proj_weight: high precision with the reason
        assert sorted(rows)[:3] == [("", "fallback: the weight is a slice of parameter in_proj_weight: GEMMs on part"
                                          " of a weight are not rewritten")] * 3
        assert sorted(rows)[3][0] == "out_proj.weight"
    else:
        expected = {"q_proj_weight", "k_proj_weight", "v_proj_weight"} if case == "kdim_vdim" else {"in_proj_weight"}
        assert {w for w, _ in rows} == expected | {"out_proj.weight"}


def test_multihead_attention_projections_run_in_fp4():
    """Under a recipe quantizing everything the in- and out-projection run as FP4 GEMMs."""
    module, inputs, call = _mha_case("causal")
    policy = fp4compile.recipes.nvfp4(high_precision_first_blocks=0, high_precision_last_blocks=0,
                                      quantize_output_head=True)
    be = fp4compile.Fp4Backend(policy=policy, inner="eager", verify=True)
    out, _, grad, _ = _mha_step(module, inputs, call, be)
    rows = _forward_rows(be)
    assert {r.weight: r.precision for r in rows.values()} == {"in_proj_weight": "nvfp4", "out_proj.weight": "nvfp4"}
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    code = be.reports[-1].pass_code[-1][1]
    calls = [line for line in code.splitlines() if "fp4_linear(" in line]
    assert len(calls) == 2 and "multi_head_attention_forward" not in code, calls


def test_dump_takes_keyword_inputs(tmp_path):
    model = _llama()
    result = fp4compile.dump(model, input_ids=_ids(), labels=_ids(), out=tmp_path, inner="eager", onnx=False)
    modules = {r.module for r in result.rows}
    assert "model.layers.1.mlp.up_proj" in modules and "lm_head" in modules
    assert (tmp_path / "precision_table.json").exists()


class _Experts(nn.Module):
    """Stacked expert weights ``(experts, N, K)`` as transformers 5 stores a mixture of experts' MLPs, used
    slice by slice and in one batched GEMM."""

    def __init__(self, experts=4, d=32):
        super().__init__()
        self.w = nn.Parameter(torch.randn(experts, d, d) / d**0.5)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        per_expert = torch.stack([nn.functional.linear(x, self.w[i]) for i in range(self.w.shape[0])])
        batched = torch.bmm(per_expert, self.w.transpose(1, 2))
        return self.out(batched.sum(0))


def test_gemms_on_stacked_expert_weights():
    """The batched GEMM on the stacked weight is a site run per expert; GEMMs on one expert's slice are listed
    in high precision with the reason."""
    be, _ = _train(_Experts(), torch.randn(8, 32), steps=1)
    rows = [r for r in be.rows() if r.role == "forward"]
    sliced = [r for r in rows if "stacked expert weights" in r.reason]
    assert len(sliced) == 4 and all(r.precision == "high" and r.reason.startswith("fallback:") for r in sliced)
    batched = [r for r in rows if r.weight == "w"]
    assert len(batched) == 1 and batched[0].precision == "nvfp4", batched
    assert {r.module for r in rows} == {"", "out"}


# --- heads of several towers ------------------------------------------------------------------------------------

def _clip():
    tower = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3)
    config = _transformers().CLIPConfig(text_config=dict(vocab_size=VOCAB, max_position_embeddings=16, bos_token_id=0,
                                                         eos_token_id=1, **tower),
                                        vision_config=dict(image_size=32, patch_size=8, **tower), projection_dim=32)
    return _transformers().CLIPModel(config)


def test_clip_both_towers_projections_are_heads():
    """Each tower's projection follows its stack's final norm and feeds only the loss: both are heads, though the
    text tower runs after the vision tower."""
    be, counts = _train(_clip(), input_ids=_ids(), pixel_values=torch.randn(2, 3, 32, 32), return_loss=True)
    rows = _forward_rows(be)
    assert counts[0] == counts[1]
    _assert_nv_structure(rows, {"text_model.encoder.layers": 3, "vision_model.encoder.layers": 3},
                         {"visual_projection", "text_projection"})


def test_whisper_encoder_and_decoder_stacks_and_head():
    config = _transformers().WhisperConfig(vocab_size=VOCAB, d_model=64, encoder_layers=3, decoder_layers=3,
                                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                           decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=16,
                                           max_target_positions=16, decoder_start_token_id=0, pad_token_id=0,
                                           bos_token_id=0, eos_token_id=1)
    be, _ = _train(_transformers().WhisperForConditionalGeneration(config), steps=1,
                   input_features=torch.randn(2, 16, 32), labels=_ids(t=8))
    _assert_nv_structure(_forward_rows(be), {"model.encoder.layers": 3, "model.decoder.layers": 3}, {"proj_out"})


class _TwoStacks(nn.Module):
    """An encoder stack, a bridge projection feeding a decoder stack, and a head."""

    def __init__(self, d=32):
        super().__init__()
        self.encoder = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.ReLU()) for _ in range(3))
        self.bridge = nn.Linear(d, d)
        self.decoder = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.ReLU()) for _ in range(3))
        self.head = nn.Linear(d, 16)

    def forward(self, x):
        for block in self.encoder:
            x = block(x)
        x = self.bridge(x)
        for block in self.decoder:
            x = block(x)
        return self.head(x)


def test_a_projection_feeding_a_later_stack_is_not_a_head():
    rows = _forward_rows(_train(_TwoStacks(), torch.randn(4, 32), steps=1)[0])
    assert rows["bridge"].precision == "nvfp4" and rows["bridge"].layer is None, rows["bridge"].reason
    _assert_nv_structure({m: r for m, r in rows.items() if m != "bridge"}, {"encoder": 3, "decoder": 3}, {"head"})
