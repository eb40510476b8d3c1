"""Schedules: a policy that changes with the training step (NV's late switch, FATW's QAF; docs/numerics.md sections
3-4).

The backend compiles one variant of a graph per phase it meets and picks the variant of the current phase at
every call, so advancing the step never recompiles, and each switch compiles at most once.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Protocol, Sequence

from .precision import Role

__all__ = ["Phase", "PhaseSource", "Schedule", "StepCounter", "late_switch", "quantization_aware_finetuning", "FP4_PHASE"]


@dataclasses.dataclass(frozen=True)
class Phase:
    """A stretch of training in which the roles in ``high_precision_roles`` run in high precision everywhere,
    and the ``(module, role)`` pairs in ``high_precision_sites`` for those modules only."""

    name: str
    high_precision_roles: frozenset[Role] = frozenset()
    start_step: int = 0
    high_precision_sites: frozenset[tuple[str, Role]] = frozenset()


class PhaseSource(Protocol):
    """What the backend asks a schedule: the phase at a step. Each distinct phase compiles once."""

    def phase_at(self, step: int) -> Phase: ...


FP4_PHASE = Phase("fp4")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Phases by starting step; before the first switch the policy applies unchanged."""

    phases: tuple[Phase, ...]

    def __post_init__(self) -> None:
        steps = [p.start_step for p in self.phases]
        if steps != sorted(steps) or len(set(steps)) != len(steps):
            raise ValueError(f"Schedule: phases need strictly increasing start steps, got {steps}")
        if any(s < 0 for s in steps):
            raise ValueError(f"Schedule: start steps must be >= 0, got {steps}")

    def phase_at(self, step: int) -> Phase:
        current = FP4_PHASE
        for phase in self.phases:
            if step >= phase.start_step:
                current = phase
        return current


def _roles(roles: Iterable["Role | str"]) -> frozenset[Role]:
    return frozenset(Role(r) for r in roles)


def late_switch(start_step: int, roles: Sequence["Role | str"] = (Role.FORWARD,)) -> Schedule:
    """NV's late switch: from ``start_step`` the given roles (the forward GEMMs by default; pass all three
    for "both passes") run in high precision (docs/numerics.md section 3.5: the last ~18% of tokens)."""
    return Schedule((Phase("late_switch", _roles(roles), start_step),))


def quantization_aware_finetuning(start_step: int) -> Schedule:
    """FATW's QAF: from ``start_step`` the forward stays FP4 and both backward GEMMs run in high precision."""
    return Schedule((Phase("qaf", _roles((Role.INPUT_GRAD, Role.WEIGHT_GRAD)), start_step),))


class StepCounter:
    """The training step a schedule reads. Advance it once per optimizer step; save it with the checkpoint."""

    def __init__(self, step: int = 0) -> None:
        self.step = int(step)

    def advance(self, n: int = 1) -> int:
        self.step += n
        return self.step

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])

    def __repr__(self) -> str:
        return f"StepCounter(step={self.step})"
