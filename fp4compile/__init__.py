"""fp4compile: train PyTorch models with their matrix multiplications in 4-bit floating point (NVFP4).

``torch.compile(model, backend="fp4")`` captures the training step, assigns a precision to every GEMM and
role from a policy, rewrites the chosen GEMMs into quantized ops and hands the rest to Inductor.
"""

from . import monitor, recipes, schedules
from .capture import Fp4Backend, backend
from .export import export
from .inspect.dump import dump
from .inspect.sensitivity import SensitivityReport, sensitivity
from .numerics import (
    MXFP4,
    NVFP4,
    Fp4Format,
    QuantizedTensor,
    Rounding,
    ScaleFormat,
    quantize,
    quantize_dequantize,
)

from .policy import HIGH, Decision, GemmPrecision, GemmSite, OperandPrecision, Policy, Recipe, Role, Rule
from .policy.schedule import StepCounter

__version__ = "0.1.0"

__all__ = [
    "quantize",
    "quantize_dequantize",
    "QuantizedTensor",
    "Fp4Format",
    "ScaleFormat",
    "Rounding",
    "NVFP4",
    "MXFP4",
    "backend",
    "Fp4Backend",
    "dump",
    "export",
    "sensitivity",
    "SensitivityReport",
    "recipes",
    "schedules",
    "monitor",
    "StepCounter",
    "Policy",
    "Recipe",
    "Rule",
    "Role",
    "Decision",
    "GemmPrecision",
    "OperandPrecision",
    "GemmSite",
    "HIGH",
    "__version__",
]
