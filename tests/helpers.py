"""Shared helpers for backend tests."""

from __future__ import annotations

import copy

import pytest
import torch

import fp4compile
from fp4compile.policy.precision import LinearPrecision
from fp4compile.testing import swap_in_reference


def batch(vocab=64, b=2, t=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, vocab, (b, t), generator=g)


def compiled_step(model, inputs, policy=None, inner="eager", seed=1, **kwargs):
    """One compiled forward+backward; returns (loss, {name: grad}, backend)."""
    be = fp4compile.Fp4Backend(policy=policy, inner=inner, verify=True, **kwargs)
    cm = torch.compile(model, backend=be)
    torch.manual_seed(seed)
    loss = cm(*inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, be


def reference_step(model, inputs, precisions: dict[str, LinearPrecision], seed=1):
    ref = swap_in_reference(copy.deepcopy(model), precisions)
    torch.manual_seed(seed)
    loss = ref(*inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in ref.named_parameters()}


def skip_module_unless_kernels_run(kernel) -> None:
    """Skip the calling test module where the Triton kernel ``kernel`` cannot run: without CUDA it must be an
    interpreter function (tests/conftest.py sets ``TRITON_INTERPRET=1`` before Triton is first imported)."""
    import triton

    if not torch.cuda.is_available() and not isinstance(kernel, triton.runtime.interpreter.InterpretedFunction):
        pytest.skip(f"{kernel} is not an interpreter function: TRITON_INTERPRET=1 was set after Triton was imported",
                    allow_module_level=True)
