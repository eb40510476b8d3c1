"""How a user names a recipe and what a wrong option says: ``options={"policy": "nvfp4"}``, `recipes.from_name`."""

from __future__ import annotations

import logging

import pytest
import torch

import fp4compile
from fp4compile import recipes


@pytest.mark.parametrize("name", recipes.RECIPE_NAMES)
def test_from_name_builds_the_named_recipe(name):
    assert recipes.from_name(name) == getattr(recipes, name)()


def test_from_name_passes_arguments_and_accepts_dashes():
    assert recipes.from_name("nvfp4", high_precision=["*.attn.*"]) == recipes.nvfp4(high_precision=["*.attn.*"])
    assert recipes.from_name("FP4-all-the-way") == recipes.fp4_all_the_way()


def test_unknown_recipe_name_names_the_module_and_the_valid_names():
    valid = "nvfp4, fp4_all_the_way, mxfp4, high_precision"
    with pytest.raises(ValueError, match=rf"'nvfp5'.*fp4compile\.recipes has {valid}"):
        recipes.from_name("nvfp5")


def test_backend_takes_a_recipe_name_and_is_the_same_backend_as_the_recipe():
    assert fp4compile.backend(policy="fp4_all_the_way") is fp4compile.backend(policy=recipes.fp4_all_the_way())
    assert fp4compile.backend(policy="nvfp4").policy == recipes.nvfp4()


def test_backend_rejects_a_bad_policy_when_it_is_built():
    with pytest.raises(ValueError, match="fp4compile.recipes"):
        fp4compile.backend(policy="nvfp5")
    with pytest.raises(TypeError, match=r"fp4compile\.recipes.*got int"):
        fp4compile.backend(policy=3)


def test_torch_compile_options_take_a_recipe_name():
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32))
    compiled = torch.compile(model, backend="fp4", options={"policy": "fp4_all_the_way", "inner": "aot_eager"})
    x = torch.randn(16, 32)
    compiled(x).sum().backward()
    backend = fp4compile.backend(policy=recipes.fp4_all_the_way(), inner="aot_eager")
    assert {r.precision for r in backend.rows()} != {"high"}  # the named recipe ran, and quantized something


def test_bad_option_is_logged_before_dynamo_wraps_it(caplog):
    model = torch.nn.Linear(32, 32)
    compiled = torch.compile(model, backend="fp4", options={"policy": "nvfp5"})
    with caplog.at_level(logging.ERROR, logger="fp4compile.capture.compiler"):
        with pytest.raises(Exception, match="fp4compile.recipes has nvfp4"):
            compiled(torch.randn(4, 32))
    assert any("unknown recipe name 'nvfp5'" in r.getMessage() for r in caplog.records)
