"""GPU timing shared by the benchmark scripts: medians of `triton.testing.do_bench`, and CUDA-graph replays."""

from __future__ import annotations

import itertools

import torch
from triton.testing import do_bench


def median_ms(fn, rotate: int = 1, rep: int = 200) -> float:
    """Median time of one call of ``fn(i)``, i cycling over ``rotate`` input sets (host work included)."""
    counter = itertools.count()
    return do_bench(lambda: fn(next(counter) % rotate), warmup=max(10, rep // 8), rep=rep, return_mode="median")


def graph_ms(fn, rotate: int, rep: int = 200) -> float:
    """GPU time of one call: ``fn(0) .. fn(rotate - 1)`` captured in one CUDA graph and its replays timed, so that
    host work between launches (Python, allocations) does not count (the training step replays graphs too);
    rotating the inputs keeps L2 from holding the next call's working set."""
    for i in range(rotate):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(rotate):
            fn(i)
    return median_ms(lambda i: graph.replay(), rep=rep) / rotate
