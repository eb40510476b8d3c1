"""Every ``FP4COMPILE_*`` environment variable the library reads, in one place.

- ``FP4COMPILE_DUMP=<dir>``: write what the compiler decided (``precision_table.json`` and more) to ``<dir>``.
- ``FP4COMPILE_VERIFY=1``: run the graph verifier after every pass (the tests turn it on).
- ``FP4COMPILE_INNER=inductor|aot_eager|eager``: the compiler for everything that is not an FP4 GEMM.
"""

from __future__ import annotations

import os
from typing import Optional

__all__ = ["dump_dir", "verify_passes", "inner_compiler"]


def dump_dir() -> Optional[str]:
    return os.environ.get("FP4COMPILE_DUMP") or None


def verify_passes() -> bool:
    return os.environ.get("FP4COMPILE_VERIFY", "0").lower() in ("1", "true", "yes")


def inner_compiler() -> Optional[str]:
    return os.environ.get("FP4COMPILE_INNER") or None
