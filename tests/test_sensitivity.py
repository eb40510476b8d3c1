"""``fp4compile.sensitivity`` and ``recipes.from_sensitivity`` on a two-block GPT with one deliberately damaged
site: a weight with a huge outlier, whose NVFP4 tensor scale makes every other 16x16 block scale underflow.

The damage is invisible in high precision (the outlier's feature is cancelled by its bias), so only FP4 sees
it: the site's forward GEMM must rank first, far ahead of every other site, and so must its site and block. The SQNR of that W
is high (the outlier holds all its energy and is exact): the damage shows in the gradients, not in the SQNR.
"""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch

import fp4compile
from fp4compile import Role, recipes
from fp4compile.cli import main as cli_main
from fp4compile.inspect.sensitivity import SensitivityReport, load_sensitivity
from helpers import batch
from models import GPT

DAMAGED = "transformer.h.0.mlp.c_fc"


def _damaged_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = GPT(n_layer=2, block_size=16)
    block = model.transformer.h[0]
    with torch.no_grad():
        outlier = 1e6 * block.mlp.c_fc.weight.abs().max()  # every other block scale underflows to 0 under NVFP4
        block.mlp.c_fc.weight[0, 0] = outlier
        # High precision never sees the outlier: the input feature it multiplies is the constant 1 and the bias
        # cancels it, so feature 0 sits at GELU(-10) ~ 0 and the activations keep their usual range.
        block.ln_2.weight[0], block.ln_2.bias[0] = 0.0, 1.0
        block.mlp.c_fc.bias[0] = -outlier - 10.0
    return model


@pytest.fixture(scope="module")
def measured():
    model = _damaged_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = fp4compile.sensitivity(model, batches=[batch(t=16, seed=0), batch(t=16, seed=1)], per_site=True,
                                    progress=False)
    return model, before, report


def test_the_damaged_site_ranks_first(measured):
    _, _, report = measured
    ranked = report.ranked("role")
    assert len(ranked) == 9 * 3 and [e.rank for e in ranked] == list(range(1, 28))
    assert (ranked[0].module, ranked[0].role) == (DAMAGED, "forward")
    assert ranked[0].grad_error > 3 * max(e.grad_error for e in ranked if e.module != DAMAGED)
    assert report.ranked("site")[0].module == DAMAGED
    assert report.ranked("block")[0].module == "transformer.h.0"
    # The backward roles do not touch the loss; the damaged forward does.
    assert report.entry(DAMAGED, "input_grad").loss_delta == 0.0
    assert abs(report.entry(DAMAGED, "forward").loss_delta) > 0.0
    # The SQNR of its weight is the highest of every forward weight: it cannot see this damage.
    forward = [e for e in ranked if e.role == "forward"]
    assert max(forward, key=lambda e: e.sqnr_rhs_db).module == DAMAGED
    assert report.noise_floor == 0.0  # CPU: the repeated high-precision pass is bit-identical


def test_sites_are_named_modules_with_layers_and_head(measured):
    model, _, report = measured
    names = dict(model.named_modules())
    assert all(s.module in names for s in report.sites)
    head = [s for s in report.sites if s.is_output_head]
    assert [s.module for s in head] == ["lm_head"] and head[0].layer_index is None
    assert {s.layer_index for s in report.sites if not s.is_output_head} == {0, 1}
    fc = next(s for s in report.sites if s.module == DAMAGED)
    assert report.entry(DAMAGED, "forward").flops == 2 * 2 * 16 * fc.in_features * fc.out_features


def test_the_model_is_left_as_it_was(measured):
    model, before, _ = measured
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_json_round_trip(measured, tmp_path):
    _, _, report = measured
    assert SensitivityReport.from_json(report.to_json()) == report
    path = report.save(tmp_path)
    assert load_sensitivity(tmp_path) == report and path == os.path.join(tmp_path, "sensitivity.json")
    with open(os.path.join(tmp_path, "sensitivity.html")) as f:
        assert "FP4 sensitivity" in f.read()
    with pytest.raises(ValueError, match="not an fp4compile sensitivity report"):
        SensitivityReport.from_json(json.dumps({"recipe": "x"}))


