"""Numerics of one training step: what quantization did to every quantized GEMM operand.

For each operand (label ``"<module>:<role>:<operand>"``, see `fp4compile.ops.observe`) the first quantization
seen is measured against the high-precision tensor it was computed from:

- ``sqnr_db``: signal-to-quantization-noise ratio ``10 log10(sum(r^2) / sum((r - x_hat)^2))`` in dB, where
  ``x_hat`` is the dequantized operand and ``r`` the high-precision reference. For Hadamard operands (the NV
  recipe's weight-gradient GEMM) ``x_hat`` lives in the transformed domain, so the reference is
  ``random_hadamard_transform(x)``: the comparison is made in the transformed domain. ``None`` (JSON null)
  when there is no error at all (or no signal), or when the tensor held NaN/Inf.
- ``underflow_fraction``: fraction of blocks whose decode scale ``d_b`` underflowed to zero although the block
  held a non-zero value (its elements then dequantize to zero).
- ``saturated_fraction``: fraction of elements with ``|x * e_b| > 6`` before the clamp of docs/numerics.md section 2
  step 5 (``e_b`` the block encode multiplier); elements of underflowed blocks count too (``e_b`` is FLT_MAX).
- ``amax``: the tensor amax the quantizer used (after the Hadamard transform where there is one), and
  ``input_amax``, the amax of the high-precision input as given.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any, Iterable, Optional

import torch

from ..numerics.hadamard import random_hadamard_transform
from ..numerics.qtensor import QuantizedTensor, expand_block_scales
from ..numerics.rounding import FLT_MAX

__all__ = ["OperandNumerics", "operand_numerics", "NumericsRecorder", "parse_label", "numerics_to_json",
           "numerics_from_json"]

logger = logging.getLogger(__name__)

_E2M1_MAX = 6.0


def parse_label(label: str) -> tuple[str, str, str]:
    """Split ``"<module>:<role>:<operand>"`` into its three parts (the module path may be empty)."""
    parts = label.rsplit(":", 2)
    if len(parts) != 3:
        raise ValueError(f"operand label must look like '<module>:<role>:<operand>', got {label!r}")
    return parts[0], parts[1], parts[2]


@dataclasses.dataclass(frozen=True)
class OperandNumerics:
    """What quantization did to one operand in one step (see the module docstring for each field)."""

    label: str
    module: str
    role: str
    operand: str
    shape: tuple[int, ...]
    format: str
    block: tuple[int, int]
    hadamard: bool
    sqnr_db: Optional[float]
    underflow_fraction: float
    saturated_fraction: float
    amax: float
    input_amax: float
    blocks: int
    calls: int = 1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"], d["block"] = list(self.shape), list(self.block)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "OperandNumerics":
        fields = {f.name for f in dataclasses.fields(OperandNumerics)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"numerics entry has unknown keys {sorted(unknown)}; expected some of {sorted(fields)}")
        d = dict(d)
        d["shape"], d["block"] = tuple(d["shape"]), tuple(d["block"])
        return OperandNumerics(**d)


def _finite_or_none(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def operand_numerics(label: str, x: torch.Tensor, qt: QuantizedTensor) -> OperandNumerics:
    """Measure the quantization ``qt`` of the high-precision tensor ``x`` (the ``observe_quantization``
    signature), in float64 for the error sums."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"operand_numerics: x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"operand_numerics: qt must be a QuantizedTensor, got {type(qt).__name__}")
    if tuple(x.shape) != tuple(qt.shape):
        raise ValueError(f"operand_numerics: x has shape {tuple(x.shape)} but the quantized tensor {tuple(qt.shape)}")
    module, role, operand = parse_label(label)
    k = x.shape[-1]
    with torch.no_grad():
        ref = x.detach().reshape(-1, k).to(torch.float32)
        input_amax = float(ref.abs().max()) if ref.numel() else 0.0
        if qt.hadamard:
            ref = random_hadamard_transform(ref)
        rows = ref.shape[0]
        x_hat = qt.dequantize(torch.float32).reshape(rows, k)

        ref64, err64 = ref.double(), (ref.double() - x_hat.double())
        signal, noise = float((ref64 * ref64).sum()), float((err64 * err64).sum())
        if not (math.isfinite(signal) and math.isfinite(noise)) or signal == 0.0 or noise == 0.0:
            sqnr = None
        else:
            sqnr = 10.0 * math.log10(signal / noise)

        br, bc = qt.block
        d_block = qt.scale.to(torch.float32).reshape(rows // br, k // bc)
        block_amax = ref.abs().reshape(rows // br, br, k // bc, bc).amax(dim=(1, 3))
        underflow = int(((d_block == 0) & (block_amax > 0)).sum())
        blocks = d_block.numel()

        # e_b = min(1 / (d_b * D), FLT_MAX), exactly as the quantizer computes it (docs/numerics.md section 2 step 4).
        e_block = torch.clamp(torch.ones_like(d_block) / (d_block * qt.per_tensor_scale), max=FLT_MAX)
        scaled = ref * expand_block_scales(e_block, rows, k, qt.block)
        saturated = int((scaled.abs() > _E2M1_MAX).sum())
        amax = float(ref.abs().max()) if ref.numel() else 0.0

    numel = ref.numel()
    return OperandNumerics(
        label=label, module=module, role=role, operand=operand, shape=tuple(x.shape),
        format=qt.format.name or "fp4", block=tuple(qt.block), hadamard=bool(qt.hadamard),
        sqnr_db=_finite_or_none(sqnr) if sqnr is not None else None,
        underflow_fraction=underflow / blocks if blocks else 0.0,
        saturated_fraction=saturated / numel if numel else 0.0,
        amax=amax, input_amax=input_amax, blocks=blocks,
    )


class NumericsRecorder:
    """A quantization observer (`fp4compile.ops.observe.observe_quantization`) that measures the first
    quantization of every operand label and counts the later ones.

        recorder = NumericsRecorder()
        with observe_quantization(recorder):
            model(batch).backward()
        recorder.results  # {label: OperandNumerics}
    """

    def __init__(self) -> None:
        self.results: dict[str, OperandNumerics] = {}
        self._calls: dict[str, int] = {}

    def __call__(self, label: str, x: torch.Tensor, qt: QuantizedTensor) -> None:
        self._calls[label] = self._calls.get(label, 0) + 1
        if label in self.results:
            self.results[label] = dataclasses.replace(self.results[label], calls=self._calls[label])
            return
        try:
            self.results[label] = operand_numerics(label, x, qt)
        except Exception:  # an observer must never break the training step it watches
            logger.exception("fp4compile dump: could not measure the numerics of operand %r", label)


def numerics_to_json(results: Iterable[OperandNumerics]) -> str:
    """``numerics.json``: a list of `OperandNumerics` dictionaries, in the order the step quantized them."""
    return json.dumps([r.to_dict() for r in results], indent=1)


def numerics_from_json(text: str) -> list[OperandNumerics]:
    """Inverse of `numerics_to_json`."""
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"numerics.json must hold a list of operand entries, got {type(data).__name__}")
    return [OperandNumerics.from_dict(d) for d in data]
