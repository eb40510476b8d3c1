"""fp4compile across processes: FSDP2 (``fully_shard``) and DistributedDataParallel.

Stochastic-rounding keys per rank (`rank_key_salt`): every quantization draws its Philox key from torch's
generator, and ranks are usually seeded alike, so without more they would round with the same noise. The key
is XOR-ed with a constant derived from the process's global rank; rank 0, and any process without an
initialized process group, keeps the drawn key unchanged, so single-process runs are bit for bit what they
were. The rank is a Python int read when the op is traced, so the fold is one tensor op on the drawn key
(nothing reaches the host, and CUDA-graph capture still works).
"""

from __future__ import annotations

import logging

import torch

__all__ = ["process_rank", "rank_key_salt"]

logger = logging.getLogger(__name__)

# An odd constant (2^64 / golden ratio): multiplying by it is a bijection modulo any power of two, so distinct
# ranks get distinct salts; masked to the 62 bits that keys are drawn in, so a salted key stays in range.
_GOLDEN = 0x9E3779B97F4A7C15
_KEY_BITS = 62


def process_rank() -> int:
    """This process's global rank, or 0 when torch.distributed is unavailable or not initialized."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 0
    return torch.distributed.get_rank()


def rank_key_salt(rank: int | None = None) -> int:
    """The constant XOR-ed into every stochastic-rounding key on ``rank`` (default: this process's rank).

    0 for rank 0 (keys unchanged); distinct and in ``[0, 2**62)`` for every other rank, so a salted key is
    still a valid key and no two ranks of a run share one.
    """
    rank = process_rank() if rank is None else rank
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"rank must be an int >= 0, got {rank!r}")
    return (rank * _GOLDEN) & ((1 << _KEY_BITS) - 1)
