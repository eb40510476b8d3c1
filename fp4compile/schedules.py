"""Schedules for policies that change with the training step (see `fp4compile.policy.schedule`)."""

from .policy.schedule import Phase, Schedule, StepCounter, late_switch, quantization_aware_finetuning

__all__ = ["Phase", "Schedule", "StepCounter", "late_switch", "quantization_aware_finetuning"]
