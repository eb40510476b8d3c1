"""`fp4compile.export`: NVFP4 checkpoints in the compressed-tensors and Model Optimizer layouts.

Oracles, none of them the exporter's own code:

- the ``compressed-tensors`` package (its unpacker, its ``dequantize`` and its ``NVFP4PackedCompressor``, its
  dynamic activation quantization, and transformers' loader built on it) reads the compressed-tensors folders;
- a Model Optimizer decoder written here from that format's definition (``weight``: two E2M1 codes per byte,
  the even column in the low nibble; value ``E2M1 * weight_scale * weight_scale_2``; activations quantized with
  ``1 / input_scale`` as the global encode scale) reads the modelopt folders;
- fp4compile's reference quantizer (``fp4compile.quantize`` of the layer's weight with the recipe's 16x16
  tiles) says what each exported weight must be, and the compiled model's forward loss what the reloaded
  model must compute.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn

import fp4compile
from fp4compile import recipes
from fp4compile.cli import main as cli_main
from fp4compile.numerics.formats import E4M3, Fp4Format
from fp4compile.policy import HIGH, GemmPrecision, OperandPrecision, Recipe

ct = pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor  # noqa: E402
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import dequantize, fake_quantize  # noqa: E402
from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp  # noqa: E402

VOCAB = 128
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def _ids(b=2, t=16, seed=0):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def _llama():
    config = transformers.LlamaConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(config)


def _gpt2():
    config = transformers.GPT2Config(n_layer=3, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def _gemm_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` matrix the layer's GEMM multiplies (GPT-2's Conv1D stores its transpose)."""
    return module.weight.detach().t() if _is_conv1d(module) else module.weight.detach()


def _reference(module: nn.Module):
    """fp4compile's reference quantization of a layer's forward weight under the NV recipe (16x16 tiles)."""
    return fp4compile.quantize(_gemm_weight(module), "nvfp4", block=(16, 16), impl="reference")


# --- decoders written from each format's definition ------------------------------------------------------------

_CT_WEIGHTS = QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True,
                               dynamic=False, scale_dtype=torch.float8_e4m3fn)
_CT_INPUTS = QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True,
                              dynamic="local", scale_dtype=torch.float8_e4m3fn)


def _ct_decode(tensors: dict, m: str) -> torch.Tensor:
    """compressed-tensors' own semantics in float32: its unpacker, then its ``dequantize`` with the global scale."""
    packed = tensors[f"{m}.weight_packed"]
    values = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
    return dequantize(values, tensors[f"{m}.weight_scale"].to(torch.float32), args=_CT_WEIGHTS,
                      global_scale=tensors[f"{m}.weight_global_scale"], dtype=torch.float32)


def _modelopt_codes(packed: torch.Tensor) -> torch.Tensor:
    """Model Optimizer's packing: byte ``j`` of a row holds column ``2j`` in bits 0-3, ``2j + 1`` in bits 4-7."""
    codes = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.int64)
    codes[:, 0::2] = (packed & 0x0F).long()
    codes[:, 1::2] = (packed >> 4).long()
    return codes


def _modelopt_decode(tensors: dict, m: str) -> torch.Tensor:
    """``E2M1[code] * weight_scale * weight_scale_2``, one scale per 16 consecutive in-features; the product is
    exact in float64 (at most 2 + 4 + 24 significant bits), rounded once to float32."""
    codes = _modelopt_codes(tensors[f"{m}.weight"])
    values = E2M1[codes & 7] * torch.where(codes >= 8, -1.0, 1.0).double()
    block = tensors[f"{m}.weight_scale"].to(torch.float64).repeat_interleave(16, dim=1)
    return (values * block * tensors[f"{m}.weight_scale_2"].double()).to(torch.float32)


def _round_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value, ties to the even code (the grid's midpoints 0.25, 0.75, ... 5 go to the neighbour
    with the even mantissa bit)."""
    mags = E2M1.to(v.dtype)
    a = v.abs().clamp(max=6.0)
    dist = (a.unsqueeze(-1) - mags).abs()
    best = dist.min(dim=-1, keepdim=True).values
    candidates = torch.where(dist == best, torch.arange(8), 99)  # the even code among tied neighbours
    even = torch.where(candidates % 2 == 0, candidates, 99).min(dim=-1).values
    code = torch.where(even < 99, even, candidates.min(dim=-1).values)
    return mags[code] * torch.sign(v)


def _modelopt_quantize_input(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 activation quantization with a static global decode scale ``input_scale``: per block of 16, the
    E4M3 scale ``amax_b / (6 * input_scale)``, then the nearest E2M1 value of ``x / (scale * input_scale)``."""
    xb = x.reshape(*x.shape[:-1], -1, 16).to(torch.float32)
    scale = (xb.abs().amax(-1, keepdim=True) / (6.0 * input_scale)).clamp(max=448.0).to(torch.float8_e4m3fn)
    step = scale.to(torch.float32) * input_scale
    q = torch.where(step > 0, _round_e2m1(xb / torch.where(step > 0, step, 1.0)) * step, torch.zeros_like(xb))
    return q.reshape(x.shape).to(x.dtype)


