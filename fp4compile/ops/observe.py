"""Hooks that see every quantization the ops perform: how ``fp4compile dump`` and the gradient-noise monitor
measure numerics.

    with observe_quantization(lambda label, x, qt: ...):        # scoped to this thread and context
        loss = compiled_model(batch); loss.backward()

    set_process_observer(observer)                               # everywhere, until set back to None

``label`` is ``"<module>:<role>:<operand>"`` (operand ``lhs`` or ``rhs``), ``x`` the high-precision input and
``qt`` the `QuantizedTensor`. A scoped observer wins over the process-wide one. The process-wide one exists
because a context variable reaches neither the context Dynamo compiles in nor autograd's backward threads on
GPU. With no observer, an op pays one context-variable read. Ops captured in a CUDA graph run no Python on
replay, so observers see only the eager and recording calls. On CUDA, a graph traced while no observer is
installed quantizes with traced kernels that call no Python (`fp4compile.ops.triton_ops`): install the
observer before the first compiled call (as ``fp4compile.dump`` and the gradient-noise monitor's ``with``
block do when they wrap it) for its quantizations to be seen.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Optional

import torch

from ..numerics.qtensor import QuantizedTensor

__all__ = ["QuantizationObserver", "observe_quantization", "current_observer", "set_process_observer"]

QuantizationObserver = Callable[[str, torch.Tensor, QuantizedTensor], None]

_OBSERVER: contextvars.ContextVar[Optional[QuantizationObserver]] = contextvars.ContextVar(
    "fp4compile_quantization_observer", default=None
)


# The one process-wide hook (like the backend's registry, deliberately global: see the module docstring).
_PROCESS_OBSERVER: list[Optional[QuantizationObserver]] = [None]


def set_process_observer(observer: Optional[QuantizationObserver]) -> Optional[QuantizationObserver]:
    """Install ``observer`` for every quantization in the process (None removes it); returns the previous."""
    previous = _PROCESS_OBSERVER[0]
    _PROCESS_OBSERVER[0] = observer
    return previous


def current_observer() -> Optional[QuantizationObserver]:
    """The scoped observer if one is active, else the process-wide one, else None."""
    return _OBSERVER.get() or _PROCESS_OBSERVER[0]


@contextlib.contextmanager
def observe_quantization(observer: QuantizationObserver) -> Iterator[None]:
    token = _OBSERVER.set(observer)
    try:
        yield
    finally:
        _OBSERVER.reset(token)
