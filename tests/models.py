"""Small models for the backend tests, built from the examples' definitions: a GPT (LayerNorm, causal
attention by SDPA or explicit matmuls, GELU MLP, residuals, tied head; nn.Linear or GPT-2's transposed Conv1D)
and a Llama-style stack (RMSNorm, SwiGLU, RoPE)."""

from __future__ import annotations

import os
import sys

import torch.nn as nn


sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import gpt as _gpt  # noqa: E402  (the examples' models: one definition for examples, tests and benchmarks)
import llama as _llama  # noqa: E402


def GPT(vocab=64, d=32, n_layer=4, n_head=2, block_size=32, explicit=False, conv1d=False) -> nn.Module:
    """The example GPT (examples/gpt.py) at test size."""
    return _gpt.GPT(_gpt.GPTConfig(vocab, block_size, n_layer, n_head, d, explicit, conv1d))


def Llama(vocab=64, d=32, n_layer=3, n_head=2, hidden=64) -> nn.Module:
    """The example Llama-style model (examples/llama.py) at test size."""
    return _llama.Llama(_llama.LlamaConfig(vocab, d, n_layer, n_head, hidden))


