"""Precision policies: what precision each GEMM site and role gets, and why."""

from .precision import HIGH, Decision, GemmPrecision, LinearPrecision, OperandPrecision, Role
from .recipe import Policy, Recipe, Rule
from .schedule import Phase, Schedule, StepCounter
from .site import GemmSite

__all__ = ["HIGH", "Decision", "GemmPrecision", "LinearPrecision", "OperandPrecision", "Role", "Policy", "Recipe",
           "Rule", "Phase", "Schedule", "StepCounter", "GemmSite"]
