"""``fp4compile dump``: the dump of one training step of the example GPT, its numerics, ONNX export, report,
diff and command line.

Tolerances:
- the JSON rows equal the backend's rows exactly; SQNR equals an independent computation to 1e-6 dB (same
  float32 tensors, float64 sums in both);
- the ONNX forward (onnx.reference) against the compiled forward: the quantized codes and scales are the same
  bits, only the order of float32 roundings differs (ONNX multiplies ``E2M1 * (d_b * D)`` before its MatMul,
  the compiled GEMM applies ``D_a D_b`` after), so one quantized linear agrees to 1e-5 relative, and the GPT's
  loss to 1e-4 relative (a last-bit difference may move a downstream activation across an E2M1 threshold).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import fp4compile
from fp4compile.inspect.diff import diff_dumps
from fp4compile.inspect.layout import load_dump
from fp4compile.inspect.numerics import operand_numerics
from fp4compile.numerics.hadamard import random_hadamard_transform
from helpers import batch, compiled_step
from models import GPT

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDDEN = "transformer.h.1.mlp.c_fc"


def _model():
    torch.manual_seed(0)
    return GPT(n_layer=3)


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    """Dump A (the NV recipe) and dump B (the same with one module overridden to high precision)."""
    torch._dynamo.reset()
    model, inputs = _model(), batch()
    a = fp4compile.dump(model, *inputs, out=tmp_path_factory.mktemp("dump_a"), inner="aot_eager")
    torch._dynamo.reset()
    b = fp4compile.dump(model, *inputs, out=tmp_path_factory.mktemp("dump_b"), inner="aot_eager", onnx=False,
                        policy=fp4compile.recipes.nvfp4(high_precision=[OVERRIDDEN]))
    return model, inputs, a, b


def _sqnr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref, approx = ref.double(), approx.double()
    return float(10 * torch.log10((ref * ref).sum() / ((ref - approx) ** 2).sum()))


def test_dump_writes_every_file(dumps):
    _, _, a, _ = dumps
    files = set(os.listdir(a.out))
    assert {"precision_table.json", "precision_table.md", "numerics.json", "report.html", "model.onnx", "dump.json"} <= files
    code = set(os.listdir(os.path.join(a.out, "graph_0", "fp4")))
    assert {"pass_0_input.py", "pass_1_rewrite_gemms.py", "aot_forward.py", "aot_backward.py", "precision_table.json"} <= code
    rewritten = open(os.path.join(a.out, "graph_0", "fp4", "pass_1_rewrite_gemms.py")).read()
    assert rewritten.count("fp4_linear(") == 4  # block 1 of 3: first and last stay high (NV recipe)
    assert "fp4compile.quantize" in open(os.path.join(a.out, "graph_0", "fp4", "aot_backward.py")).read()
    assert "| transformer.h.1.mlp.c_fc | forward | nvfp4 |" in open(os.path.join(a.out, "precision_table.md")).read()
    manifest = json.load(open(os.path.join(a.out, "dump.json")))
    assert manifest["onnx"] == ["model.onnx"] and manifest["inner"] == "aot_eager"


def test_rows_match_the_backends_decisions(dumps):
    model, inputs, a, _ = dumps
    torch._dynamo.reset()
    _, _, be = compiled_step(copy.deepcopy(model), inputs, inner="aot_eager")
    expected = [r.to_dict() for r in be.rows()]
    assert json.load(open(os.path.join(a.out, "precision_table.json"))) == expected
    assert [r.to_dict() for r in a.rows] == expected
    assert len(expected) == 3 * 13 and {r["precision"] for r in expected} == {"nvfp4", "high"}


def test_dump_leaves_the_model_and_its_grads_alone(dumps):
    model, _, _, _ = dumps
    assert all(p.grad is None for p in model.parameters())
    fresh = _model()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))


def test_sqnr_agrees_with_an_independent_computation(dumps):
    model, inputs, a, _ = dumps
    entries = {e["label"]: e for e in json.load(open(os.path.join(a.out, "numerics.json")))}
    # Block 0 is high precision, so the input of block 1's c_attn is the eager activation, bit for bit.
    site = model.transformer.h[1].attn.c_attn
    captured = {}
    handle = site.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0].detach()))
    with torch.no_grad():
        model(*inputs)
    handle.remove()
    x2 = captured["x"].reshape(-1, captured["x"].shape[-1])
    label = "transformer.h.1.attn.c_attn"

    x_hat = fp4compile.quantize_dequantize(x2, "nvfp4")
    assert entries[f"{label}:forward:lhs"]["sqnr_db"] == pytest.approx(_sqnr(x2, x_hat), abs=1e-6)
    w_hat = fp4compile.quantize_dequantize(site.weight.detach(), "nvfp4", block=(16, 16))
    assert entries[f"{label}:forward:rhs"]["sqnr_db"] == pytest.approx(_sqnr(site.weight.detach(), w_hat), abs=1e-6)
    # Hadamard operand: compared in the transformed domain.
    xt = x2.t()
    xt_hat = fp4compile.quantize_dequantize(xt, "nvfp4", hadamard=True)
    assert entries[f"{label}:weight_grad:rhs"]["sqnr_db"] == pytest.approx(_sqnr(random_hadamard_transform(xt), xt_hat), abs=1e-6)
    assert entries[f"{label}:forward:lhs"]["amax"] == pytest.approx(float(x2.abs().max()))
    # Every quantized operand of the step has an entry; the input-gradient GEMM reuses the forward's 2D W.
    fp4_rows = [r for r in a.rows if r.precision == "nvfp4"]
    expected = {f"{r.module}:{r.role}:{op}" for r in fp4_rows for op in ("lhs", "rhs")} - {
        f"{r.module}:input_grad:rhs" for r in fp4_rows}
    assert set(entries) == expected
    assert all(10 < e["sqnr_db"] < 30 for e in entries.values())


def test_underflow_saturation_and_exact_tensors():
    outlier = torch.zeros(16)
    outlier[0] = 1e4
    tiny = torch.full((16,), 1e-6)  # block scale 1e-6 * (2688 / 1e4) / 6 underflows E4M3 to 0
    rounded_down = torch.zeros(16)
    rounded_down[3] = 2.9  # d_b = e4m3(2.9 * 0.2688 / 6 = 0.1299) = 0.125, so 2.9 * e_b = 6.24 > 6
    x = torch.cat([outlier, tiny, rounded_down])[None]
    n = operand_numerics("m:forward:lhs", x, fp4compile.quantize(x))
    assert n.underflow_fraction == pytest.approx(1 / 3)
    assert n.saturated_fraction == pytest.approx(17 / 48)  # the 16 elements of the underflowed block, and 2.9
    assert n.amax == 1e4 and (n.module, n.role, n.operand) == ("m", "forward", "lhs")
    exact = torch.tensor([[10.5, -7.0, 1.75, 3.5] * 4])  # S = 2688 / 10.5 = 256, d_b = 448: all exact
    assert operand_numerics("m:forward:rhs", exact, fp4compile.quantize(exact)).sqnr_db is None
    with pytest.raises(ValueError, match="label must look like"):
        operand_numerics("nolabel", exact, fp4compile.quantize(exact))
    with pytest.raises(ValueError, match="shape"):
        operand_numerics("m:forward:lhs", exact[:, :8], fp4compile.quantize(exact))


def test_onnx_is_valid_and_matches_the_compiled_forward(dumps):
    from onnx import TensorProto

    from fp4compile.inspect.onnx_export import run_reference

    model, inputs, a, _ = dumps
    m = onnx.load(os.path.join(a.out, "model.onnx"))
    onnx.checker.check_model(m, full_check=True)
    assert any(o.domain in ("", "ai.onnx") and o.version >= 23 for o in m.opset_import)
    inits = {i.name: i for i in m.graph.initializer}
    fp4 = [i for i in inits.values() if i.data_type == TensorProto.FLOAT4E2M1]
    assert len(fp4) == 4 and all(i.name.startswith("transformer.h.1.") for i in fp4)
    assert sum(i.data_type == TensorProto.FLOAT8E4M3FN for i in inits.values()) == 4
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    blocked = [n for n in dq if any(at.name == "block_size" and at.i == 16 for at in n.attribute)]
    assert len(dq) == 16 and len(blocked) == 8  # per site: codes of W and x (blocked), their E4M3 scales
    # The stored weight is the very quantization the step used.
    w = model.transformer.h[1].mlp.c_fc.weight.detach()
    qt = fp4compile.quantize(w, "nvfp4", block=(16, 16))
    stored = onnx.numpy_helper.to_array(inits["transformer.h.1.mlp.c_fc.weight_fp4"])
    assert stored.shape == tuple(w.shape)
    assert inits["transformer.h.1.mlp.c_fc.weight_fp4"].raw_data == qt.qdata.numpy().tobytes()
    scales = inits["transformer.h.1.mlp.c_fc.weight_scale_e4m3"].raw_data
    assert scales == qt.scale.repeat_interleave(16, 0).view(torch.uint8).numpy().tobytes()

    (loss,) = run_reference(m, inputs)
    assert abs(float(loss) - a.output.item()) <= 1e-4 * abs(a.output.item())


class _OneLinear(torch.nn.Module):
    def __init__(self, n=48):
        super().__init__()
        self.fc = torch.nn.Linear(64, n)

    def forward(self, x):
        return self.fc(x)


def test_onnx_of_one_quantized_linear_matches_elementwise(tmp_path):
    from fp4compile.inspect.onnx_export import run_reference

    torch.manual_seed(0)
    model = _OneLinear()
    x = torch.randn(2, 8, 64) * torch.logspace(-3, 2, 64)  # a wide dynamic range: small blocks, big blocks
    policy = fp4compile.recipes.nvfp4(quantize_output_head=True)
    result = fp4compile.dump(model, x, out=tmp_path, policy=policy, inner="aot_eager")
    assert result.onnx and result.output.shape == (2, 8, 48)  # backward ran from the output's sum
    assert {n.label for n in result.numerics} >= {"fc:forward:lhs", "fc:forward:rhs", "fc:weight_grad:lhs"}
    (y,) = run_reference(result.onnx[0], [x])
    torch.testing.assert_close(torch.from_numpy(y), result.output, rtol=1e-5, atol=1e-5 * result.output.abs().max().item())


def test_onnx_export_refuses_mxfp4_with_the_site_named(tmp_path):
    torch.manual_seed(0)
    policy = fp4compile.recipes.mxfp4(quantize_output_head=True)
    result = fp4compile.dump(_OneLinear(64), torch.randn(4, 64), out=tmp_path, policy=policy, inner="eager")
    assert result.onnx == [] and "fc" in result.onnx_error and "mxfp4" in result.onnx_error
    assert os.path.isfile(tmp_path / "report.html")
    assert all(n.format == "mxfp4" for n in result.numerics)
    by_label = {n.label: n for n in result.numerics}
    assert by_label["fc:forward:lhs"].sqnr_db > 5 and by_label["fc:forward:rhs"].sqnr_db > 5
    assert by_label["fc:weight_grad:lhs"].sqnr_db is None  # dy of a sum is all ones: quantized exactly


def test_diff_against_itself_and_against_one_override(dumps):
    _, _, a, b = dumps
    same = diff_dumps(a.out, a.out)
    assert same.identical and not same.has_decision_differences and same.modules() == set()
    d = diff_dumps(a.out, b.out)
    assert d.modules() == {OVERRIDDEN}
    assert {(c.module, c.role) for c in d.changed} == {(OVERRIDDEN, r) for r in ("forward", "input_grad", "weight_grad")}
    assert all(c.fields["precision"] == ("nvfp4", "high") for c in d.changed)
    assert not d.only_in_a and not d.only_in_b and not d.operands_only_in_b
    assert {label.rsplit(":", 2)[0] for label in d.operands_only_in_a} == {OVERRIDDEN}


def test_report_is_self_contained(dumps):
    _, _, a, _ = dumps
    page = open(os.path.join(a.out, "report.html"), encoding="utf-8").read()
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert page.replace('xmlns="http://www.w3.org/2000/svg"', "").count("http") == 0
    assert page.count("<svg") == 2  # the SQNR plot and the drawing of graph_0
    assert 'aria-label="SQNR by layer"' in page and "transformer.h.1.mlp.c_fc" in page
    assert page.count("<circle") >= 20 + 6  # one point per operand, plus the legend
    assert "#2e9e5b" in page  # quantized GEMMs drawn in the FP4 colour


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(dumps, tmp_path):
    _, _, a, _ = dumps
    shot = tmp_path / "report.png"
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900", f"--screenshot={shot}",
           "file://" + os.path.join(a.out, "report.html")]
    subprocess.run(cmd, capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000  # a rendered page, not a blank one


def _cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "fp4compile.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_cli_show_and_diff(dumps):
    _, _, a, b = dumps
    show = _cli("dump", "show", a.out)
    assert show.returncode == 0, show.stderr
    assert OVERRIDDEN in show.stdout and "SQNR lhs" in show.stdout and "12/39 roles in FP4" in show.stdout
    same = _cli("dump", "diff", a.out, a.out)
    assert same.returncode == 0 and "no differences" in same.stdout
    diff = _cli("dump", "diff", a.out, b.out)
    assert diff.returncode == 1
    assert f"1 module(s): {OVERRIDDEN}" in diff.stdout and "'nvfp4' -> 'high'" in diff.stdout
    missing = _cli("dump", "show", os.path.join(a.out, "nope"))
    assert missing.returncode == 2 and "not an fp4compile dump" in missing.stderr


_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from models import GPT
    torch.manual_seed(0)
    model = GPT(n_layer=3)
    step = torch.compile(model, backend="fp4")
    for _ in range(2):
        idx = torch.randint(0, 64, (2, 32))
        step(idx, idx).backward()
    print("trained", sys.argv[1:])
    """
)


