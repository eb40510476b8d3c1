"""The ``"fp4"`` torch.compile backend: Dynamo's graph in, passes, then an inner compiler.

    torch.compile(model, backend="fp4")                                   # the NV recipe
    torch.compile(model, backend="fp4", options={"policy": fp4compile.recipes.fp4_all_the_way()})
    torch.compile(model, backend="fp4", options={"policy": "fp4_all_the_way"})   # a recipe by name
    torch.compile(model, backend=fp4compile.backend(policy=..., inner="inductor"))

The string name is found through the ``torch_dynamo_backends`` entry point (`fp4_backend`), so it works in a
fresh process without importing fp4compile; nothing here calls ``register_backend`` (a second registration
of the same name asserts).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import sys
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from .. import env
from ..distributed import GraphRoute, ModelLayout, model_layout, route_graph, split_warning, unplaced_warning
from ..passes.annotate_layers import PLACEMENT, BlockPlacement
from ..passes.meta import MODEL_STACKS, PARAMETER_NAMES
from ..passes.pipeline import run_passes
from ..policy.recipe import Policy, unmatched_patterns
from ..policy.schedule import FP4_PHASE, Phase, PhaseSource, StepCounter
from .table import TableRow, precision_table, rows_to_json, rows_to_markdown
from .inner import INNER_COMPILERS, compile_inner

__all__ = ["Fp4Backend", "CompileReport", "backend", "fp4_backend", "fallback_warning"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CompileReport:
    """What one compilation of one graph in one schedule phase decided and produced."""

    graph: str
    phase: str
    rows: list[TableRow]
    pass_code: list[tuple[str, str]]
    aot_code: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def fallbacks(self) -> list[TableRow]:
        return [r for r in self.rows if r.reason.startswith("fallback:")]


def _compiled_module() -> Optional[torch.nn.Module]:
    """The module whose compiled call is running, found on the Python stack while Dynamo hands over a graph:
    the ``_orig_mod`` of the outermost ``torch.compile(model)`` wrapper, or the outermost module compiled in
    place (``model.compile()``). None when a function, not a module, was compiled."""
    from torch._dynamo.eval_frame import OptimizedModule

    found = None
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, OptimizedModule):
            found = owner._orig_mod
        elif isinstance(owner, torch.nn.Module) and getattr(owner, "_compiled_call_impl", None) is not None:
            found = owner
        frame = frame.f_back
    return found


def _found_layout() -> Optional[ModelLayout]:
    """The layout of the compiled model when the backend was not given one (`_compiled_module`), so that every
    graph Dynamo hands over (after a graph break, DDP's splits) is named and placed in the same model. Only a
    model with a block stack counts: a single block compiled on its own (per-block compile) is placed as
    without a model, and warned about."""
    model = _compiled_module()
    if model is None:
        return None
    layout = model_layout(model)
    return layout if layout.stack is not None else None


def uncaptured_experts_warning(model: torch.nn.Module) -> Optional[str]:
    """The warning for experts modules that run their experts in a Python loop Dynamo cannot capture
    (transformers' ``experts_implementation="eager"``: the routing's ``nonzero`` breaks the graph and the loop
    runs outside any graph), or None. Their GEMMs never reach the backend and stay in high precision."""
    looped = [name for name, module in model.named_modules()
              if getattr(getattr(module, "config", None), "_experts_implementation", None) == "eager"
              and any(p.dim() == 3 for p in module.parameters(recurse=False))]
    if not looped:
        return None
    shown = ", ".join(looped[:2]) + (f" and {len(looped) - 2} more" if len(looped) > 2 else "")
    return (f"fp4compile: the experts of {shown} run in a Python loop (experts_implementation='eager') that Dynamo "
            "cannot capture: their GEMMs run outside the compiled graphs, in high precision; "
            "model.set_experts_implementation('grouped_mm') (or 'batched_mm') makes them FP4 sites, one GEMM per "
            "expert")


#: Calls of a graph compiled without a model whose weights are checked against the traced ones.
_REUSE_CHECKS = 4


def _reuse_checked(fn: Callable, example_inputs: Sequence[Any], graph_id: str) -> Callable:
    """``fn``, warning once if Dynamo calls it with other weights than it traced (one block's forward reused
    for every block: a graph break in the loop over blocks): the graph's sites were named and placed as one
    block, which without the model cannot be told from the model. Checked on the first calls only."""
    positions = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)]
    if not positions:
        return fn
    traced = [id(example_inputs[i]) for i in positions]
    left = [_REUSE_CHECKS]

    def run(*args: Any) -> Any:
        if left[0]:
            left[0] -= 1
            if any(i < len(args) and id(args[i]) != j for i, j in zip(positions, traced)):
                left[0] = 0
                logger.warning(structure_warning(graph_id, reused=True))
        return fn(*args)

    return run


def structure_warning(graph_id: str, graphs: int = 0, reused: bool = False) -> str:
    """The warning for a model Dynamo split into several graphs, or for one graph Dynamo runs for several
    modules (``reused``), when the backend knows no model."""
    what = (f"runs {graph_id}, traced from one module's forward, for other modules' weights too" if reused else
            f"handed over the model in {graphs} graphs (a graph break)")
    return (f"fp4compile: Dynamo {what} and the backend could not "
            f"find the model: {graph_id} and the graphs after it name their module paths from the submodule "
            "Dynamo traced and find block stacks and the output head from their own GEMMs alone, so the recipe's "
            "structure (first and last blocks, output head, rules by module path) could not be applied across "
            "graphs; pass the model: torch.compile(fn, backend='fp4', options={'model': model})")


def fallback_warning(fallbacks: Sequence[TableRow], graph_id: str) -> str:
    """One warning for a graph's fallbacks: a line per distinct reason, with how many GEMM roles it covers and
    the first site it names (the precision table lists every one)."""
    by_reason: dict[str, list[TableRow]] = {}
    for row in fallbacks:
        by_reason.setdefault(row.reason.removeprefix("fallback: "), []).append(row)
    lines = [f"fp4compile: {len(fallbacks)} GEMM role(s) fall back to high precision in {graph_id}, by reason "
             "(each is a row of the precision table: backend.rows(), fp4compile dump):"]
    for reason, rows in sorted(by_reason.items(), key=lambda item: -len(item[1])):
        first = rows[0]
        lines.append(f"  {len(rows)} x {reason} (e.g. {first.module or first.node} {first.role})")
    return "\n".join(lines)


def _resolve_policy(policy: "Policy | str | None") -> Policy:
    """The policy a backend runs: the NV recipe when None, `fp4compile.recipes.from_name` for a string."""
    from .. import recipes

    if policy is None:
        return recipes.nvfp4()
    if isinstance(policy, str):
        return recipes.from_name(policy)
    if not callable(getattr(policy, "decide", None)):
        raise TypeError(f"policy must be a recipe name ({', '.join(recipes.RECIPE_NAMES)}), a recipe from "
                        f"fp4compile.recipes, or an object with a decide(site, role) method; got "
                        f"{type(policy).__name__}")
    return policy


class Fp4Backend:
    """A torch.compile backend that runs the GEMMs a ``policy`` picks in FP4.

    Args:
        policy: anything with ``decide(site, role) -> Decision`` (default: `fp4compile.recipes.nvfp4()`), or
            the name of a built-in recipe (`fp4compile.recipes.from_name`); a ``schedule`` attribute, if
            present, makes the precision change with ``step_counter``.
        inner: ``"inductor"`` (default), ``"aot_eager"`` or ``"eager"``: compiles everything else.
        step_counter: the `StepCounter` a schedule reads (one is created if not given).
        dump_dir: where to write the precision table (default: ``FP4COMPILE_DUMP``).
        verify: run the graph verifier after every pass (default: ``FP4COMPILE_VERIFY``).
        cudagraphs: capture the compiled graphs in CUDA graphs (Inductor only; what
            ``torch.compile(mode="reduce-overhead")`` asks for).
        model: the model being compiled (its root module). Needed when Dynamo hands the model over in parts
            (FSDP2, per-block compile, DDP's graph splitting): block indices then count against the model's
            whole block stack, and a graph traced from one block's forward is compiled once per block
            (`fp4compile.distributed`). Held weakly.
    """

    __name__ = "fp4"

    def __init__(self, policy: "Policy | str | None" = None, inner: Optional[str] = None,
                 step_counter: Optional[StepCounter] = None, dump_dir: Optional[str] = None,
                 verify: Optional[bool] = None, cudagraphs: bool = False,
                 model: Optional[torch.nn.Module] = None) -> None:
        self.policy = _resolve_policy(policy)
        self.inner = inner or env.inner_compiler() or "inductor"
        if self.inner not in INNER_COMPILERS:
            raise ValueError(f"inner must be one of {INNER_COMPILERS}, got {self.inner!r}")
        self.step_counter = step_counter if step_counter is not None else StepCounter()
        # The counter tells configurations apart when it is the caller's or a schedule reads it; a counter made
        # here that nothing reads does not (so `backend()` can return one instance per configuration).
        counter_matters = step_counter is not None or getattr(self.policy, "schedule", None) is not None
        self._step_counter_id = id(self.step_counter) if counter_matters else None
        self.dump_dir = dump_dir if dump_dir is not None else env.dump_dir()
        self.verify = env.verify_passes() if verify is None else verify
        self.cudagraphs = bool(cudagraphs)
        self.layout: Optional[ModelLayout] = model_layout(model) if model is not None else None
        self._model_id = id(model) if model is not None else None  # the layout holds the model weakly
        self.reports: list[CompileReport] = []
        self._graph_ids = itertools.count()
        self._warned_patterns: set[str] = set()
        self._warned_structure = False
        self._warned_experts: set[int] = set()

    # Dynamo compares backends to decide whether a cached frame can be reused.
    def _key(self) -> tuple:
        return (repr(self.policy), self.inner, self._step_counter_id, self.dump_dir, self.cudagraphs, self._model_id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Fp4Backend) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Fp4Backend(policy={self.policy!r}, inner={self.inner!r})"

    @property
    def schedule(self) -> Optional[PhaseSource]:
        return getattr(self.policy, "schedule", None)

    def rows(self) -> list[TableRow]:
        """The precision table over every graph compiled so far (latest phase of each graph)."""
        latest: dict[str, CompileReport] = {}
        for report in self.reports:
            latest[report.graph] = report
        return [row for report in latest.values() for row in report.rows]

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], **_: Any) -> Callable:
        graph_id = f"graph_{next(self._graph_ids)}"
        schedule = self.schedule
        layout = self.layout if self.layout is not None else _found_layout()
        route = route_graph(layout, gm, example_inputs) if layout is not None else GraphRoute()
        if layout is None and (warning := split_warning(gm, graph_id)):
            logger.warning(warning)
        if layout is not None and layout.model is not None and id(layout.model) not in self._warned_experts:
            self._warned_experts.add(id(layout.model))
            if warning := uncaptured_experts_warning(layout.model):
                logger.warning(warning)
        if schedule is None and not route.per_call:
            compiled_fn = self._compile_phase(gm, example_inputs, graph_id, FP4_PHASE, route.placement, layout)
            return compiled_fn if layout is not None else _reuse_checked(compiled_fn, example_inputs, graph_id)
        # One variant per schedule phase and, for a graph Dynamo reuses for every block, per block.
        compiled: dict[tuple[Phase, Optional[BlockPlacement]], Callable] = {}

        def variant(args: Sequence[Any]) -> Callable:
            phase = schedule.phase_at(self.step_counter.step) if schedule is not None else FP4_PHASE
            placement = route.at_call(args)
            fn = compiled.get((phase, placement))
            if fn is None:
                name = route.name(graph_id, placement)
                logger.info("fp4compile: compiling %s for schedule phase %r", name, phase.name)
                # A block's variant is compiled with that block's live arguments: under FSDP2 the example
                # inputs, another block's unsharded weights, may have been freed since. Any other variant takes
                # Dynamo's example inputs, whose sizes may be symbolic: live arguments would fix them to one call's.
                inputs = args if route.per_call and placement is not None else example_inputs
                fn = compiled[(phase, placement)] = self._compile_phase(gm, inputs, name, phase, placement, layout)
            return fn

        def run(*args: Any) -> Any:
            return variant(args)(*args)  # what Dynamo does with a backend's result, whatever its calling-convention flags

        if not route.per_call or route.at_call(example_inputs) is not None:
            variant(example_inputs)  # compile the first variant now, as Dynamo expects
        return run

    def _compile_phase(self, gm: fx.GraphModule, example_inputs: Sequence[Any], graph_id: str, phase: Phase,
                       placement: Optional[BlockPlacement] = None, layout: Optional[ModelLayout] = None) -> Callable:
        # Set on the passes' own copy of the graph (Dynamo's graph stays untouched; the placement differs per variant).
        graph_meta: dict[str, Any] = {}
        if placement is not None:
            graph_meta[PLACEMENT] = placement
        if layout is not None:
            graph_meta[MODEL_STACKS] = layout.stacks
            graph_meta[PARAMETER_NAMES] = layout.names_of
        result = run_passes(gm, example_inputs, self.policy, phase, verify=self.verify,
                            cudagraphs=self.cudagraphs and self.inner == "inductor", graph_meta=graph_meta)
        # Dynamo compiles a graph under the grad mode it was traced in: without gradients (an evaluation under
        # torch.no_grad()) only the forward GEMMs run, so the table has no backward rows for it.
        rows = precision_table(result.annotated, graph_id, training=torch.is_grad_enabled())
        report = CompileReport(graph_id, phase.name, rows, result.snapshots)
        self.reports.append(report)
        if report.fallbacks:
            logger.warning(fallback_warning(report.fallbacks, graph_id))
        if layout is None and all(r.layer is None for r in report.rows) and (
                warning := unplaced_warning(graph_id, [r.module for r in report.rows])):
            logger.warning(warning)
        if layout is None and report.rows and not self._warned_structure and len(self.reports) > 1:
            self._warned_structure = True
            logger.warning(structure_warning(graph_id, len(self.reports)))

        self._warn_unmatched_rules()

        def record(label: str, graph: fx.GraphModule) -> None:
            report.aot_code[label] = graph.code

        if self.dump_dir:
            # Before the graph is traced: on CUDA a traced quantization calls no Python, so it reports to the
            # numerics observer only if one is installed when AOTAutograd traces it (fp4compile/ops/triton_ops.py).
            DUMP_HOOKS.folder(self)
        compiled = compile_inner(result.graph_module, example_inputs, self.inner, record, self.cudagraphs)
        if self.dump_dir:
            self._write_dump()
        return compiled

    def _warn_unmatched_rules(self) -> None:
        """Warn (once per pattern) about a policy rule's module pattern that matches no GEMM site compiled so
        far, nor, when the backend knows the model, any module or parameter name of the model (its sites may
        then be in a graph not compiled yet)."""
        patterns = [p for rule in getattr(self.policy, "rules", ()) for p in getattr(rule, "modules", ())]
        patterns = [p for p in dict.fromkeys(patterns) if p not in self._warned_patterns]
        if not patterns:
            return
        rows = self.rows()
        paths = sorted({p for row in rows for p in (row.module, row.weight) if p})
        model_names = self.layout.names() if self.layout is not None else []
        for pattern, nearest in unmatched_patterns(patterns, paths):
            if model_names and not unmatched_patterns([pattern], model_names):
                continue
            self._warned_patterns.add(pattern)
            hint = "" if self.layout is not None else (
                "; without options={'model': model} a graph Dynamo traced from a submodule's forward names its "
                "paths from that submodule")
            logger.warning("fp4compile: policy rule pattern %r matches none of the %d GEMM sites compiled so far; "
                           "the nearest site paths are %s (site paths are the names model.named_modules() gives%s)",
                           pattern, len({row.module for row in rows}), nearest or "none", hint)

    def _write_dump(self) -> None:
        out = DUMP_HOOKS.folder(self)  # dump_dir, or a subfolder of it when another backend writes there too
        os.makedirs(out, exist_ok=True)
        rows = self.rows()
        with open(os.path.join(out, "precision_table.json"), "w") as f:
            f.write(rows_to_json(rows))
        with open(os.path.join(out, "precision_table.md"), "w") as f:
            f.write(rows_to_markdown(rows))
        for report in self.reports:
            folder = os.path.join(out, report.graph, report.phase)
            os.makedirs(folder, exist_ok=True)
            for i, (name, code) in enumerate(report.pass_code):
                with open(os.path.join(folder, f"pass_{i}_{name}.py"), "w") as f:
                    f.write(code)
            for label, code in report.aot_code.items():
                with open(os.path.join(folder, f"aot_{label}.py"), "w") as f:
                    f.write(code)
            with open(os.path.join(folder, "precision_table.json"), "w") as f:
                f.write(json.dumps([r.to_dict() for r in report.rows], indent=1))
        DUMP_HOOKS.after_write(self)  # report.html and numerics, where fp4compile.inspect.dump registered them


@dataclasses.dataclass
class DumpHooks:
    """What the inspect layer adds to a backend's dump, registered by `fp4compile.inspect.dump` when it is imported
    (``import fp4compile`` imports it): capture calls inspect only through these, so imports go one way,
    numerics -> policy -> passes -> ops/codegen -> capture -> inspect (tests/test_layering.py).

    ``folder(backend)``: the folder `Fp4Backend._write_dump` writes (default: its ``dump_dir``), asked also before
    the graph is traced so that the numerics observer is in place; ``after_write(backend)``: called after the
    tables and code are written (default: nothing)."""

    folder: Callable[["Fp4Backend"], str] = lambda backend: backend.dump_dir
    after_write: Callable[["Fp4Backend"], None] = lambda backend: None


#: The hooks in force (`set_dump_hooks`).
DUMP_HOOKS = DumpHooks()


def set_dump_hooks(folder: Callable[["Fp4Backend"], str], after_write: Callable[["Fp4Backend"], None]) -> None:
    """Install the inspect layer's dump hooks (`DumpHooks`)."""
    DUMP_HOOKS.folder, DUMP_HOOKS.after_write = folder, after_write


# The backend's registry: one instance per configuration, so repeated compiles share their reports.
_REGISTRY: dict[tuple, Fp4Backend] = {}


def backend(policy: "Policy | str | None" = None, inner: Optional[str] = None,
            step_counter: Optional[StepCounter] = None, dump_dir: Optional[str] = None,
            verify: Optional[bool] = None, cudagraphs: bool = False,
            model: Optional[torch.nn.Module] = None) -> Fp4Backend:
    """The `Fp4Backend` for this configuration (the same instance for the same configuration and model)."""
    candidate = Fp4Backend(policy, inner, step_counter, dump_dir, verify, cudagraphs, model)
    key = candidate._key() + (candidate.verify,)
    return _REGISTRY.setdefault(key, candidate)


def fp4_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Optional[dict] = None,
                mode: Optional[str] = None) -> Callable:
    """The entry point behind ``backend="fp4"``; ``options`` are `backend`'s keyword arguments.

    Dynamo calls it at the first call of the compiled model, not at ``torch.compile``, and wraps what it raises
    in a long traceback: a bad option is therefore also logged as an error first, so the reason is the first
    thing printed. ``fp4compile.backend(...)`` checks its arguments when it is called, before ``torch.compile``.
    """
    try:
        the_backend = backend(**_backend_options(options, mode))
    except (TypeError, ValueError) as exc:
        logger.error("fp4compile: torch.compile(backend='fp4', options=...): %s", exc)
        raise
    return the_backend(gm, example_inputs)


_OPTIONS = ("policy", "inner", "step_counter", "dump_dir", "verify", "cudagraphs", "model")


def _backend_options(options: Optional[dict], mode: Optional[str]) -> dict:
    """``torch.compile``'s ``options`` and ``mode`` as `backend`'s keyword arguments, checked."""
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"backend 'fp4': options must be a dict, got {type(options).__name__}")
    options = dict(options or {})
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise ValueError(f"backend 'fp4': unknown option(s) {sorted(unknown)}; expected some of {sorted(_OPTIONS)}")
    if mode == "reduce-overhead":
        options.setdefault("cudagraphs", True)
    elif mode not in (None, "default"):
        logger.warning("fp4compile: torch.compile mode %r is ignored by the fp4 backend", mode)
    return options