@pytest.mark.parametrize("budget", [0.0, 0.05, 0.2, 0.5, 1.0])
def test_budget_is_respected_and_every_choice_has_its_reason(measured, budget):
    _, _, report = measured
    policy = recipes.from_sensitivity(report, budget)
    spent = report.high_precision_fraction(policy)
    assert spent <= budget + 1e-12
    assert len(policy.rules) == 3 * len(report.sites)
    flops = {(e.module, e.role): e.flops for e in report.entries if e.scope == "role"}
    allowed = budget * report.total_flops
    for site in report.sites:
        for role in Role:
            decision = policy.decide(site, role)
            entry = report.entry(site.module, role)
            assert decision.reason.startswith("sensitivity: ") and f"rank {entry.rank}/" in decision.reason
            assert f"grad error {entry.grad_error:.3g}" in decision.reason
            if not decision.precision.is_high:  # greedy: an FP4 part did not fit in what was left
                assert spent * report.total_flops + flops[(site.module, role.value)] > allowed
    if budget == 1.0:
        assert spent == 1.0
    if budget == 0.0:
        assert spent == 0.0
    if budget >= 0.2:  # the damaged forward is ranked first; it is 5.1% of the FLOPs
        assert policy.decide(next(s for s in report.sites if s.module == DAMAGED), Role.FORWARD).precision.is_high


def test_nv_rule_fraction_and_same_budget(measured):
    _, _, report = measured
    nv = recipes.high_precision_flop_fraction(report)
    # two blocks: the NV rule keeps both (first and last) and the head: everything high
    assert nv == pytest.approx(1.0)
    keep_first = recipes.nvfp4(high_precision_last_blocks=0)
    share = sum(e.flops for e in report.entries if e.scope == "role" and (e.layer == 0 or e.module == "lm_head"))
    assert recipes.high_precision_flop_fraction(report, keep_first) == pytest.approx(share / report.total_flops)
    with pytest.raises(ValueError, match="budget must be a fraction"):
        recipes.from_sensitivity(report, 1.5)


def test_compiled_policy_uses_the_reasons(measured, tmp_path):
    """The rules match the compiler's site names: the dump's precision table carries the measured reasons,
    and the report page gets the sensitivity section when saved beside the dump."""
    model, _, report = measured
    policy = recipes.from_sensitivity(report, 0.25)
    torch._dynamo.reset()
    result = fp4compile.dump(model, *batch(t=16), out=tmp_path, policy=policy, inner="eager", onnx=False)
    rows = [r for r in result.rows if r.module]
    assert len(rows) == 27 and all(r.reason.startswith("sensitivity: ") for r in rows)
    expected = {(s.module, r.value): policy.decide(s, r).precision.precision for s in report.sites for r in Role}
    assert {(r.module, r.role): r.precision for r in rows} == expected
    report.save(tmp_path)
    with open(os.path.join(tmp_path, "report.html")) as f:
        page = f.read()
    assert "FP4 sensitivity" in page and "Precision table" in page


