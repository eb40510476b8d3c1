"""A scoped hook that sees every quantization the ops perform: how ``fp4compile dump`` measures numerics.

    with observe_quantization(lambda label, x, qt: ...):
        loss = compiled_model(batch); loss.backward()

``label`` is ``"<module>:<role>:<operand>"`` (operand ``lhs`` or ``rhs``), ``x`` the high-precision input and
``qt`` the `QuantizedTensor`. Outside the ``with`` block nothing is called (one context-variable read per op).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Optional

import torch

from ..numerics.qtensor import QuantizedTensor

__all__ = ["QuantizationObserver", "observe_quantization", "current_observer"]

QuantizationObserver = Callable[[str, torch.Tensor, QuantizedTensor], None]

_OBSERVER: contextvars.ContextVar[Optional[QuantizationObserver]] = contextvars.ContextVar(
    "fp4compile_quantization_observer", default=None
)


def current_observer() -> Optional[QuantizationObserver]:
    return _OBSERVER.get()


@contextlib.contextmanager
def observe_quantization(observer: QuantizationObserver) -> Iterator[None]:
    token = _OBSERVER.set(observer)
    try:
        yield
    finally:
        _OBSERVER.reset(token)
