"""Producing a dump: what the compiler did to one training step, written to a folder.

Three ways in:

- ``fp4compile.dump(model, *example_inputs, out=dir, **example_kwargs)`` compiles ``model`` with the fp4 backend, runs
  one
  training step (forward, then backward from the output, or from its sum if it is not a scalar) and writes
  everything below, the ONNX model included;
- ``FP4COMPILE_DUMP=dir python train.py`` around any script: the backend writes the tables and the code at
  each compilation; a process-wide quantization observer measures the first quantization of every operand
  (the first training step), and ``numerics.json``, the backward graphs and ``report.html`` are (re)written
  when the process exits. No ONNX model on this path (the backend does not keep the graphs it compiled);
- ``fp4compile dump run script.py [args...] --out dir`` runs a script the second way.

When several backends of one process dump to the same folder (two compiled models, e.g. a model and its
high-precision twin), the first writes the folder itself and each later one a subfolder
``model_<k>_<policy name>/`` of the same layout, listed in the folder's ``dump.json`` under ``models``.

The folder (docs/dump.md shows it with screenshots)::

    precision_table.json / .md        one row per GEMM site and role (every graph, latest schedule phase)
    numerics.json                     one entry per quantized operand label (fp4compile.inspect.numerics)
    report.html                       self-contained: table, SQNR by layer index, graph drawings
    model.onnx                        the rewritten forward graph (fp4compile.dump only; model_graph_<i>.onnx
                                      per graph when Dynamo made several)
    dump.json                         what produced the dump: versions, policy, inner compiler, files
    graph_<i>/<phase>/pass_<j>_<name>.py    the graph before the passes (input) and after the rewrite
    graph_<i>/<phase>/aot_forward.py / aot_backward.py / aot_inference.py   AOTAutograd's graphs
    graph_<i>/<phase>/precision_table.json  that graph's rows
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import weakref
from typing import Any, Optional

import torch

from ..capture.compiler import Fp4Backend, set_dump_hooks
from ..ops.observe import observe_quantization, set_process_observer
from ..passes.pipeline import run_passes
from ..policy.recipe import Policy
from ..policy.schedule import FP4_PHASE
from .layout import MANIFEST, NUMERICS, ONNX_MODEL
from .numerics import NumericsRecorder, OperandNumerics, numerics_to_json
from .report import write_report
from .table import TableRow

__all__ = ["dump", "DumpResult", "on_backend_dump", "dump_folder"]

logger = logging.getLogger(__name__)

# Backends created by `dump`: the hook in Fp4Backend._write_dump leaves them alone (dump writes the rest).
_API_BACKENDS: "weakref.WeakSet[Fp4Backend]" = weakref.WeakSet()


@dataclasses.dataclass
class DumpResult:
    """What `dump` wrote and measured.

    Attributes:
        out: the dump folder.
        rows: the precision table (`Fp4Backend.rows` of the backend that compiled the step).
        numerics: one entry per quantized operand, in the order of the step.
        output: the step's output (detached).
        onnx: paths of the ONNX models written.
        onnx_error: why no ONNX model was written, if none was.
        backend: the `Fp4Backend` that compiled the step.
    """

    out: str
    rows: list[TableRow]
    numerics: list[OperandNumerics]
    output: Any
    onnx: list[str]
    onnx_error: Optional[str]
    backend: Fp4Backend


class _CapturingBackend:
    """Delegates to an `Fp4Backend` and keeps each Dynamo graph with its example inputs (for ONNX)."""

    __name__ = "fp4_dump"

    def __init__(self, backend: Fp4Backend) -> None:
        self.backend = backend
        self.graphs: list[tuple[torch.fx.GraphModule, list]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, **kwargs):
        self.graphs.append((gm, list(example_inputs)))
        return self.backend(gm, example_inputs, **kwargs)


def _backprop_target(output: Any) -> Optional[torch.Tensor]:
    """The scalar to call backward on: the output, its sum if it is not a scalar; the first tensor of a
    tuple/list, or ``output["loss"]`` of a mapping."""
    if isinstance(output, torch.Tensor):
        tensor = output
    elif isinstance(output, dict) and isinstance(output.get("loss"), torch.Tensor):
        tensor = output["loss"]
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        tensor = output[0]
    else:
        raise TypeError(f"fp4compile.dump: the model must return a tensor, a tuple/list starting with one, or a "
                        f"mapping with a 'loss' tensor; got {type(output).__name__}")
    if not tensor.requires_grad:
        return None
    return tensor if tensor.dim() == 0 else tensor.sum()


def _detach(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, (tuple, list)):
        return type(output)(_detach(o) for o in output)
    if isinstance(output, dict):
        return {k: _detach(v) for k, v in output.items()}
    return output


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _export_graphs(backend: Fp4Backend, graphs: list, out: str) -> tuple[list[str], Optional[str]]:
    """Export every captured forward graph to ONNX; returns the paths and the first error, if any."""
    try:
        from .onnx_export import export_onnx
    except ImportError as exc:  # pragma: no cover - onnx is a dependency; onnxscript a dev one
        return [], f"ONNX export unavailable: {exc}"
    schedule = backend.schedule
    phase = schedule.phase_at(backend.step_counter.step) if schedule is not None else FP4_PHASE
    paths, error = [], None
    for i, (gm, example_inputs) in enumerate(graphs):
        name = ONNX_MODEL if len(graphs) == 1 else f"model_graph_{i}.onnx"
        try:
            rewritten = run_passes(gm, example_inputs, backend.policy, phase).graph_module
            export_onnx(rewritten, example_inputs, os.path.join(out, name))
            paths.append(os.path.join(out, name))
        except Exception as exc:  # the dump stays useful without the ONNX model
            error = error or f"graph_{i}: {type(exc).__name__}: {exc}"
            logger.warning("fp4compile dump: no ONNX model for graph_%d: %s", i, exc)
    return paths, error


def _manifest(source: str, backend: Optional[Fp4Backend], files: dict[str, Any]) -> str:
    from .. import __version__

    info = {
        "source": source,
        "fp4compile_version": __version__,
        "torch_version": torch.__version__,
        "policy": repr(backend.policy) if backend is not None else None,
        "inner": backend.inner if backend is not None else None,
        "graphs": sorted({f"{r.graph}/{r.phase}" for r in backend.reports}) if backend is not None else [],
        **files,
    }
    return json.dumps(info, indent=1)


def dump(model: torch.nn.Module, *example_inputs: Any, out: "str | os.PathLike", policy: Optional[Policy] = None,
         inner: Optional[str] = None, onnx: bool = True, **example_kwargs: Any) -> DumpResult:
    """Compile ``model`` with the fp4 backend, run one training step on ``model(*example_inputs,
    **example_kwargs)`` and write a dump.

    The step is the forward, then backward from the output (from its sum if it is not a scalar; from the first
    element of a tuple, or ``output["loss"]``); an output that does not require grad is dumped forward only.
    The parameters' ``.grad`` are restored afterwards; the step draws stochastic-rounding seeds from torch's
    generator, so the RNG advances.

    Args:
        model: the module (or function) to compile; it is not modified.
        example_inputs: its positional inputs.
        example_kwargs: its keyword inputs (``input_ids=..., labels=...`` for a Hugging Face model); the names
            ``out``, ``policy``, ``inner`` and ``onnx`` are this function's own.
        out: the dump folder (created; files in it are overwritten).
        policy: as for `fp4compile.backend` (default: the NV recipe).
        inner: the inner compiler, ``"inductor"``, ``"aot_eager"`` or ``"eager"`` (default: the backend's).
        onnx: export the rewritten forward graph to ``model.onnx``.

    Returns:
        A `DumpResult`.
    """
    if not callable(model):
        raise TypeError(f"fp4compile.dump: model must be a torch.nn.Module or a callable, got {type(model).__name__}")
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"fp4compile.dump: out must be a folder path (str or os.PathLike), got {type(out).__name__}")
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    # Given the model, the backend names sites as model.named_modules() does, whatever frame Dynamo traced.
    backend = Fp4Backend(policy=policy, inner=inner, dump_dir=out,
                         model=model if isinstance(model, torch.nn.Module) else None)
    _API_BACKENDS.add(backend)
    capture = _CapturingBackend(backend)
    compiled = torch.compile(model, backend=capture, dynamic=False)

    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
    saved_grads = [p.grad for p in params]
    recorder = NumericsRecorder()
    try:
        with observe_quantization(recorder):
            output = compiled(*example_inputs, **example_kwargs)
            target = _backprop_target(output)
            if target is None:
                logger.warning("fp4compile dump: the output does not require grad; dumping the forward only")
            else:
                target.backward()
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
    if not backend.reports:
        raise RuntimeError("fp4compile.dump: Dynamo compiled no graph (it may have hit its recompile limit for this "
                           "model; torch._dynamo.reset() clears it)")

    backend._write_dump()  # again, now that AOTAutograd has compiled the backward graph too
    numerics = list(recorder.results.values())
    _write_text(os.path.join(out, NUMERICS), numerics_to_json(numerics))
    onnx_paths, onnx_error = _export_graphs(backend, capture.graphs, out) if onnx else ([], "not requested")
    files = {"onnx": [os.path.basename(p) for p in onnx_paths], "onnx_error": onnx_error}
    _write_text(os.path.join(out, MANIFEST), _manifest("fp4compile.dump", backend, files))
    write_report(out)
    logger.info("fp4compile dump: wrote %s", out)
    return DumpResult(out, backend.rows(), numerics, _detach(output), onnx_paths, onnx_error, backend)


# --- FP4COMPILE_DUMP: the hook the backend calls after writing its tables ------------------------------------

def _policy_name(backend: Fp4Backend) -> str:
    name = getattr(backend.policy, "name", "") or type(backend.policy).__name__
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name))


class _EnvDump:
    """The dumps of one process that are not `dump`'s own (``FP4COMPILE_DUMP`` or a backend's ``dump_dir``): the
    folder of each backend, a process-wide observer and an exit handler."""

    def __init__(self) -> None:
        self.recorder = NumericsRecorder()
        self.folders: dict[int, str] = {}  # id(backend) -> its folder; `backends` keeps the backends alive
        self.backends: list[Fp4Backend] = []
        self.finishing = False
        set_process_observer(self.recorder)
        atexit.register(self.finish)

    def folder_of(self, backend: Fp4Backend) -> str:
        """The folder ``backend`` writes: its ``dump_dir`` for the first backend there, else a subfolder."""
        folder = self.folders.get(id(backend))
        if folder is None:
            others = [b for b in self.backends if b.dump_dir == backend.dump_dir]
            folder = backend.dump_dir
            if others:
                folder = os.path.join(backend.dump_dir, f"model_{len(others)}_{_policy_name(backend)}")
            self.folders[id(backend)] = folder
            self.backends.append(backend)
            # A warning, so that it is seen without logging configured: the user asked for this dump.
            logger.warning("fp4compile: dumping what the fp4 backend (policy %s) compiles to %s; numerics and "
                           "report.html are written when the process exits", _policy_name(backend), folder)
        return folder

    def write_numerics(self, folder: str) -> None:
        modules = {row.module for b in self.backends if self.folders[id(b)] == folder for row in b.rows()}
        results = [r for r in self.recorder.results.values() if r.module in modules]
        _write_text(os.path.join(folder, NUMERICS), numerics_to_json(results))

    def finish(self) -> None:
        """At exit: rewrite each backend's dump (now with the backward graphs), numerics and the report."""
        self.finishing = True
        for backend in self.backends:
            folder = self.folders[id(backend)]
            if not os.path.isdir(folder):
                continue
            try:
                backend._write_dump()
                self.write_numerics(folder)
                models = sorted(os.path.relpath(self.folders[id(b)], folder) for b in self.backends
                                if b.dump_dir == backend.dump_dir and self.folders[id(b)] != folder)
                files = {"onnx": [], "onnx_error": "not written by FP4COMPILE_DUMP (use fp4compile.dump for the "
                                                   "ONNX model)"}
                if folder == backend.dump_dir:
                    files["models"] = models
                _write_text(os.path.join(folder, MANIFEST), _manifest("FP4COMPILE_DUMP", backend, files))
                report = write_report(folder)
                logger.warning("fp4compile: dump written to %s (open %s)", folder, report)
            except Exception:
                logger.exception("fp4compile dump: could not finish the dump in %s", folder)


