"""Every ``FP4COMPILE_*`` environment variable the library reads, in one place.

- ``FP4COMPILE_DUMP=<dir>``: write what the compiler decided (``precision_table.json`` and more) to ``<dir>``.
- ``FP4COMPILE_VERIFY=1``: run the graph verifier after every pass (the tests turn it on).
- ``FP4COMPILE_INNER=inductor|aot_eager|eager``: the compiler for everything that is not an FP4 GEMM.
- ``FP4COMPILE_GEMM_IN_GRAPH=1|0``: force the dense FP4 GEMM path to be written as graph ops (matmul, alpha,
  bias; Inductor fuses the epilogue) or as the ``fp4compile::gemm`` op; unset, the backend picks per GEMM
  (`fp4compile.passes.choose_gemm_paths`).
- ``FP4COMPILE_TRACED_GEMM=1|0``: force the traced device-TMA GEMM (path ``triton_traced``) available or not,
  whatever `fp4compile.codegen.gemm_device_tma.traced_gemm_available` finds; unset, it decides.
"""

from __future__ import annotations

import os
from typing import Optional

__all__ = ["dump_dir", "verify_passes", "inner_compiler", "gemm_in_graph", "traced_gemm"]


def dump_dir() -> Optional[str]:
    return os.environ.get("FP4COMPILE_DUMP") or None


def verify_passes() -> bool:
    return os.environ.get("FP4COMPILE_VERIFY", "0").lower() in ("1", "true", "yes")


def inner_compiler() -> Optional[str]:
    return os.environ.get("FP4COMPILE_INNER") or None


def _forced_bool(name: str) -> Optional[bool]:
    """A ``1``/``0`` environment switch as a forced choice, or None when unset (automatic)."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise ValueError(f"{name}: expected 1 or 0 (or unset), got {value!r}")


def gemm_in_graph() -> Optional[bool]:
    """``FP4COMPILE_GEMM_IN_GRAPH`` as a forced choice, or None when unset (automatic)."""
    return _forced_bool("FP4COMPILE_GEMM_IN_GRAPH")


def traced_gemm() -> Optional[bool]:
    """``FP4COMPILE_TRACED_GEMM`` as a forced choice, or None when unset (automatic)."""
    return _forced_bool("FP4COMPILE_TRACED_GEMM")