def test_cli_dump_run_writes_a_dump(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT.format(tests=os.path.join(REPO, "tests")))
    out = tmp_path / "dump"
    env = dict(os.environ, FP4COMPILE_INNER="eager")
    env.pop("FP4COMPILE_DUMP", None)
    run = _cli("dump", "run", str(script), "--flag", "--out", str(out), env=env)
    assert run.returncode == 0, run.stderr
    assert "trained ['--flag']" in run.stdout
    data = load_dump(out)
    assert len(data.rows) == 39 and data.manifest["source"] == "FP4COMPILE_DUMP"
    assert {n.module for n in data.numerics} == {f"transformer.h.1.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert all(n.calls == 2 for n in data.numerics)  # measured at the first step, counted at both
    assert os.path.isfile(out / "report.html")


def test_console_script(dumps):
    _, _, a, _ = dumps
    exe = os.path.join(os.path.dirname(sys.executable), "fp4compile")
    if not os.path.isfile(exe):
        pytest.skip("the console script is not installed (pip install --no-deps --no-build-isolation -e .)")
    result = subprocess.run([exe, "dump", "diff", a.out, a.out], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "no differences" in result.stdout


def test_split_run_args_and_argument_errors(tmp_path):
    from fp4compile.cli import split_run_args

    assert split_run_args(["t.py", "--out", "x", "--lr", "1", "--out", "d"]) == ("d", ["t.py", "--out", "x", "--lr", "1"])
    assert split_run_args(["t.py", "--out=d"]) == ("d", ["t.py"])
    assert split_run_args(["--out", "d", "--", "t.py", "--out", "x"]) == ("d", ["t.py", "--out", "x"])
    assert split_run_args(["t.py"]) == (None, ["t.py"])
    with pytest.raises(TypeError, match="out must be a folder path"):
        fp4compile.dump(_OneLinear(), torch.randn(2, 64), out=3)
    with pytest.raises(FileNotFoundError, match="not an fp4compile dump"):
        load_dump(tmp_path)