def test_cli_on_a_tiny_script(tmp_path, capsys):
    script = tmp_path / "tiny.py"
    script.write_text(textwrap.dedent("""
        import torch

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = torch.nn.ModuleList(torch.nn.Linear(32, 32) for _ in range(2))
                self.head = torch.nn.Linear(32, 16)

            def forward(self, x, y):
                for layer in self.layers:
                    x = torch.relu(layer(x))
                return torch.nn.functional.cross_entropy(self.head(x), y)

        def sensitivity_inputs(argv):
            torch.manual_seed(int(argv[argv.index("--seed") + 1]) if "--seed" in argv else 0)
            return Net(), [(torch.randn(16, 32), torch.randint(0, 16, (16,)))]
    """))
    out = tmp_path / "out"
    status = cli_main(["sensitivity", "--no-progress", "--budget", "0.3", str(script), "--seed", "1",
                       "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "3 sites, 8 site-roles measured" in printed and "from_sensitivity(budget=30.0%)" in printed
    report = load_sensitivity(out)
    assert [s.module for s in report.sites] == ["layers.0", "layers.1", "head"]
    # The first layer's input (the data) needs no gradient: its input-gradient GEMM never runs nor costs.
    first = report.entry("layers.0", "input_grad")
    assert not first.measured and "never runs" in first.skipped and first.flops == 0
    assert os.path.isfile(out / "sensitivity.html")
    assert cli_main(["sensitivity", f"{script}:missing", "--out", str(out)]) == 2


def test_conv1d_sites_measure_as_their_linear_twin():
    """GPT-2's Conv1D (weight stored (in, out)) is a site like nn.Linear: the same weights give the same report."""
    torch.manual_seed(0)
    conv, linear = GPT(n_layer=1, block_size=16, conv1d=True), GPT(n_layer=1, block_size=16)
    with torch.no_grad():
        for (name, a), (_, b) in zip(conv.named_modules(), linear.named_modules()):
            if type(a).__name__ == "Conv1D":
                b.weight.copy_(a.weight.t())
                b.bias.copy_(a.bias)
            elif isinstance(a, (torch.nn.LayerNorm, torch.nn.Embedding)):
                b.load_state_dict(a.state_dict())
    inputs = batch(t=16)
    with torch.no_grad():
        assert float(conv(*inputs)) == pytest.approx(float(linear(*inputs)), rel=1e-5)
    reports = [fp4compile.sensitivity(m, *inputs, blocks=False, per_site=False, progress=False) for m in (conv, linear)]
    assert [s.module for s in reports[0].sites] == [s.module for s in reports[1].sites]
    assert [(s.in_features, s.out_features) for s in reports[0].sites] == [(32, 96), (32, 32), (32, 128), (128, 32), (32, 64)]
    for a, b in zip(reports[0].entries, reports[1].entries):
        assert (a.module, a.role, a.flops) == (b.module, b.role, b.flops)
        assert a.grad_error == pytest.approx(b.grad_error, rel=1e-3, abs=1e-6), (a.module, a.role)


def test_study_script_imports_the_convergence_study():
    """examples/sensitivity_study.py builds on examples/convergence.py by import; its CPU run
    (``--tiny --steps 20``) takes minutes, so CI only checks that it loads."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "sensitivity_study.py")
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--measure-after" in out.stdout and "--granularity" in out.stdout


class _TwoStacks(torch.nn.Module):
    """An encoder and a decoder stack of MLP blocks, neither named with integers alone, then a head: the
    backend keeps each stack's first and last block high; the report must place its sites the same way."""

    def __init__(self, d: int = 32, n: int = 3) -> None:
        super().__init__()

        def block() -> torch.nn.Sequential:
            return torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.GELU(), torch.nn.Linear(2 * d, d))

        self.encoder = torch.nn.ModuleDict({f"layer_{i}": block() for i in range(n)})
        self.decoder = torch.nn.ModuleList(block() for _ in range(n))
        self.head = torch.nn.Linear(d, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for b in self.encoder.values():
            x = x + b(x)
        for b in self.decoder:
            x = x + b(x)
        return torch.nn.functional.cross_entropy(self.head(x).flatten(0, 1), y.flatten())


def test_sites_are_placed_in_their_stacks_as_the_backend_places_them():
    torch.manual_seed(0)
    model = _TwoStacks()
    x, y = torch.randn(2, 16, 32), torch.randint(0, 8, (2, 16))
    report = fp4compile.sensitivity(model, batches=[(x, y)], per_site=False, blocks=True, progress=False)
    stacks = {s.module: s.stack for s in report.sites}
    assert stacks["encoder.layer_1.0"] == "encoder" and stacks["decoder.2.2"] == "decoder", stacks
    assert [s.module for s in report.sites if s.is_output_head] == ["head"]
    policy = recipes.nvfp4()
    from_report = {s.module for s in report.sites if policy.decide(s, Role.FORWARD).precision.is_high}
    compiled = torch.compile(model, backend=fp4compile.backend(policy=policy, inner="aot_eager", model=model))
    compiled(x, y).backward()
    backend = fp4compile.backend(policy=policy, inner="aot_eager", model=model)
    from_backend = {r.module for r in backend.rows() if r.role == "forward" and r.precision == "high"}
    # first and last block of each stack, and the head
    assert from_report == from_backend == {"encoder.layer_0.0", "encoder.layer_0.2", "encoder.layer_2.0",
                                           "encoder.layer_2.2", "decoder.0.0", "decoder.0.2", "decoder.2.0",
                                           "decoder.2.2", "head"}
    assert {e.module for e in report.entries if e.scope == "block"} == {
        "encoder.0", "encoder.1", "encoder.2", "decoder.0", "decoder.1", "decoder.2"}
