"""Stochastic rounding under CUDA-graph replay (needs a GPU): every replay draws fresh keys, and a seed repeats.

The keys are drawn on the device from torch's generator (`fp4compile/ops/linear.py`), which PyTorch advances
on every replay of a graph that captured a draw; a key drawn on the host or cached at capture would be frozen
into the graph, and every replay would round the same way. A statistical bound cannot see that (two replays
sharing a key look like one ordinary draw), so these tests compare exactly: different codes (or gradients made
from them) between two replays; identical ones after ``torch.manual_seed`` with the same seed.
"""

from __future__ import annotations

import pytest
import torch

import fp4compile
from helpers import batch
from models import GPT

pytestmark = pytest.mark.gpu


def _capture(fn):
    """``fn``'s outputs captured in a CUDA graph (warmed up on a side stream first, as CUDA graphs require)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


def test_quantize_in_a_cuda_graph_draws_a_fresh_key_per_replay():
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)

    def draw():
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device="cuda")  # as fp4_linear draws its keys
        return seed, fp4compile.quantize(x, rounding="stochastic", seed=seed).qdata

    graph, (seed, codes) = _capture(draw)

    def replays(n):
        out = []
        for _ in range(n):
            graph.replay()
            out.append((int(seed.item()), codes.clone()))
        return out

    torch.manual_seed(5)
    first = replays(2)
    torch.manual_seed(5)
    again = replays(2)
    (key_a, codes_a), (key_b, codes_b) = first
    assert key_a != key_b and not torch.equal(codes_a, codes_b), "two replays reused one key"
    assert [k for k, _ in again] == [key_a, key_b]
    assert all(torch.equal(c, c_again) for (_, c), (_, c_again) in zip(first, again))
    # The codes are those of the key the replay drew (the kernel reads it from device memory at replay).
    for key, c in first:
        expected = fp4compile.quantize(x, rounding="stochastic", seed=key, impl="reference").qdata
        assert torch.equal(c, expected)


def test_compiled_step_with_cuda_graphs_rounds_each_replay_afresh():
    """The NV recipe's backward rounds its gradients stochastically: the weight gradients of the FP4 block differ
    between two replayed steps on the same batch, and repeat exactly after reseeding. Explicit attention keeps
    the backward free of atomics (flash attention's backward accumulates dq with them), so equal keys give
    bit-equal gradients."""
    torch.manual_seed(0)
    model = GPT(vocab=64, d=64, n_layer=3, n_head=2, block_size=32, explicit=True).cuda()
    idx, tgt = (t.cuda() for t in batch(vocab=64, b=4, t=32))
    be = fp4compile.Fp4Backend(inner="inductor", cudagraphs=True)
    compiled = torch.compile(model, backend=be)
    fp4_weights = [(n, p) for n, p in model.named_parameters() if n.startswith("transformer.h.1.") and
                   n.endswith(".weight") and "ln_" not in n]
    assert len(fp4_weights) == 4

    def step():
        for p in model.parameters():
            p.grad = None
        compiled(idx, tgt).backward()
        return [p.grad.clone() for _, p in fp4_weights]  # before the next replay reuses the graph's memory

    for _ in range(3):  # cudagraph trees warm up, record, then replay
        step()
    assert any(r.precision == "nvfp4" and r.module.startswith("transformer.h.1.") for r in be.rows())
    torch.manual_seed(11)
    first = [step(), step()]
    torch.manual_seed(11)
    again = [step(), step()]
    for i, (name, _) in enumerate(fp4_weights):
        assert not torch.equal(first[0][i], first[1][i]), f"{name}: two replays rounded alike (one key reused)"
        assert torch.equal(first[0][i], again[0][i]) and torch.equal(first[1][i], again[1][i]), f"{name}: seed 11 did not repeat"
