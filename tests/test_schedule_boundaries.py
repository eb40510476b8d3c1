"""Schedules switch exactly at their start step: the step before runs the previous phase, the start step and the
step after run the new one (`fp4compile/policy/schedule.py`, ``Schedule.phase_at``), in the policy object and in
a compiled training step that reads the step counter at every call."""

from __future__ import annotations

import pytest
import torch

import fp4compile
from fp4compile.policy.precision import Role
from fp4compile.policy.schedule import FP4_PHASE, Phase, Schedule, late_switch, quantization_aware_finetuning
from helpers import batch
from models import GPT


@pytest.mark.parametrize("start", [1, 5, 8000])
@pytest.mark.parametrize("make", [late_switch, quantization_aware_finetuning], ids=["late_switch", "qaf"])
def test_single_switch_at_start_minus_one_start_and_start_plus_one(make, start):
    schedule = make(start)
    (switched,) = schedule.phases
    assert schedule.phase_at(start - 1) == FP4_PHASE
    assert schedule.phase_at(start) == switched
    assert schedule.phase_at(start + 1) == switched


def test_switch_at_step_zero_applies_from_the_first_step():
    schedule = late_switch(0)
    assert schedule.phase_at(0) == schedule.phases[0]


def test_each_phase_of_a_multi_phase_schedule_starts_at_its_step():
    a = Phase("a", frozenset({Role.WEIGHT_GRAD}), start_step=10)
    b = Phase("b", frozenset({Role.FORWARD, Role.WEIGHT_GRAD}), start_step=20)
    schedule = Schedule((a, b))
    assert [schedule.phase_at(s) for s in (9, 10, 11)] == [FP4_PHASE, a, a]
    assert [schedule.phase_at(s) for s in (19, 20, 21)] == [a, b, b]


def test_compiled_step_switches_on_the_call_at_the_start_step():
    """The backend asks the schedule at every call: the call with ``counter.step == start`` is the first that
    runs (and compiles) the late-switch variant; ``start - 1`` still runs the FP4 one."""
    start = 2
    counter = fp4compile.StepCounter()
    policy = fp4compile.recipes.nvfp4(schedule=late_switch(start))
    be = fp4compile.Fp4Backend(policy=policy, inner="eager", step_counter=counter)
    compiled = torch.compile(GPT(n_layer=3), backend=be)
    phases_seen = []
    for step in range(start + 2):
        assert counter.step == step
        compiled(*batch(seed=step)).backward()
        phases_seen.append(be.reports[-1].phase)
        counter.advance()
    assert phases_seen == ["fp4"] * start + ["late_switch"] * 2
