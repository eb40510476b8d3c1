"""FATW's gradient-noise monitor (docs/numerics.md section 4): is quantized training still helping this layer?

FATW's criterion: quantized training stops helping once the gradient norm falls below about sqrt(3) times the
quantization noise of the gradient. The monitor measures, for every quantized layer, the ratio

    ||g|| / ||Q(g) - g||

of each gradient operand ``g`` of the backward GEMMs (``dy`` of the input gradient, ``dy^T`` of the weight
gradient; after the Hadamard transform where the recipe applies it, so Q's error is measured where it is
made) every ``every`` steps, logs it, and keeps the history. With `noise_adaptive_schedule` a layer whose ratio
falls below the threshold gets both backward GEMMs in high precision from then on (each new set of such
layers compiles once).

    counter = fp4compile.StepCounter()
    monitor = GradientNoiseMonitor(counter, every=100)
    policy = recipes.fp4_all_the_way(schedule=noise_adaptive_schedule(monitor))   # or no schedule: only report
    model = torch.compile(model, backend=fp4compile.backend(policy=policy, step_counter=counter))
    with monitor:                                      # installs it as the process-wide quantization observer
        for batch in data: ...; counter.advance()

Overhead: off measuring steps one comparison per quantization. Under CUDA graphs the ops run no Python on
replay, so measure without ``cudagraphs=True``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional

import torch

from .numerics.hadamard import random_hadamard_transform
from .numerics.qtensor import QuantizedTensor
from .ops.observe import set_process_observer
from .policy.precision import Role
from .policy.schedule import FP4_PHASE, Phase, PhaseSource, StepCounter

__all__ = ["GradientNoiseMonitor", "NoiseMeasurement", "noise_adaptive_schedule", "NoiseAdaptiveSchedule",
           "gradient_noise_ratio"]

logger = logging.getLogger(__name__)

#: FATW's threshold: sqrt(3) times the standard deviation is the half-step of uniform rounding noise.
FATW_THRESHOLD = math.sqrt(3.0)
_GRADIENT_OPERANDS = {("input_grad", "lhs"), ("weight_grad", "lhs")}


def gradient_noise_ratio(g: torch.Tensor, qt: QuantizedTensor) -> float:
    """``||g|| / ||Q(g) - g||`` in float64, with ``g`` taken into the Hadamard domain when ``qt`` is there."""
    g32 = g.reshape(qt.shape).to(torch.float32)
    if qt.hadamard:
        g32 = random_hadamard_transform(g32)
    g64 = g32.to(torch.float64)
    error = (qt.dequantize(torch.float32).to(torch.float64) - g64).norm()
    return float(g64.norm() / error) if error > 0 else math.inf


@dataclasses.dataclass(frozen=True)
class NoiseMeasurement:
    step: int
    module: str
    role: str
    ratio: float


class GradientNoiseMonitor:
    """Measures `gradient_noise_ratio` per layer every ``every`` steps of ``counter`` (see the module docstring).

    A module is *flagged* (sticky) once any of its gradient operands measures a ratio below ``threshold``.
    """

    def __init__(self, counter: StepCounter, every: int = 100, threshold: float = FATW_THRESHOLD) -> None:
        if every < 1:
            raise ValueError(f"GradientNoiseMonitor: every must be >= 1, got {every}")
        self.counter, self.every, self.threshold = counter, int(every), float(threshold)
        self.history: list[NoiseMeasurement] = []
        self.flagged: set[str] = set()
        self._previous = None

    def measuring(self) -> bool:
        return self.counter.step % self.every == 0

    def __call__(self, label: str, x: torch.Tensor, qt: QuantizedTensor) -> None:
        if not self.measuring():
            return
        module, role, operand = label.rsplit(":", 2) if label.count(":") >= 2 else (label, "", "")
        if (role, operand) not in _GRADIENT_OPERANDS:
            return
        ratio = gradient_noise_ratio(x, qt)
        self.history.append(NoiseMeasurement(self.counter.step, module, role, ratio))
        logger.info("gradient noise: step %d %s %s ||g||/||Q(g)-g|| = %.3f", self.counter.step, module, role, ratio)
        if ratio < self.threshold and module not in self.flagged:
            self.flagged.add(module)
            logger.warning("gradient noise: %s %s ratio %.3f < %.3f at step %d", module, role, ratio,
                           self.threshold, self.counter.step)

    def latest(self) -> dict[tuple[str, str], float]:
        """The most recent ratio per (module, role)."""
        return {(m.module, m.role): m.ratio for m in self.history}

    def __enter__(self) -> "GradientNoiseMonitor":
        self._previous = set_process_observer(self)
        return self

    def __exit__(self, *exc) -> None:
        set_process_observer(self._previous)


@dataclasses.dataclass(frozen=True)
class NoiseAdaptiveSchedule:
    """A schedule whose phase keeps the backward GEMMs of the monitor's flagged modules in high precision,
    on top of an optional ``base`` schedule."""

    monitor: GradientNoiseMonitor
    base: Optional[PhaseSource] = None

    def phase_at(self, step: int) -> Phase:
        phase = self.base.phase_at(step) if self.base is not None else FP4_PHASE
        if not self.monitor.flagged:
            return phase
        sites = frozenset((m, r) for m in self.monitor.flagged for r in (Role.INPUT_GRAD, Role.WEIGHT_GRAD))
        name = f"{phase.name}+noise[{len(self.monitor.flagged)}]"
        return dataclasses.replace(phase, name=name, high_precision_sites=phase.high_precision_sites | sites)


def noise_adaptive_schedule(monitor: GradientNoiseMonitor, base: Optional[PhaseSource] = None) -> NoiseAdaptiveSchedule:
    """The policy option of FATW: switch a layer's backward to high precision when its gradient-noise ratio
    falls below the monitor's threshold."""
    return NoiseAdaptiveSchedule(monitor, base)
