"""Exact FP4 numerics: formats, the reference quantizer and the quantized tensor (spec: docs/numerics.md)."""

from .api import quantize, quantize_dequantize
from .formats import (
    E2M1_VALUES,
    MXFP4,
    NVFP4,
    SCALE_FORMATS,
    Fp4Format,
    Rounding,
    ScaleFormat,
    ScaleRounding,
    resolve_format,
)
from .hadamard import RHT_SIGNS, random_hadamard_transform
from .qtensor import QuantizedTensor

__all__ = [
    "quantize",
    "quantize_dequantize",
    "QuantizedTensor",
    "Fp4Format",
    "ScaleFormat",
    "ScaleRounding",
    "Rounding",
    "NVFP4",
    "MXFP4",
    "E2M1_VALUES",
    "SCALE_FORMATS",
    "resolve_format",
    "RHT_SIGNS",
    "random_hadamard_transform",
]
