"""The dump across graphs and models: a no-grad evaluation graph has forward rows only, every table names the
graph, and a second compiled model of the process gets its own folder instead of overwriting the first's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

import fp4compile
from fp4compile.inspect.table import graph_label, rows_to_markdown

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 64))


def test_no_grad_graph_has_forward_rows_only():
    backend = fp4compile.Fp4Backend(inner="aot_eager")
    compiled = torch.compile(_mlp(), backend=backend)
    x = torch.randn(32, 64)
    compiled(x).sum().backward()
    with torch.no_grad():
        compiled(x)
    by_graph = {}
    for row in backend.rows():
        by_graph.setdefault((row.graph, row.training), []).append(row.role)
    assert by_graph == {("graph_0", True): ["forward", "input_grad", "weight_grad"] * 3,
                        ("graph_1", False): ["forward"] * 3}
    eval_row = next(r for r in backend.rows() if not r.training)
    assert graph_label(eval_row) == "graph_1 (no grad)" and graph_label(eval_row.to_dict()) == "graph_1 (no grad)"
    markdown = rows_to_markdown(backend.rows())
    assert markdown.startswith("| graph | module | role |") and "| graph_1 (no grad) | 0 | forward |" in markdown


_SCRIPT = textwrap.dedent(
    """
    import torch, fp4compile
    def mlp():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                   torch.nn.ReLU(), torch.nn.Linear(64, 64))
    x = torch.randn(32, 64)
    for policy in ("nvfp4", "high_precision"):
        compiled = torch.compile(mlp(), backend=fp4compile.backend(policy=policy, inner="aot_eager"))
        compiled(x).sum().backward()
        with torch.no_grad():
            compiled(x)
    """
)


def test_second_model_gets_its_own_folder_and_the_dump_says_where(tmp_path):
    script = tmp_path / "two_models.py"
    script.write_text(_SCRIPT)
    out = tmp_path / "dump"
    env = dict(os.environ, FP4COMPILE_DUMP=str(out), PYTHONPATH=REPO)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    second = out / "model_1_high_precision"
    first_rows = json.loads((out / "precision_table.json").read_text())
    second_rows = json.loads((second / "precision_table.json").read_text())
    assert {r["precision"] for r in first_rows} == {"nvfp4", "high"}  # the NV recipe's table, not overwritten
    assert {r["precision"] for r in second_rows} == {"high"}
    assert [r["role"] for r in first_rows if not r["training"]] == ["forward"] * 3
    assert json.loads((out / "dump.json").read_text())["models"] == ["model_1_high_precision"]
    assert (out / "report.html").is_file() and (second / "report.html").is_file()
    assert f"dump written to {out} (open {out / 'report.html'})" in run.stderr
    assert f"dump written to {second} " in run.stderr
    show = subprocess.run([sys.executable, "-m", "fp4compile.cli", "dump", "show", str(out)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert show.returncode == 0, show.stderr
    assert "graph_1 (no grad)" in show.stdout and str(second) in show.stdout
