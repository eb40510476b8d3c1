"""Import direction between fp4compile's layers: numerics -> policy -> passes -> ops/codegen -> capture -> inspect
(each may import the ones before it). Checked here for the top two: capture reaches inspect only through the
hooks inspect registers (`fp4compile.capture.compiler.DumpHooks`), and nothing below capture imports capture or
inspect. Imports inside functions count too (a lazy import is still a dependency).

Not checked (known upward imports, lazy, one call each): `fp4compile.numerics.api` dispatching
``quantize(impl="triton")`` to codegen, and the passes `choose_gemm_paths` (the machine's GEMM paths, from
codegen) and `rewrite`/`verify` (the ``fp4_linear`` op they write into the graph, from ops).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "fp4compile"
BELOW_CAPTURE = ("numerics", "policy", "passes", "ops", "codegen")


def _imported_packages(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, first package under fp4compile) of every fp4compile import in ``path``, relative or absolute."""
    package = path.relative_to(ROOT).parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = list(package[: len(package) - (node.level - 1)]) if node.level > 1 else list(package)
                parts += node.module.split(".") if node.module else [node.names[0].name]
            elif node.module and node.module.split(".")[0] == "fp4compile":
                parts = node.module.split(".")[1:]
            else:
                continue
            if node.level and node.level - 1 > len(package):
                continue
            if parts:
                found.append((node.lineno, parts[0]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[1]) for a in node.names
                      if a.name.startswith("fp4compile.")]
    return found


def _violations(layer: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(ROOT.parent)}:{line} imports fp4compile.{pkg}"
            for path in sorted((ROOT / layer).rglob("*.py"))
            for line, pkg in _imported_packages(path) if pkg in forbidden]


def test_capture_imports_nothing_from_inspect():
    assert not _violations("capture", ("inspect",))


@pytest.mark.parametrize("layer", BELOW_CAPTURE)
def test_layers_below_capture_import_neither_capture_nor_inspect(layer):
    assert not _violations(layer, ("capture", "inspect"))


def test_the_check_sees_relative_and_absolute_imports(tmp_path, monkeypatch):
    """The parser finds what the checks above forbid (so they can fail)."""
    module = ROOT / "capture" / "compiler.py"
    found = dict((pkg, line) for line, pkg in _imported_packages(module))
    assert "passes" in found and "policy" in found  # ``from ..passes.pipeline import ...``
    fake_root = tmp_path / "fp4compile"
    (fake_root / "capture").mkdir(parents=True)
    fake = fake_root / "capture" / "x.py"
    fake.write_text("from ..inspect.dump import dump\nimport fp4compile.inspect.table\n"
                    "def f():\n    from ..inspect import report\n")
    monkeypatch.setitem(globals(), "ROOT", fake_root)
    assert [pkg for _, pkg in _imported_packages(fake)] == ["inspect", "inspect", "inspect"]
    assert len(_violations("capture", ("inspect",))) == 3


def test_dump_hooks_are_installed_by_inspect():
    import fp4compile  # noqa: F401  (imports fp4compile.inspect.dump, which registers them)
    from fp4compile.capture.compiler import DUMP_HOOKS
    from fp4compile.inspect.dump import dump_folder, on_backend_dump

    assert DUMP_HOOKS.folder is dump_folder and DUMP_HOOKS.after_write is on_backend_dump
