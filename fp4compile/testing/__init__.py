"""Testing aids: the eager module-swap reference the compiled backend is checked against."""

from .fake_quant import ReferenceFakeQuantLinear, swap_in_reference

__all__ = ["ReferenceFakeQuantLinear", "swap_in_reference"]
