"""Parameters stay static inputs through the rewrite: AOTAutograd tells them from activations by attributes Dynamo
puts on its graph module and placeholders, and CUDA graphs copy every non-static input into a static buffer on
each replay (before this was kept, all 149 parameters of GPT-2 small were copied every step)."""

from __future__ import annotations

import pytest
import torch

from helpers import batch
from models import GPT


class _Stop(Exception):
    pass


def test_parameters_reach_inductor_as_static_inputs(monkeypatch):
    import torch._inductor.compile_fx as compile_fx

    seen = []

    def spy(gm, inputs, **kwargs):  # stands in for Inductor's compile: record what it would be told, stop
        seen.append((len(inputs), sorted(kwargs.get("static_input_idxs") or [])))
        raise _Stop()

    monkeypatch.setattr(compile_fx, "compile_fx_inner", spy)
    torch._dynamo.reset()
    model = GPT(n_layer=3)
    compiled = torch.compile(model, backend="fp4", options={"inner": "inductor"})
    with pytest.raises(Exception, match="_Stop"):
        compiled(*batch())
    torch._dynamo.reset()
    n_params = len(list(model.parameters()))
    (n_inputs, static), = seen
    # The forward's inputs: the parameters and the two token tensors; every parameter is static.
    assert n_inputs == n_params + 2
    assert len(static) == n_params, static
