"""Runtime ops of rewritten graphs: ``fp4compile::quantize``, ``fp4compile::gemm`` and `fp4_linear`."""

from .library import gemm_operands, quantize_operand, to_quantized_tensor
from .linear import Fp4LinearFunction, fp4_linear

__all__ = ["quantize_operand", "gemm_operands", "to_quantized_tensor", "fp4_linear", "Fp4LinearFunction"]
