"""The examples' loss plots, on synthetic curves: they show the data whatever the loss level, and the main
example shows validation loss and the gap to the high-precision twin."""

from __future__ import annotations

import math
import os
import sys
from types import SimpleNamespace

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import convergence  # noqa: E402
import train_gpt  # noqa: E402
from gpt import GPTConfig  # noqa: E402

CFG = GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=64)


def _curve(start: float, end: float, steps: int) -> list[float]:
    return [end + (start - end) * math.exp(-i / (steps / 8)) for i in range(steps)]


@pytest.mark.parametrize("level", [0.9, 4.5])  # 4.5: every loss above 3 (a short or small run)
def test_convergence_plot_shows_the_curves_at_any_loss_level(tmp_path, monkeypatch, level):
    captured = []
    monkeypatch.setattr(plt, "close", captured.append)  # keep the figure to look at its axes
    results = {"high_precision": {"curve": _curve(level + 3, level, 300)},
               "nvfp4": {"curve": _curve(level + 3, level * 1.01, 300)}}
    path = tmp_path / "c.png"
    convergence.plot_curves(results, 300, CFG, str(path), plt)
    (ax,) = captured[0].axes
    low, high = ax.get_ylim()
    assert path.is_file() and low < level < level * 1.01 < high < level + 3
    assert ax.get_title()


def test_main_example_plot_has_validation_loss_and_gap_panels(tmp_path, monkeypatch):
    captured = []
    monkeypatch.setattr(plt, "close", captured.append)
    curves = {"fp4": _curve(5.5, 2.52, 150), "high": _curve(5.5, 2.50, 150)}
    val_curves = {"fp4": [(s, 2.6 + 1 / s) for s in (15, 75, 150)], "high": [(s, 2.5 + 1 / s) for s in (15, 75, 150)]}
    args = SimpleNamespace(recipe="nvfp4", steps=150, batch_size=16, block_size=64)
    path = tmp_path / "loss.png"
    train_gpt.plot_losses(curves, val_curves, args, CFG, str(path), plt)
    fig = captured[0]
    loss_ax, gap_ax = fig.axes
    assert path.is_file() and fig._suptitle is not None and "150 steps" in fig._suptitle.get_text()
    assert "validation" in loss_ax.get_title() and "fp4 (nvfp4): val 2.6067" in loss_ax.get_legend_handles_labels()[1]
    (gap_line,) = [line for line in gap_ax.get_lines() if len(line.get_xdata()) == 3]
    assert list(gap_line.get_xdata()) == [15, 75, 150]
    assert gap_line.get_ydata()[-1] == pytest.approx(100 * (2.6 + 1 / 150) / (2.5 + 1 / 150) - 100)
    assert "+3.99% at the end" in gap_ax.get_title()
