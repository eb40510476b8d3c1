import os

os.environ.setdefault("FP4COMPILE_VERIFY", "1")  # the graph verifier runs after every pass in tests

import sys

import pytest
import torch

# Without CUDA the Triton kernels are tested under Triton's interpreter. TRITON_INTERPRET must be set before
# Triton is first imported: triton.language's own helpers (tl.zeros and the rest) are made interpreter or
# compiled functions at import, and `import fp4compile` imports Triton (through torch.library.triton_op), so a
# test module imported before the kernel tests would otherwise leave them compiled ones the interpreter cannot
# call.
if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("tests/conftest.py: Triton was imported before TRITON_INTERPRET=1 could be set")
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "slow: a full Inductor compile or a long run")


def pytest_collection_modifyitems(config, items):
    if config.getoption("markexpr", "") == "gpu":
        # Asked for the GPU tests alone (docs/testing.md): without a GPU (or without Triton, when the tests would
        # compare the reference with itself) that is an error, not a run of skips that reads as a pass.
        from fp4compile.codegen import triton_available

        if not triton_available():
            raise pytest.UsageError(
                f"pytest -m gpu needs a CUDA device and Triton: torch {torch.__version__}, "
                f"torch.cuda.is_available() = {torch.cuda.is_available()}"
            )
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_fresh_dynamo():
    """Each test starts from seed 0 with Dynamo's caches empty (compiled frames are cached per code object,
    so tests compiling the same model class would otherwise share and exhaust the recompile limit)."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield
