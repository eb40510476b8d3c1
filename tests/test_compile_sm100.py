"""The Triton kernels of the Blackwell route compiled for sm_100a on this machine, GPU or not.

No Blackwell GPU has run fp4compile (docs/benchmarks.md), and the GPU tests run on Hopper, where Triton lowers
``tl.dot`` and the TMA loads differently (wgmma; tcgen05 and tensor memory on sm_100). Triton compiles for a
target it is not running on, so a compile error in that route fails here. `tests/compile_for_target.py`
captures the launches from the project's own host wrappers (GPT-2-small shapes, the tiles and options a GPU
launch takes) and compiles each to PTX and cubin; nothing runs. What is not covered: ``torch._scaled_mm`` on
native FP4 (cuBLAS, picked first on compute capability 10.x; `fp4compile/codegen/gemm.py`), and whether the
kernels are right or fast there.

Skipped where this Triton cannot compile for sm_100a at all (a probe kernel fails: no NVIDIA backend, or a
compiler API this test does not know).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
ROUTE_KERNELS = {"_amax_kernel", "_quantize_kernel", "_dequantize_kernel", "_dense_tma_kernel"}


@pytest.fixture(scope="module")
def compiled_for_sm100():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # interpreter functions cannot compile
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is what the GPU runs
    proc = subprocess.run([sys.executable, os.path.join(HERE, "compile_for_target.py"), "100"], env=env,
                          capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, f"no result (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    probe, kernels = rows[0], rows[1:]
    if not probe["ok"]:
        pytest.skip(f"Triton {probe.get('triton')} cannot compile for sm_100a here: {probe['error'][:300]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return kernels


@pytest.mark.slow
def test_blackwell_route_kernels_compile_for_sm100a(compiled_for_sm100):
    failed = [r for r in compiled_for_sm100 if not r["ok"]]
    assert not failed, "\n\n".join(f"{r['kernel']} {r['constexprs']} {r['options']}:\n{r['trace']}" for r in failed)
    assert ROUTE_KERNELS <= {r["kernel"] for r in compiled_for_sm100}
    assert all(r["ptx_target"] and r["cubin_bytes"] > 0 for r in compiled_for_sm100)
