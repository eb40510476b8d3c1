"""What a policy decides: the precision of one GEMM in one role, operand by operand.

A linear layer ``y = x W^T`` runs three GEMMs in training (docs/numerics.md section 3.1), each with two operands:

============== ===================== ======================== =========================
role           GEMM                  lhs operand              rhs operand
============== ===================== ======================== =========================
``forward``    ``y = x W^T``         ``x`` along in-features  ``W`` along in-features
``input_grad`` ``dx = dy W``         ``dy`` along out-features ``W`` along out-features
``weight_grad````dW = dy^T x``       ``dy^T`` along tokens    ``x^T`` along tokens
============== ===================== ======================== =========================

Every operand is quantized along its GEMM's reduction axis. Precisions are frozen dataclasses with a compact
string form (`OperandPrecision.encode`), which is what the rewritten graph carries as op arguments.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Optional

from ..numerics.formats import Fp4Format, Rounding, resolve_format

__all__ = ["Role", "OperandPrecision", "GemmPrecision", "HIGH", "Decision", "LinearPrecision"]


class Role(str, enum.Enum):
    """The three GEMMs of a linear layer in training."""

    FORWARD = "forward"
    INPUT_GRAD = "input_grad"
    WEIGHT_GRAD = "weight_grad"


@dataclasses.dataclass(frozen=True)
class OperandPrecision:
    """How one GEMM operand is quantized: format, block shape, rounding and the random Hadamard transform."""

    format: Fp4Format
    block: tuple[int, int] = (1, 16)
    rounding: Rounding = Rounding.NEAREST
    hadamard: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", resolve_format(self.format))
        object.__setattr__(self, "rounding", Rounding(self.rounding))
        object.__setattr__(self, "block", tuple(self.block))
        rows, cols = self.block
        if cols != self.format.block_size or rows not in (1, cols):
            raise ValueError(
                f"OperandPrecision: block {self.block} does not fit format {self.format.name!r} "
                f"(block size {self.format.block_size}): use (1, {self.format.block_size}) or "
                f"({self.format.block_size}, {self.format.block_size})"
            )

    @property
    def is_2d(self) -> bool:
        return self.block[0] > 1

    def encode(self) -> str:
        """A compact, parseable string, e.g. ``nvfp4|16x16|nearest|-`` or ``nvfp4|1x16|stochastic|rht``."""
        return f"{self.format.name}|{self.block[0]}x{self.block[1]}|{self.rounding.value}|{'rht' if self.hadamard else '-'}"

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def decode(text: str) -> "OperandPrecision":
        """Inverse of `encode`."""
        try:
            fmt, block, rounding, hadamard = text.split("|")
            rows, cols = (int(v) for v in block.split("x"))
        except ValueError:
            raise ValueError(f"malformed operand precision {text!r}: expected 'format|RxC|rounding|rht-or--'") from None
        return OperandPrecision(resolve_format(fmt), (rows, cols), Rounding(rounding), hadamard == "rht")

    def __repr__(self) -> str:
        return f"OperandPrecision({self.encode()!r})"

    def describe(self) -> str:
        """Human-readable, for tables: ``nvfp4 16x16 RN`` or ``nvfp4 1x16 SR +RHT``."""
        rnd = "SR" if self.rounding is Rounding.STOCHASTIC else "RN"
        return f"{self.format.name} {self.block[0]}x{self.block[1]} {rnd}{' +RHT' if self.hadamard else ''}"


@dataclasses.dataclass(frozen=True)
class GemmPrecision:
    """The precision of one GEMM: both operands quantized, or high precision (``lhs`` and ``rhs`` None)."""

    lhs: Optional[OperandPrecision] = None
    rhs: Optional[OperandPrecision] = None

    def __post_init__(self) -> None:
        if (self.lhs is None) != (self.rhs is None):
            raise ValueError("GemmPrecision: quantize both operands or neither (mixed GEMMs are not supported)")
        if self.lhs is not None and self.lhs.format.block_size != self.rhs.format.block_size:
            raise ValueError("GemmPrecision: both operands need the same block size along the reduction axis")

    @property
    def is_high(self) -> bool:
        return self.lhs is None

    @property
    def precision(self) -> str:
        """``"nvfp4"``, ``"mxfp4"``, ``"fp4"`` (another FP4 variant) or ``"high"``."""
        return "high" if self.lhs is None else self.lhs.format.family

    def encode(self) -> str:
        return "high" if self.lhs is None else f"{self.lhs.encode()}*{self.rhs.encode()}"

    def __repr__(self) -> str:
        return f"GemmPrecision({self.encode()!r})"

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def decode(text: str) -> "GemmPrecision":
        if text == "high":
            return HIGH
        lhs, rhs = text.split("*")
        return GemmPrecision(OperandPrecision.decode(lhs), OperandPrecision.decode(rhs))


#: High precision: the GEMM runs in the model's own dtype, untouched.
HIGH = GemmPrecision()


@dataclasses.dataclass(frozen=True)
class Decision:
    """A policy's answer for one GEMM site and role, with the reason recorded in the precision table."""

    precision: GemmPrecision
    reason: str


@dataclasses.dataclass(frozen=True)
class LinearPrecision:
    """The three role precisions of one linear layer, as the rewritten graph carries them."""

    forward: GemmPrecision
    input_grad: GemmPrecision
    weight_grad: GemmPrecision

    def for_role(self, role: Role) -> GemmPrecision:
        return {Role.FORWARD: self.forward, Role.INPUT_GRAD: self.input_grad, Role.WEIGHT_GRAD: self.weight_grad}[role]

    def encode(self) -> str:
        """``forward=...;input_grad=...;weight_grad=...``: an FX-printable op argument."""
        return ";".join(f"{r.value}={self.for_role(r).encode()}" for r in Role)

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def decode(text: str) -> "LinearPrecision":
        parts = dict(item.split("=", 1) for item in text.split(";"))
        return LinearPrecision(*(GemmPrecision.decode(parts[r.value]) for r in Role))