_ENV_DUMP: Optional[_EnvDump] = None


def _env_dump() -> _EnvDump:
    global _ENV_DUMP
    if _ENV_DUMP is None:
        _ENV_DUMP = _EnvDump()
    return _ENV_DUMP


def dump_folder(backend: Fp4Backend) -> str:
    """The folder `Fp4Backend._write_dump` writes for ``backend``: its ``dump_dir`` for `dump`'s backends and for
    the first backend of the process dumping there; a subfolder ``model_<k>_<policy>`` for each later one, so
    that a second compiled model does not overwrite the first one's tables."""
    if backend in _API_BACKENDS:
        return backend.dump_dir
    return _env_dump().folder_of(backend)


def on_backend_dump(backend: Fp4Backend) -> None:
    """Called by `Fp4Backend._write_dump` after it wrote the tables and the code: for a backend dumping
    through ``FP4COMPILE_DUMP`` (not one created by `dump`), install the numerics observer and the exit
    handler once, and write ``report.html``. Never raises (a dump must not break training)."""
    if backend in _API_BACKENDS or not backend.dump_dir:
        return
    try:
        env_dump = _env_dump()
        if env_dump.finishing:
            return
        write_report(env_dump.folder_of(backend))
    except Exception:
        logger.exception("fp4compile dump: could not extend the dump in %s", backend.dump_dir)


# The backend writes its dump through these (fp4compile.capture.compiler.DumpHooks): capture imports nothing
# from inspect.
set_dump_hooks(folder=dump_folder, after_write=on_backend_dump)
