"""Which layers can take FP4: measure, eagerly, what FP4 costs at every GEMM site and role of a model.

``fp4compile.sensitivity(model, *batch)`` runs the model on a few batches in high precision, then again with
exactly one part of it in FP4 (the rest high precision) and compares the loss and the gradients:

- scope ``role``: one site (a linear module) in one role (forward, input_grad or weight_grad);
- scope ``site``: one site, all three roles;
- scope ``block``: every site of one block of the block stack, all roles;
- scope ``model``: every site, all roles (the recipe without its high-precision exceptions).

No ``torch.compile`` is involved: every site's ``forward`` is swapped for the eager reference linear
(`fp4compile.testing.ReferenceFakeQuantLinear`, the oracle the compiled backend is tested against), which runs
each role in the precision the measurement gives it. The high-precision pass runs through the same swapped
linears with every role high, so a difference between two passes comes from the quantization alone. Every
pass of a batch starts from the same seed (``seed + batch index``), so stochastic rounding draws the same
bits in every measurement of that batch.

What is measured, for each part and averaged over the batches (``g`` the gradient of all trainable parameters
with the part in FP4, ``r`` the high-precision one):

- ``loss_delta``: ``loss_fp4 - loss_high`` (zero for the backward roles, which do not touch the loss);
- ``grad_error`` (the ranking metric): the mean over parameter tensors of ``|g_t - r_t| / |r_t|``. Adam-style
  optimizers normalise every element's update, so an error in a tensor with small gradients matters as much
  as one in a tensor with large ones; a single norm over the whole model would hide it;
- ``grad_rel_error``: ``|g - r| / |r|`` over all parameters at once; ``grad_cosine``: ``g.r / (|g| |r|)``;
- ``sqnr_lhs_db``, ``sqnr_rhs_db`` (role scope): the SQNR of the GEMM's two operands quantized from the
  high-precision pass of the first batch, as the dump measures them (`fp4compile.inspect.numerics`).

``noise_floor`` is the ``grad_error`` of a second high-precision pass against the first: the run-to-run
difference of the device's kernels, below which a measurement says nothing.

Site names are the ``named_modules()`` paths that the policy rules match (``transformer.h.3.mlp.c_fc``); layer
indices, the first and last block and the output head are found as the compiler finds them
(`fp4compile.passes.annotate_layers`). The report is written as ``sensitivity.json`` (and ``sensitivity.html``)
beside a dump's files; ``fp4compile.recipes.from_sensitivity`` turns it into a policy.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
import logging
import math
import os
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..numerics.api import quantize
from ..ops.linear import pad_token_rows, token_multiple
from ..passes.annotate_layers import place_sites
from ..passes.legalize import illegal_reason
from ..policy.precision import HIGH, GemmPrecision, LinearPrecision, OperandPrecision, Role
from ..policy.recipe import Policy, Recipe
from ..policy.site import GemmSite
from ..testing.fake_quant import ReferenceFakeQuantLinear
from .dump import _backprop_target
from .layout import SENSITIVITY, SENSITIVITY_HTML
from .numerics import OperandNumerics, operand_numerics

__all__ = ["Scope", "Sensitivity", "SensitivityReport", "sensitivity", "load_sensitivity", "find_sites",
           "METRICS"]

logger = logging.getLogger(__name__)

#: Measured quantities a ranking may use; larger means more sensitive (``grad_cosine`` is turned into
#: ``1 - cosine``, ``loss_delta`` taken as its magnitude).
METRICS = ("grad_error", "grad_rel_error", "grad_cosine", "loss_delta")

ALL_ROLES = "all"


class Scope(str, enum.Enum):
    """What one measurement puts in FP4 (the rest stays in high precision)."""

    ROLE = "role"
    SITE = "site"
    BLOCK = "block"
    MODEL = "model"


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """What running one part of the model in FP4 cost, measured against high precision.

    Attributes:
        scope: a `Scope` value.
        module: the site's module path; for a block, the block's path (``transformer.h.3``); ``""`` for the
            model.
        role: the role in FP4, or ``"all"``.
        layer: the block index, or None (output head, sites outside the block stack, the model).
        flops: FLOPs per batch of the GEMMs this part runs (``2 M N K`` per GEMM, the first batch's shapes).
        loss_delta, loss_delta_rel, grad_error, grad_rel_error, grad_cosine: see the module docstring; None
            when the part was not measured.
        sqnr_lhs_db, sqnr_rhs_db: operand SQNRs (role scope), None where not measured or exact.
        rank: 1 for the most sensitive part of its scope by the report's metric; None when not measured.
        skipped: why the part was not measured (e.g. a shape the format cannot block); "" when it was.
    """

    scope: str
    module: str
    role: str
    layer: Optional[int]
    flops: int
    loss_delta: Optional[float] = None
    loss_delta_rel: Optional[float] = None
    grad_error: Optional[float] = None
    grad_rel_error: Optional[float] = None
    grad_cosine: Optional[float] = None
    sqnr_lhs_db: Optional[float] = None
    sqnr_rhs_db: Optional[float] = None
    rank: Optional[int] = None
    skipped: str = ""

    @property
    def measured(self) -> bool:
        return not self.skipped

    def score(self, metric: str = "grad_error") -> float:
        """The value this part is ranked by under ``metric`` (larger is more sensitive)."""
        if metric not in METRICS:
            raise ValueError(f"unknown sensitivity metric {metric!r}; expected one of {METRICS}")
        value = getattr(self, metric)
        if value is None:
            return -math.inf
        if metric == "grad_cosine":
            return 1.0 - value
        return abs(value) if metric == "loss_delta" else value

    def describe(self) -> str:
        """The measured values in one phrase, for a policy's reason."""
        if self.skipped:
            return f"not measured: {self.skipped}"
        sqnr = ""
        if self.sqnr_lhs_db is not None or self.sqnr_rhs_db is not None:
            sqnr = f", SQNR {_db(self.sqnr_lhs_db)}/{_db(self.sqnr_rhs_db)} dB"
        return (f"grad error {self.grad_error:.3g}, grad cosine {self.grad_cosine:.5f}, "
                f"loss {self.loss_delta_rel:+.3%}{sqnr}")


def _db(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


@dataclasses.dataclass(frozen=True)
class SensitivityReport:
    """The measurements of `sensitivity` on one model.

    Attributes:
        recipe: the name of the recipe whose role precisions were measured.
        precisions: role -> the encoded `GemmPrecision` a role ran in when it was in FP4.
        metric: the metric the ranks follow (one of `METRICS`).
        batches: how many batches each part was measured on; seed: the seed of the first batch's passes.
        loss: the high-precision loss, mean over the batches.
        noise_floor: the grad_error of a repeated high-precision pass (0 on a deterministic device).
        sites: the measured sites, in the order of the forward, as the compiler describes them.
        entries: every measurement, all scopes, in site order.
        numerics: the operands' numerics (first batch), labelled ``<module>:<role>:<lhs|rhs>`` as in a dump.
    """

    recipe: str
    precisions: Mapping[str, str]
    metric: str
    batches: int
    seed: int
    loss: float
    noise_floor: float
    sites: tuple[GemmSite, ...]
    entries: tuple[Sensitivity, ...]
    numerics: tuple[OperandNumerics, ...] = ()

    def ranked(self, scope: "Scope | str" = Scope.ROLE, metric: Optional[str] = None) -> list[Sensitivity]:
        """The measured entries of ``scope``, most sensitive first (by ``metric``, default the report's)."""
        scope = Scope(scope).value
        metric = metric or self.metric
        measured = [e for e in self.entries if e.scope == scope and e.measured]
        return sorted(measured, key=lambda e: e.score(metric), reverse=True)

    def entry(self, module: str, role: "Role | str" = ALL_ROLES, scope: "Scope | str | None" = None) -> Sensitivity:
        """The entry of ``module`` in ``role`` (role scope), or all roles (site scope; block/model by scope)."""
        role = role.value if isinstance(role, Role) else str(role)
        scope = Scope(scope).value if scope is not None else (Scope.SITE.value if role == ALL_ROLES else Scope.ROLE.value)
        for e in self.entries:
            if e.scope == scope and e.module == module and e.role == role:
                return e
        raise KeyError(f"no {scope} entry for module {module!r} role {role!r} in this report")

    def role_precision(self, role: "Role | str") -> GemmPrecision:
        return GemmPrecision.decode(self.precisions[Role(role).value])

    @property
    def total_flops(self) -> int:
        """FLOPs per batch of every site in every role it runs (the budget's denominator)."""
        return sum(e.flops for e in self.entries if e.scope == Scope.ROLE.value)

    def high_precision_fraction(self, policy: Policy) -> float:
        """The fraction of `total_flops` that ``policy`` keeps in high precision on this model, deciding each
        site and role as the compiler does (including the fallbacks for shapes the format cannot block)."""
        total = self.total_flops
        if total == 0:
            return 0.0
        high = 0
        flops = {(e.module, e.role): e.flops for e in self.entries if e.scope == Scope.ROLE.value}
        for site in self.sites:
            for role in Role:
                precision = policy.decide(site, role).precision
                if precision.is_high or illegal_reason(site, role, precision):
                    high += flops.get((site.module, role.value), 0)
        return high / total

    # --- JSON -----------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe, "precisions": dict(self.precisions), "metric": self.metric,
            "batches": self.batches, "seed": self.seed, "loss": self.loss, "noise_floor": self.noise_floor,
            "total_flops": self.total_flops,
            "sites": [dict(dataclasses.asdict(s), input_shape=list(s.input_shape)) for s in self.sites],
            "entries": [dataclasses.asdict(e) for e in self.entries],
            "numerics": [n.to_dict() for n in self.numerics],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "SensitivityReport":
        try:
            sites = tuple(GemmSite(**dict(s, input_shape=tuple(s["input_shape"]))) for s in d["sites"])
            entries = tuple(Sensitivity(**e) for e in d["entries"])
            numerics = tuple(OperandNumerics.from_dict(n) for n in d.get("numerics", ()))
            return SensitivityReport(d["recipe"], dict(d["precisions"]), d["metric"], int(d["batches"]),
                                     int(d["seed"]), float(d["loss"]), float(d["noise_floor"]), sites, entries,
                                     numerics)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an fp4compile sensitivity report: {type(exc).__name__}: {exc}") from None

    @staticmethod
    def from_json(text: str) -> "SensitivityReport":
        return SensitivityReport.from_dict(json.loads(text))

    def save(self, out: "str | os.PathLike") -> str:
        """Write ``sensitivity.json`` and ``sensitivity.html`` into the folder ``out`` (a dump folder, or a new
        one), and add the sensitivity section to the folder's ``report.html`` when it holds a dump. Returns
        the JSON's path."""
        from .layout import TABLE_JSON
        from .report import render_sensitivity_page, write_report

        out = os.fspath(out)
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, SENSITIVITY)
        with open(path, "w") as f:
            f.write(self.to_json())
        with open(os.path.join(out, SENSITIVITY_HTML), "w", encoding="utf-8") as f:
            f.write(render_sensitivity_page(self))
        if os.path.isfile(os.path.join(out, TABLE_JSON)):
            write_report(out)
        logger.info("fp4compile sensitivity: wrote %s", path)
        return path


def load_sensitivity(path: "str | os.PathLike") -> SensitivityReport:
    """Read ``sensitivity.json`` (or the folder holding it)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, SENSITIVITY)
    with open(path) as f:
        return SensitivityReport.from_json(f.read())


# --- finding the sites ---------------------------------------------------------------------------------------

def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` (Hugging Face and examples/gpt.py): a linear layer whose weight is stored (in, out)."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and getattr(module, "nf", weight.shape[1]) == weight.shape[1])


def find_sites(model: nn.Module) -> dict[str, nn.Module]:
    """The modules measured as GEMM sites, by ``named_modules()`` path: ``nn.Linear`` and GPT-2's ``Conv1D``.
    (A GEMM the model writes as a bare ``F.linear``/``matmul`` on a parameter has no module to swap, so it
    is not measured; the compiler still finds it.)"""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)}


def _weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``(out, in)``."""
    return module.weight.t() if _is_conv1d(module) else module.weight


def _describe_sites(model: nn.Module, order: Sequence[str], modules: Mapping[str, nn.Module],
                    shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> tuple[GemmSite, ...]:
    """`GemmSite`s with their block stacks and the output head placed as the backend places them when it is
    given the model (`fp4compile.distributed.model_block_stacks`, `fp4compile.passes.annotate_layers.place_sites`)."""
    from ..distributed import model_block_stacks  # not at import: distributed -> passes -> ops -> inspect

    places = place_sites(order, model_block_stacks(model))
    sites = []
    for position, (name, place) in enumerate(zip(order, places)):
        module = modules[name]
        out_features, in_features = _weight(module).shape
        shape, dtype = shapes[name]
        sites.append(GemmSite(
            node=name, module=name, weight=f"{name}.weight" if name else "weight", spelling="linear",
            in_features=int(in_features), out_features=int(out_features), input_shape=tuple(str(s) for s in shape),
            dtype=str(dtype), trainable=module.weight.requires_grad, position=position, **(place or {}),
        ))
    return tuple(sites)


def _flops(site: GemmSite, role: Role, input_needs_grad: bool = True) -> int:
    if (role is Role.WEIGHT_GRAD and not site.trainable) or (role is Role.INPUT_GRAD and not input_needs_grad):
        return 0  # the GEMM never runs
    tokens = math.prod(int(s) for s in site.input_shape[:-1])
    return 2 * tokens * site.in_features * site.out_features


# --- running the model with chosen parts in FP4 ------------------------------------------------------------

_ALL_HIGH = LinearPrecision(HIGH, HIGH, HIGH)


class _SwappedSites:
    """Within ``with``: every site's ``forward`` runs the reference linear in ``self.precisions[name]`` (all
    roles high precision unless set); on exit the modules' own forwards are back."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self.precisions: dict[str, LinearPrecision] = {}
        self._saved: dict[str, Any] = {}

    def _forward(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        cfg = self.precisions.get(name, _ALL_HIGH)
        return ReferenceFakeQuantLinear.apply(x, _weight(module), module.bias, cfg)

    def __enter__(self) -> "_SwappedSites":
        for name, module in self.modules.items():
            self._saved[name] = module.__dict__.get("forward")
            module.forward = lambda x, n=name, m=module: self._forward(n, m, x)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, module in self.modules.items():
            previous = self._saved.pop(name, None)
            if previous is None:
                del module.forward
            else:
                module.forward = previous


def call_with_batch(model: Any, batch: Any) -> Any:
    """``model(**batch)`` for a mapping of keyword inputs, ``model(*batch)`` for a tuple or list of positional
    inputs, ``model(batch)`` for anything else (one tensor)."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


class _OperandProbe:
    """Forward and gradient hooks that measure each site's operands in every FP4 role (first call only)."""

    def __init__(self, modules: Mapping[str, nn.Module], precisions: Mapping[Role, GemmPrecision],
                 legal: Mapping[tuple[str, Role], bool]) -> None:
        self.modules, self.precisions, self.legal = modules, precisions, legal
        self.order: list[str] = []
        self.shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.input_needs_grad: dict[str, bool] = {}
        self.results: dict[str, OperandNumerics] = {}
        self.measure = False

    def _record(self, label: str, x: torch.Tensor, op: OperandPrecision) -> None:
        try:
            qt = quantize(x, op.format, op.block, op.rounding, 0, 0, op.hadamard, impl="reference")
            self.results[label] = operand_numerics(label, x, qt)
        except ValueError as exc:  # a shape the format cannot block: reported as not measured
            logger.debug("fp4compile sensitivity: no numerics for %s: %s", label, exc)

    def _wanted(self, name: str, role: Role) -> bool:
        return self.measure and not self.precisions[role].is_high and self.legal.get((name, role), False)

    def forward_hook(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or name in self.shapes:
            return
        self.order.append(name)
        self.shapes[name] = (tuple(x.shape), x.dtype)
        self.input_needs_grad[name] = x.requires_grad
        if not self.measure:
            return
        with torch.no_grad():
            x2 = x.detach().reshape(-1, x.shape[-1])
            w = _weight(module).detach()
            if self._wanted(name, Role.FORWARD):
                f = self.precisions[Role.FORWARD]
                self._record(f"{name}:forward:lhs", x2, f.lhs)
                self._record(f"{name}:forward:rhs", w, f.rhs)
            if self._wanted(name, Role.WEIGHT_GRAD):
                g = self.precisions[Role.WEIGHT_GRAD]
                self._record(f"{name}:weight_grad:rhs", pad_token_rows(x2, token_multiple(g)).t(), g.rhs)
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda dy, n=name, wt=w: self._gradient_hook(n, wt, dy))

    def _gradient_hook(self, name: str, w: torch.Tensor, dy: torch.Tensor) -> None:
        with torch.no_grad():
            dy2 = dy.detach().reshape(-1, dy.shape[-1])
            if self._wanted(name, Role.INPUT_GRAD):
                d = self.precisions[Role.INPUT_GRAD]
                self._record(f"{name}:input_grad:lhs", dy2, d.lhs)
                self._record(f"{name}:input_grad:rhs", w.t(), d.rhs)
            if self._wanted(name, Role.WEIGHT_GRAD):
                g = self.precisions[Role.WEIGHT_GRAD]
                self._record(f"{name}:weight_grad:lhs", pad_token_rows(dy2, token_multiple(g)).t(), g.lhs)

    def install(self) -> list[Any]:
        return [m.register_forward_hook(lambda mod, a, o, n=name: self.forward_hook(n, mod, a, o))
                for name, m in self.modules.items()]


@dataclasses.dataclass
class _Pass:
    """One batch's loss and flattened gradient."""

    loss: float
    grad: torch.Tensor


def _flat_grad(params: Sequence[nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])


def _run(model: nn.Module, params: Sequence[nn.Parameter], batch: Any, seed: int) -> _Pass:
    for p in params:
        p.grad = None
    torch.manual_seed(seed)
    target = _backprop_target(call_with_batch(model, batch))
    if target is None:
        raise ValueError("fp4compile.sensitivity: the model's output does not require grad; gradients are what "
                         "is measured (is the model in torch.no_grad, or are its parameters frozen?)")
    target.backward()
    return _Pass(float(target.detach()), _flat_grad(params))


_COMPARED = ("loss_delta", "loss_delta_rel", "grad_error", "grad_rel_error", "grad_cosine")


def _compare(run: _Pass, ref: _Pass, sizes: Sequence[int]) -> dict[str, float]:
    """The measured quantities of one batch (module docstring)."""
    diff = run.grad - ref.grad
    diff_tensors = torch.stack([c.square().sum() for c in diff.split(sizes)]).sqrt()
    ref_tensors = torch.stack([c.square().sum() for c in ref.grad.split(sizes)]).sqrt()
    nonzero = ref_tensors > 0
    ref_norm, run_norm = float(ref.grad.norm()), float(run.grad.norm())
    return {
        "loss_delta": run.loss - ref.loss,
        "loss_delta_rel": (run.loss - ref.loss) / abs(ref.loss) if ref.loss else 0.0,
        "grad_error": float((diff_tensors[nonzero] / ref_tensors[nonzero]).mean()) if bool(nonzero.any()) else 0.0,
        "grad_rel_error": float(diff.norm()) / ref_norm if ref_norm else 0.0,
        "grad_cosine": float(run.grad @ ref.grad) / (run_norm * ref_norm) if run_norm and ref_norm else 1.0,
    }


def _mean(comparisons: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: sum(c[k] for c in comparisons) / len(comparisons) for k in _COMPARED}


def _parts(sites: Sequence[GemmSite], blocks: bool, per_site: bool) -> Iterator[tuple[str, str, str, Optional[int], list[tuple[str, Role]]]]:
    """(scope, module, role, layer, [(site, role) in FP4]) of every measurement, in site order."""
    for site in sites:
        for role in Role:
            yield Scope.ROLE.value, site.module, role.value, site.layer_index, [(site.module, role)]
    if per_site:
        for site in sites:
            yield Scope.SITE.value, site.module, ALL_ROLES, site.layer_index, [(site.module, r) for r in Role]
    if blocks:
        by_block: dict[tuple[str, int], list[GemmSite]] = collections.defaultdict(list)
        for site in sites:
            if site.stack is not None and site.layer_index is not None:
                by_block[(site.stack, site.layer_index)].append(site)
        for (stack, layer), members in by_block.items():  # in site order: stack by stack, block by block
            name = str(layer) if stack == "(root)" else f"{stack}.{layer}"
            yield (Scope.BLOCK.value, name, ALL_ROLES, layer, [(s.module, r) for s in members for r in Role])
    yield Scope.MODEL.value, "", ALL_ROLES, None, [(s.module, r) for s in sites for r in Role]


def _unmeasurable(site: GemmSite, role: Role, precision: GemmPrecision, input_needs_grad: bool) -> str:
    """Why ``site`` cannot run ``role`` in ``precision`` (the compiler's legalize rules), or ""."""
    if role is Role.WEIGHT_GRAD and not site.trainable:
        return "the weight is frozen: its weight-gradient GEMM never runs"
    if role is Role.INPUT_GRAD and not input_needs_grad:
        return "the input needs no gradient: the input-gradient GEMM never runs"
    return illegal_reason(site, role, precision) or ""


def _precision(fp4: Sequence[tuple[str, Role]], name: str, precisions: Mapping[Role, GemmPrecision]) -> LinearPrecision:
    """The roles of site ``name`` listed in ``fp4`` in their recipe precision, the others high."""
    chosen = {role: precisions[role] for (n, role) in fp4 if n == name}
    return LinearPrecision(*(chosen.get(r, HIGH) for r in Role))


def _discover(model: nn.Module, params: Sequence[nn.Parameter], modules: Mapping[str, nn.Module],
              precisions: Mapping[Role, GemmPrecision], batch: Any, seed: int) -> tuple[tuple[GemmSite, ...], dict[str, bool]]:
    """One high-precision pass: the sites in call order with their shapes, and whether each one's input
    needs a gradient."""
    probe = _OperandProbe(modules, precisions, legal={})
    handles = probe.install()
    try:
        _run(model, params, batch, seed)
    finally:
        for h in handles:
            h.remove()
    unused = sorted(set(modules) - set(probe.order))
    if unused:
        logger.info("fp4compile sensitivity: %d module(s) not called by the model are not sites: %s",
                    len(unused), ", ".join(unused))
    return _describe_sites(model, probe.order, modules, probe.shapes), probe.input_needs_grad


def _reference(model: nn.Module, params: Sequence[nn.Parameter], sizes: Sequence[int], batches: Sequence[Any],
               seed: int, probe: _OperandProbe) -> tuple[list[_Pass], float]:
    """The high-precision passes (the first one measures the operands' numerics) and the noise floor."""
    probe.measure = True
    handles = probe.install()
    try:
        refs = [_run(model, params, batches[0], seed)]
    finally:
        for h in handles:
            h.remove()
    refs += [_run(model, params, b, seed + i) for i, b in enumerate(batches[1:], start=1)]
    repeat = [_compare(_run(model, params, b, seed + i), refs[i], sizes) for i, b in enumerate(batches)]
    return refs, _mean(repeat)["grad_error"]


def _measure(model: nn.Module, params: Sequence[nn.Parameter], sizes: Sequence[int], batches: Sequence[Any],
             seed: int, refs: Sequence[_Pass], bar: Any) -> dict[str, float]:
    """Every batch with the swapped sites' current precisions, against the high-precision passes."""
    comparisons = []
    for i, b in enumerate(batches):
        comparisons.append(_compare(_run(model, params, b, seed + i), refs[i], sizes))
        bar.update(1)
    return _mean(comparisons)


def _rank(entries: list[Sensitivity], metric: str) -> list[Sensitivity]:
    ranks: dict[int, int] = {}
    for scope in Scope:
        members = [i for i, e in enumerate(entries) if e.scope == scope.value and e.measured]
        for rank, i in enumerate(sorted(members, key=lambda i: entries[i].score(metric), reverse=True), start=1):
            ranks[i] = rank
    return [dataclasses.replace(e, rank=ranks.get(i)) for i, e in enumerate(entries)]


def _as_batches(args: tuple, batches: Optional[Sequence[Any]]) -> list[Any]:
    if batches is None:
        if not args:
            raise TypeError("fp4compile.sensitivity: give the model's inputs, sensitivity(model, *inputs), or a list "
                            "of batches, sensitivity(model, batches=[(x, y), ...])")
        return [tuple(args)]
    if args:
        raise TypeError("fp4compile.sensitivity: give either the inputs of one batch or batches=..., not both")
    out = []
    for i, b in enumerate(batches):
        if isinstance(b, Mapping):
            out.append(dict(b))
        elif isinstance(b, (tuple, list)):
            out.append(tuple(b))
        elif isinstance(b, torch.Tensor):
            out.append((b,))
        else:
            raise TypeError(f"fp4compile.sensitivity: batch {i} must be a tuple of positional inputs, a mapping of "
                            f"keyword inputs or a tensor, got {type(b).__name__}")
    if not out:
        raise ValueError("fp4compile.sensitivity: batches is empty; give at least one batch")
    return out


def sensitivity(model: nn.Module, *inputs: Any, batches: Optional[Sequence[Any]] = None,
                recipe: Optional[Recipe] = None, metric: str = "grad_error", blocks: bool = True,
                per_site: bool = True, seed: int = 0, progress: bool = True,
                out: "str | os.PathLike | None" = None) -> SensitivityReport:
    """Measure what FP4 costs at every GEMM site and role of ``model`` (see the module docstring).

    Args:
        model: an ``nn.Module`` whose output is a loss (or as `fp4compile.dump` accepts: a tensor, summed if not
            a scalar; the first element of a tuple; ``output["loss"]``). Its ``nn.Linear`` / ``Conv1D``
            modules are the sites. It is left as it was: forwards are restored, parameters untouched, ``.grad``
            restored. Put it in the mode it trains in, with dropout off for a clean measurement.
        inputs: the positional inputs of one batch; or ``batches``: a few batches, each a tuple of positional
            inputs, a mapping of keyword inputs, or a tensor.
        recipe: the recipe whose role precisions are measured (default: `fp4compile.recipes.nvfp4`); only its
            forward, input_grad and weight_grad precisions are used, not its rules for which sites stay high.
        metric: the ranking metric, one of `METRICS`.
        blocks: also measure each block of the block stack in FP4 (all its sites, all roles).
        per_site: also measure each site with all three roles in FP4.
        seed: every pass on batch ``i`` starts from ``torch.manual_seed(seed + i)``; the global RNG is restored.
        progress: show a tqdm progress bar.
        out: a folder (a dump's, or a new one) to save ``sensitivity.json`` and ``sensitivity.html`` into.

    Returns:
        A `SensitivityReport`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fp4compile.sensitivity: model must be a torch.nn.Module, got {type(model).__name__}")
    if metric not in METRICS:
        raise ValueError(f"fp4compile.sensitivity: metric must be one of {METRICS}, got {metric!r}")
    if recipe is None:
        from ..recipes import nvfp4

        recipe = nvfp4()
    if not isinstance(recipe, Recipe):
        raise TypeError(f"fp4compile.sensitivity: recipe must be a fp4compile Recipe, got {type(recipe).__name__}")
    batch_list = _as_batches(inputs, batches)
    modules = find_sites(model)
    if not modules:
        raise ValueError(f"fp4compile.sensitivity: {type(model).__name__} has no nn.Linear or Conv1D module to measure")
    precisions = {role: recipe.role_default(role) for role in Role}
    params = [p for p in model.parameters() if p.requires_grad]
    sizes = [p.numel() for p in params]
    saved_grads = [p.grad for p in params]
    rng_state = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    try:
        with _SwappedSites(modules) as swap:
            sites, needs_grad = _discover(model, params, modules, precisions, batch_list[0], seed)
            skipped_reason = {(s.module, r): _unmeasurable(s, r, precisions[r], needs_grad[s.module])
                              for s in sites for r in Role}
            legal = {key: not why for key, why in skipped_reason.items()}
            probe = _OperandProbe({s.module: modules[s.module] for s in sites}, precisions, legal)
            refs, noise_floor = _reference(model, params, sizes, batch_list, seed, probe)

            parts = list(_parts(sites, blocks, per_site))
            site_of = {s.module: s for s in sites}
            entries: list[Sensitivity] = []
            with tqdm(total=len(parts) * len(batch_list), desc="fp4compile sensitivity", unit="pass",
                      disable=not progress) as bar:
                for scope, module, role, layer, fp4 in parts:
                    flops = sum(_flops(site_of[n], r, needs_grad[n]) for n, r in fp4)
                    wanted = [(n, r) for n, r in fp4 if not precisions[r].is_high]
                    runnable = [(n, r) for n, r in wanted if legal[(n, r)]]
                    if not runnable:
                        why = "; ".join(sorted({skipped_reason[k] for k in wanted if skipped_reason[k]}))
                        entries.append(Sensitivity(scope, module, role, layer, flops, skipped=why or
                                                   f"recipe {recipe.name} runs {role} in high precision"))
                        bar.update(len(batch_list))
                        continue
                    swap.precisions = {n: _precision(runnable, n, precisions) for n, _ in runnable}
                    measured = _measure(model, params, sizes, batch_list, seed, refs, bar)
                    swap.precisions = {}
                    lhs, rhs = (probe.results.get(f"{module}:{role}:{op}") if scope == Scope.ROLE.value else None
                                for op in ("lhs", "rhs"))
                    entries.append(Sensitivity(scope, module, role, layer, flops, **measured,
                                               sqnr_lhs_db=lhs.sqnr_db if lhs else None,
                                               sqnr_rhs_db=rhs.sqnr_db if rhs else None))
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
        torch.random.set_rng_state(rng_state)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)

    report = SensitivityReport(
        recipe=recipe.name, precisions={r.value: precisions[r].encode() for r in Role}, metric=metric,
        batches=len(batch_list), seed=seed, loss=sum(r.loss for r in refs) / len(refs), noise_floor=noise_floor,
        sites=sites, entries=tuple(_rank(entries, metric)), numerics=tuple(probe.results.values()))
    if out is not None:
        report.save(out)
    return report
