import os

os.environ.setdefault("FP4COMPILE_VERIFY", "1")  # the graph verifier runs after every pass in tests

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "slow: a full Inductor compile or a long run")


def pytest_collection_modifyitems(config, items):
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
