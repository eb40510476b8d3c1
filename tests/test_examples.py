"""The examples run as a user runs them."""

import os
import subprocess
import sys

import pytest

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


def test_train_moe_tiny_runs_both_recipes_on_the_same_batches(tmp_path):
    pytest.importorskip("transformers")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_moe.py"), "--tiny", "--steps", "2",
                          "--eval-batches", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "val loss: high precision" in out.stdout and "expert GEMMs in NVFP4: 4 of 8" in out.stdout, out.stdout
    assert (tmp_path / "results.json").exists()