def _ct_quantize_input(module: nn.Module, x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' own dynamic ("local") activation quantization under the static global scale."""
    scale, zp = compute_dynamic_scales_and_zp(value=x, args=_CT_INPUTS, module=module, global_scale=global_scale)
    return fake_quantize(x, scale, zp, _CT_INPUTS, global_scale=global_scale)


def _reload(path: str, make_model) -> nn.Module:
    """A plain model from the folder: high-precision tensors loaded as they are, each FP4 layer's weight decoded
    with its format's semantics (float32) and its input quantized as the format prescribes."""
    tensors = safetensors_torch.load_file(os.path.join(path, "model.safetensors"))
    is_ct = os.path.exists(os.path.join(path, "config.json")) and "compressed-tensors" in open(
        os.path.join(path, "config.json")).read()
    model = make_model()
    modules = dict(model.named_modules())
    fp4 = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")})
    state = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in fp4 or k.endswith(".bias")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {f"{m}.weight" for m in fp4} | {"lm_head.weight"}, (missing, unexpected)
    for m in fp4:
        module = modules[m]
        weight = _ct_decode(tensors, m) if is_ct else _modelopt_decode(tensors, m)
        module.weight.data = weight.t().contiguous() if _is_conv1d(module) else weight
        if is_ct:
            g = tensors[f"{m}.input_global_scale"]
            module.register_forward_pre_hook(lambda mod, args, g=g: (_ct_quantize_input(mod, args[0], g),))
        else:
            s = tensors[f"{m}.input_scale"]
            module.register_forward_pre_hook(lambda mod, args, s=s: (_modelopt_quantize_input(args[0], s),))
    return model.eval()


# --- the round trip: every FP4 weight, bit for bit ---------------------------------------------------------------

def _train_and_evaluate(model, ids, optimizer):
    """Two training steps with the fp4 backend on ``ids``, then the outputs of the compiled model's FP4 forward
    and of the model in high precision, both without gradients in eval mode (no dropout)."""
    compiled = torch.compile(model, backend=fp4compile.Fp4Backend(inner="eager", model=model), dynamic=False)
    opt = optimizer(model.parameters())
    for _ in range(2):
        compiled(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        return compiled(input_ids=ids, labels=ids), model(input_ids=ids, labels=ids)


@pytest.fixture(scope="module")
def llama_exports(tmp_path_factory):
    """A tiny Llama trained two steps with the fp4 backend, its FP4-forward loss, and both exports of it."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = _llama()
    ids = _ids()
    fp4_out, high_out = _train_and_evaluate(model, ids, lambda params: torch.optim.AdamW(params, lr=1e-2))
    root = tmp_path_factory.mktemp("llama")
    results = {fmt: fp4compile.export(model, root / fmt, batches=[{"input_ids": ids}], format=fmt,
                                      dtype=torch.float32, progress=False)
               for fmt in ("compressed-tensors", "modelopt")}
    return model, ids, fp4_out, high_out, results


def test_compressed_tensors_decompressor_reads_the_forward_weights(llama_exports):
    model, _, _, _, results = llama_exports
    path = results["compressed-tensors"].path
    tensors = safetensors_torch.load_file(os.path.join(path, "model.safetensors"))
    modules = dict(model.named_modules())
    scheme = QuantizationScheme(targets=["Linear"], weights=_CT_WEIGHTS)
    fp4 = results["compressed-tensors"].fp4_layers
    # The NV recipe: blocks 1 (of 0-2) in FP4, 7 linears; blocks 0 and 2 and the head in high precision.
    assert sorted(fp4) == sorted(m for m in modules if m.startswith("model.layers.1.") and m.endswith("_proj"))
    for m in fp4:
        ref = _reference(modules[m])
        n, k = ref.shape
        packed, scale, g = (tensors[f"{m}.{t}"] for t in ("weight_packed", "weight_scale", "weight_global_scale"))
        assert (packed.dtype, tuple(packed.shape)) == (torch.uint8, (n, k // 2))
        assert (scale.dtype, tuple(scale.shape)) == (torch.float8_e4m3fn, (n, k // 16))  # 1 x 16 along in-features
        assert (g.dtype, tuple(g.shape)) == (torch.float32, (1,))
        # Bit for bit: the package's unpacked E2M1 values times the stored block scales are the reference's
        # unscaled operand E2M1 * d_b (what an NVFP4 GEMM multiplies), and 1 / weight_global_scale, the factor
        # vLLM applies, is the reference's decode scale D: the stored global scale is the encode scale.
        values = unpack_fp4_from_uint8(packed, n, k, dtype=torch.float32)
        unscaled = values * scale.to(torch.float32).repeat_interleave(16, dim=1)
        assert torch.equal(unscaled, ref.dequantize_unscaled())
        assert torch.equal((torch.ones(1) / g).reshape(()), ref.per_tensor_scale)
        # The package's dense decode divides the block scale by the global scale before multiplying by the
        # E2M1 value, one rounding away from E2M1 * d_b * D: equal up to one float32 unit in the last place.
        dense = _ct_decode(tensors, m)
        want = ref.dequantize(torch.float32)
        assert torch.all((dense - want).abs() <= torch.finfo(torch.float32).eps * want.abs()), m
        # Its full decompressor (bfloat16 out): the same weight rounded to bfloat16, to one bf16 unit at most.
        out = NVFP4PackedCompressor.decompress({"weight_packed": packed, "weight_scale": scale,
                                                "weight_global_scale": g}, scheme)["weight"]
        want16 = ref.dequantize(torch.bfloat16).float()
        assert torch.all((out.float() - want16).abs() <= torch.finfo(torch.bfloat16).eps * want16.abs()), m


def test_modelopt_layout_decodes_to_the_forward_weights_bit_for_bit(llama_exports):
    model, _, _, _, results = llama_exports
    path = results["modelopt"].path
    tensors = safetensors_torch.load_file(os.path.join(path, "model.safetensors"))
    modules = dict(model.named_modules())
    for m in results["modelopt"].fp4_layers:
        ref = _reference(modules[m])
        n, k = ref.shape
        assert (tensors[f"{m}.weight"].dtype, tuple(tensors[f"{m}.weight"].shape)) == (torch.uint8, (n, k // 2))
        assert tensors[f"{m}.weight_scale"].dtype == torch.float8_e4m3fn
        assert tuple(tensors[f"{m}.weight_scale"].shape) == (n, k // 16)
        for name in ("weight_scale_2", "input_scale"):
            assert (tensors[f"{m}.{name}"].dtype, tensors[f"{m}.{name}"].dim()) == (torch.float32, 0)
        assert torch.equal(_modelopt_decode(tensors, m), ref.dequantize(torch.float32)), m
    quant = json.load(open(os.path.join(path, "hf_quant_config.json")))["quantization"]
    assert (quant["quant_algo"], quant["group_size"]) == ("NVFP4", 16)
    assert set(quant["exclude_modules"]) == set(results["modelopt"].ignored)
    assert "lm_head" in quant["exclude_modules"] and "model.layers.0.self_attn.q_proj" in quant["exclude_modules"]
    config = json.load(open(os.path.join(path, "config.json")))
    assert config["quantization_config"]["quant_method"] == "modelopt"
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 3


def test_fused_siblings_with_their_own_global_scales_are_reported(llama_exports):
    """Training gives q/k/v and gate/up each its own tensor scale; the result lists the groups a fusing server
    would decode with one scale."""
    result = llama_exports[4]["modelopt"]
    scales = {m: layer.weight_encode_scale.item() for m, layer in result.fp4_layers.items()}
    qkv = [f"model.layers.1.self_attn.{n}_proj" for n in "qkv"]
    gate_up = [f"model.layers.1.mlp.{n}_proj" for n in ("gate", "up")]
    expected = [g for g in (qkv, gate_up) if len({scales[m] for m in g}) > 1]
    assert expected and result.unshared_fused_scales == expected


def test_compressed_tensors_config_parses_with_the_package(llama_exports):
    from compressed_tensors.quantization import QuantizationConfig

    result = llama_exports[4]["compressed-tensors"]
    config = json.load(open(os.path.join(result.path, "config.json")))
    parsed = QuantizationConfig.model_validate(config["quantization_config"])
    assert parsed.format == "nvfp4-pack-quantized" and parsed.quantization_status == "compressed"
    group = parsed.config_groups["group_0"]
    assert group.weights.group_size == 16 and group.weights.strategy == "tensor_group" and not group.weights.dynamic
    assert group.input_activations.dynamic == "local"
    assert set(parsed.ignore) == set(result.ignored) and "lm_head" in parsed.ignore
    assert not set(parsed.ignore) & set(result.fp4_layers)


# --- trained, exported, reloaded: the same loss ------------------------------------------------------------------

def _assert_reloaded_loss(path, make_model, ids, fp4_out, high_out):
    """The reloaded model's loss is the FP4 forward's to float32 rounding, and its logits are far closer to the
    FP4 forward's than the high-precision model's are (the check tells FP4 from high precision)."""
    with torch.no_grad():
        out = _reload(path, make_model)(input_ids=ids, labels=ids)
    assert abs(out.loss.item() - fp4_out.loss.item()) <= 1e-5 * abs(fp4_out.loss.item()), (
        out.loss.item(), fp4_out.loss.item())
    error = (out.logits - fp4_out.logits).abs().max().item()
    assert 100 * error < (high_out.logits - fp4_out.logits).abs().max().item(), error


@pytest.mark.parametrize("fmt", ["compressed-tensors", "modelopt"])
def test_trained_llama_reloaded_computes_the_fp4_forward_loss(llama_exports, fmt):
    model, ids, fp4_out, high_out, results = llama_exports
    _assert_reloaded_loss(results[fmt].path, _llama, ids, fp4_out, high_out)


def test_trained_gpt2_exported_in_both_formats_reloads_to_the_fp4_forward_loss(tmp_path):
    model = _gpt2()
    ids = _ids()
    fp4_out, high_out = _train_and_evaluate(model, ids, lambda params: torch.optim.SGD(params, lr=0.1))
    for fmt in ("compressed-tensors", "modelopt"):
        result = fp4compile.export(model, tmp_path / fmt, batches=[{"input_ids": ids}], format=fmt,
                                   dtype=torch.float32, progress=False)
        assert sorted(result.fp4_layers) == [f"transformer.h.1.{n}" for n in
                                             ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
        tensors = safetensors_torch.load_file(os.path.join(result.path, "model.safetensors"))
        assert "lm_head.weight" not in tensors and "transformer.wte.weight" in tensors  # tied: written once
        _assert_reloaded_loss(result.path, _gpt2, ids, fp4_out, high_out)


def test_transformers_loads_the_compressed_tensors_folder(llama_exports, tmp_path):
    """transformers' own loader (through compressed-tensors) reads the default bfloat16 export: the FP4 layers
    come up with the very packed weights, and the model, in bfloat16, computes the FP4 forward's loss to
    bfloat16 accuracy."""
    model, ids, fp4_out, _, _ = llama_exports
    fp4_loss = fp4_out.loss
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_byte_tokenizer(), bos_token="<s>", eos_token="</s>")
    result = fp4compile.export(model, tmp_path / "ct", batches=[{"input_ids": ids}], tokenizer=tokenizer,
                               progress=False)
    tensors = safetensors_torch.load_file(os.path.join(result.path, "model.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert transformers.AutoTokenizer.from_pretrained(result.path)("a b")["input_ids"] == [2, 3]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.bfloat16)
    up = loaded.model.layers[1].mlp.up_proj
    assert torch.equal(up.weight_packed, tensors["model.layers.1.mlp.up_proj.weight_packed"])
    with torch.no_grad():
        loss = loaded(input_ids=ids, labels=ids).loss.float()
    assert abs(loss.item() - fp4_loss.item()) < 2e-3 * fp4_loss.item(), (loss.item(), fp4_loss.item())


def _byte_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "a": 2, "b": 3}, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


# --- bad input: a clear ValueError, nothing written --------------------------------------------------------------

class _MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


class _Blocks(nn.Module):
    """An input projection, a stack of two MLP blocks, a head: with the NV recipe's first and last block turned
    off, the projection and the blocks are FP4 and the head high precision."""

    def __init__(self, d_in=32, d=32):
        super().__init__()
        self.proj = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(_MLP(d) for _ in range(2))
        self.head = nn.Linear(d, 8)

    def forward(self, x):
        x = self.proj(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


_ALL_BLOCKS = recipes.nvfp4(high_precision_first_blocks=0, high_precision_last_blocks=0)


def _leftovers(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_small_model_exports_with_bf16_high_precision_and_its_ignore_list(tmp_path):
    model = _Blocks()
    result = fp4compile.export(model, tmp_path / "out", batches=[torch.randn(4, 8, 32)], policy=_ALL_BLOCKS,
                               format="modelopt", progress=False)
    assert sorted(result.fp4_layers) == ["blocks.0.down", "blocks.0.up", "blocks.1.down", "blocks.1.up", "proj"]
    assert result.ignored == ["head"] and "output head" in result.high_precision_reasons["head"]
    tensors = safetensors_torch.load_file(os.path.join(result.path, "model.safetensors"))
    assert tensors["head.weight"].dtype == torch.bfloat16 and tensors["proj.bias"].dtype == torch.bfloat16
    assert "proj.weight" in tensors and tensors["proj.weight"].dtype == torch.uint8
    assert _leftovers(tmp_path) == ["out"]
    assert sorted(os.listdir(result.path)) == ["config.json", "hf_quant_config.json", "model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(result.path).st_mode & 0o777 == 0o777 & ~umask  # as mkdir would make it, not mkdtemp's 0700
    assert os.stat(os.path.join(result.path, "model.safetensors")).st_mode & 0o777 == 0o666 & ~umask


def test_model_without_fp4_layers_is_refused(tmp_path):
    with pytest.raises(ValueError, match="runs no linear layer of this model in FP4"):
        fp4compile.export(_Blocks(), tmp_path / "out", batches=[torch.randn(4, 8, 32)],
                          policy=recipes.high_precision(), progress=False)
    assert _leftovers(tmp_path) == []


def test_existing_path_is_refused_and_left_alone(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        fp4compile.export(_Blocks(), target, batches=[torch.randn(4, 8, 32)], policy=_ALL_BLOCKS, progress=False)
    assert os.listdir(target) == ["keep.txt"]


def test_layer_the_formats_cannot_hold_is_named(tmp_path):
    """A research format with blocks of 8 runs a layer with 24 in-features in FP4 in training; the serving
    formats hold blocks of 16 along in-features, so export names the layer and its shape and writes nothing."""
    fmt = Fp4Format(8, E4M3, True, "nearest")
    forward = GemmPrecision(OperandPrecision(fmt, (1, 8)), OperandPrecision(fmt, (8, 8)))
    policy = Recipe("b8", forward, HIGH, HIGH)
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 8))
    with pytest.raises(ValueError, match=r"layer '0' \(weight \(32, 24\).*in_features 24 is not a multiple of 16"):
        fp4compile.export(model, tmp_path / "out", batches=[torch.randn(4, 24)], policy=policy, progress=False)
    assert _leftovers(tmp_path) == []


def test_failure_while_writing_leaves_nothing(tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, folder):
            open(os.path.join(folder, "tokenizer.json"), "w").close()
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        fp4compile.export(_Blocks(), tmp_path / "out", batches=[torch.randn(4, 8, 32)], policy=_ALL_BLOCKS,
                          tokenizer=BrokenTokenizer(), progress=False)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("kwargs, match", [({"format": "gguf"}, "format must be one of"),
                                           ({"batches": []}, "at least one batch")])
def test_bad_arguments(tmp_path, kwargs, match):
    args = {"batches": [torch.randn(4, 8, 32)], "policy": _ALL_BLOCKS, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        fp4compile.export(_Blocks(), tmp_path / "out", **args)
    assert _leftovers(tmp_path) == []


def test_command_line(tmp_path, capsys):
    target = tmp_path / "target.py"
    target.write_text(
        "import torch\n"
        "from test_export import _Blocks\n"
        "def export_inputs():\n"
        "    torch.manual_seed(0)\n"
        "    return _Blocks(), [torch.randn(4, 8, 32)]\n")
    out = tmp_path / "ckpt"
    os.environ.setdefault("PYTHONPATH", "")
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    try:
        status = cli_main(["export", "--format", "compressed-tensors", "--recipe", "nvfp4",
                           "--high-precision-first-blocks", "0", "--high-precision-last-blocks", "0", "--no-progress",
                           f"{target}:export_inputs", "--out", str(out)])
    finally:
        sys.path.remove(os.path.dirname(__file__))
    assert status == 0, capsys.readouterr().err
    config = json.load(open(out / "config.json"))["quantization_config"]
    assert config["ignore"] == ["head"] and config["format"] == "nvfp4-pack-quantized"
    assert "5 layers in NVFP4" in capsys.readouterr().out
    assert cli_main(["export", "--no-progress", f"{target}:export_inputs", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
