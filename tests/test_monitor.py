"""The gradient-noise monitor (FATW, docs/numerics.md section 4) and the schedules, on CPU."""

from __future__ import annotations

import math

import pytest
import torch

import fp4compile
from fp4compile.monitor import GradientNoiseMonitor, gradient_noise_ratio, noise_adaptive_schedule
from fp4compile.numerics.hadamard import random_hadamard_transform
from fp4compile.ops.observe import observe_quantization
from helpers import batch
from models import GPT


def test_ratio_is_the_direct_computation():
    g = torch.randn(64, 128)
    qt = fp4compile.quantize(g, rounding="stochastic", seed=3)
    direct = g.double().norm() / (fp4compile.quantize(g, rounding="stochastic", seed=3).dequantize().double()
                                  - g.double()).norm()
    assert gradient_noise_ratio(g, qt) == pytest.approx(direct.item(), rel=1e-12)
    qh = fp4compile.quantize(g, hadamard=True)
    direct_h = random_hadamard_transform(g).double().norm() / (qh.dequantize().double()
                                                                - random_hadamard_transform(g).double()).norm()
    assert gradient_noise_ratio(g, qh) == pytest.approx(direct_h.item(), rel=1e-12)
    # NVFP4's relative error is ~10%: the ratio is about 10, far above sqrt(3) for a healthy gradient.
    assert 5 < gradient_noise_ratio(g, qt) < 20


def test_monitor_in_a_compiled_step_reports_what_a_direct_computation_gives():
    torch.manual_seed(0)
    counter = fp4compile.StepCounter()
    monitor = GradientNoiseMonitor(counter, every=2)
    seen = []

    def spy(label, x, qt):
        seen.append((label, x.detach().clone(), qt))
        monitor(label, x, qt)

    cm = torch.compile(GPT(n_layer=3), backend=fp4compile.Fp4Backend(inner="eager", step_counter=counter))
    with observe_quantization(spy):
        for step in range(3):
            cm(*batch(seed=step)).backward()
            counter.advance()
    # Measured on steps 0 and 2, for both gradient operands of each of block 1's four linears.
    assert sorted({m.step for m in monitor.history}) == [0, 2]
    assert {(m.module, m.role) for m in monitor.history} == {
        (f"transformer.h.1.{n}", r) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        for r in ("input_grad", "weight_grad")}
    last = [(label, x, qt) for label, x, qt in seen if label.endswith(":input_grad:lhs")][-1]
    module = last[0].rsplit(":", 2)[0]
    x, qt = last[1].double(), last[2]
    direct = x.norm() / (qt.dequantize().double() - x).norm()
    assert monitor.latest()[(module, "input_grad")] == pytest.approx(direct.item(), rel=1e-9)
    assert not monitor.flagged


def test_noise_adaptive_schedule_switches_flagged_backwards_once():
    torch.manual_seed(0)
    counter = fp4compile.StepCounter()
    monitor = GradientNoiseMonitor(counter, every=1, threshold=math.inf)  # every measurement flags its layer
    policy = fp4compile.recipes.nvfp4(schedule=noise_adaptive_schedule(monitor))
    be = fp4compile.Fp4Backend(policy=policy, inner="aot_eager", step_counter=counter)
    cm = torch.compile(GPT(n_layer=3), backend=be)
    with monitor:
        for step in range(4):
            cm(*batch(seed=step)).backward()
            counter.advance()
    assert monitor.flagged == {f"transformer.h.1.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert [r.phase for r in be.reports] == ["fp4", "fp4+noise[4]"]  # one compile per distinct phase
    rows = [r for r in be.reports[-1].rows if r.layer == 1]
    assert all(r.precision == "nvfp4" for r in rows if r.role == "forward")
    assert all(r.precision == "high" and "noise" in r.reason for r in rows if r.role != "forward")


def test_quantization_aware_finetuning_schedule():
    torch.manual_seed(0)
    counter = fp4compile.StepCounter()
    policy = fp4compile.recipes.fp4_all_the_way(schedule=fp4compile.schedules.quantization_aware_finetuning(2))
    be = fp4compile.Fp4Backend(policy=policy, inner="aot_eager", step_counter=counter)
    cm = torch.compile(GPT(n_layer=2), backend=be)
    for step in range(4):
        cm(*batch(seed=step)).backward()
        counter.advance()
    assert [r.phase for r in be.reports] == ["fp4", "qaf"]
    qaf = [r for r in be.reports[1].rows if r.module != "lm_head"]
    assert all(r.precision == "nvfp4" for r in qaf if r.role == "forward")
    assert all(r.precision == "high" for r in qaf if r.role != "forward")


def test_schedule_validation():
    with pytest.raises(ValueError, match="strictly increasing"):
        fp4compile.schedules.Schedule((fp4compile.schedules.Phase("a", start_step=5),
                                       fp4compile.schedules.Phase("b", start_step=5)))
    with pytest.raises(ValueError, match="every must be >= 1"):
        GradientNoiseMonitor(fp4compile.StepCounter(), every=0)
