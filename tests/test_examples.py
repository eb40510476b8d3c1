"""The examples run as a user runs them."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_custom_policy_example_prints_its_decisions():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "custom_policy.py")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "custom: MLP forward in NVFP4" in out.stdout and "custom: only MLP linears are quantized" in out.stdout


def test_quantize_tour_runs():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quantize_tour.py")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "nvfp4 1x16 nearest" in out.stdout
