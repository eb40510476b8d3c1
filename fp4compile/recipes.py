"""The built-in recipes (docs/numerics.md sections 3-4) as `Recipe` policies.

>>> policy = fp4compile.recipes.nvfp4(high_precision=["*.attn.*"])
>>> model = torch.compile(model, backend=fp4compile.backend(policy=policy))
"""

from __future__ import annotations

import glob
from typing import TYPE_CHECKING, Optional, Sequence

from .numerics.formats import MXFP4, NVFP4, Fp4Format
from .policy.precision import HIGH, GemmPrecision, OperandPrecision, Role
from .policy.recipe import Recipe, Rule, high_precision_rules
from .policy.schedule import PhaseSource

if TYPE_CHECKING:
    from .inspect.sensitivity import SensitivityReport

__all__ = ["nvfp4", "fp4_all_the_way", "mxfp4", "high_precision", "nv_recipe_precisions", "from_name", "RECIPE_NAMES",
           "from_sensitivity", "high_precision_flop_fraction"]

RN, SR = "nearest", "stochastic"


def nv_recipe_precisions(fmt: Fp4Format = NVFP4) -> tuple[GemmPrecision, GemmPrecision, GemmPrecision]:
    """The three GEMMs of the NV recipe (docs/numerics.md section 3) in format ``fmt``.

    forward: x 1xB round-to-nearest, W BxB 2D round-to-nearest; input_grad: dy 1xB stochastic, the same 2D W;
    weight_grad: dy^T and x^T through the 16-point RHT, 1xB along tokens, dy^T stochastic, x^T nearest.
    """
    b = fmt.block_size
    weight_2d = OperandPrecision(fmt, (b, b), RN)
    forward = GemmPrecision(OperandPrecision(fmt, (1, b), RN), weight_2d)
    input_grad = GemmPrecision(OperandPrecision(fmt, (1, b), SR), weight_2d)
    weight_grad = GemmPrecision(OperandPrecision(fmt, (1, b), SR, True), OperandPrecision(fmt, (1, b), RN, True))
    return forward, input_grad, weight_grad


def _recipe(name, precisions, first, last, high_precision, high_precision_layers, high_precision_roles,
            rules, quantize_output_head, schedule) -> Recipe:
    forward, input_grad, weight_grad = precisions
    all_rules = tuple(rules) + high_precision_rules(high_precision, high_precision_layers, high_precision_roles)
    return Recipe(name, forward, input_grad, weight_grad, first, last, quantize_output_head, all_rules, schedule)


def nvfp4(
    high_precision_first_blocks: int = 1,
    high_precision_last_blocks: int = 1,
    high_precision: Sequence[str] = (),
    high_precision_layers: Sequence[int] = (),
    high_precision_roles: Sequence["Role | str"] = (),
    rules: Sequence[Rule] = (),
    quantize_output_head: bool = False,
    schedule: Optional[PhaseSource] = None,
) -> Recipe:
    """The NV recipe (the default policy; docs/numerics.md section 3).

    Args:
        high_precision_first_blocks, high_precision_last_blocks: blocks of each block stack whose linears stay
            in high precision (NV kept the first 2 and last 8 of 62, about 15%).
        high_precision: module-path globs kept in high precision, e.g. ``["*.attn.*"]``.
        high_precision_layers: block indices kept in high precision (negative counts from the end).
        high_precision_roles: roles kept in high precision everywhere, e.g. ``["weight_grad"]``.
        rules: further `Rule` overrides, tried first.
        quantize_output_head: quantize the output head too (it stays high precision by default).
        schedule: e.g. `fp4compile.schedules.late_switch`.
    """
    return _recipe("nvfp4", nv_recipe_precisions(NVFP4), high_precision_first_blocks, high_precision_last_blocks,
                   high_precision, high_precision_layers, high_precision_roles, rules, quantize_output_head, schedule)


def mxfp4(
    high_precision_first_blocks: int = 1,
    high_precision_last_blocks: int = 1,
    high_precision: Sequence[str] = (),
    high_precision_layers: Sequence[int] = (),
    high_precision_roles: Sequence["Role | str"] = (),
    rules: Sequence[Rule] = (),
    quantize_output_head: bool = False,
    schedule: Optional[PhaseSource] = None,
) -> Recipe:
    """The NV recipe's structure in MXFP4 (32-element blocks, power-of-two scales, no tensor scale); NV's
    comparison point (1.5% vs 2.5% loss gap to BF16 at 8B, docs/numerics.md section 3)."""
    return _recipe("mxfp4", nv_recipe_precisions(MXFP4), high_precision_first_blocks, high_precision_last_blocks,
                   high_precision, high_precision_layers, high_precision_roles, rules, quantize_output_head, schedule)


def fp4_all_the_way(
    high_precision_first_blocks: int = 0,
    high_precision_last_blocks: int = 0,
    high_precision: Sequence[str] = (),
    high_precision_layers: Sequence[int] = (),
    high_precision_roles: Sequence["Role | str"] = (),
    rules: Sequence[Rule] = (),
    quantize_output_head: bool = False,
    schedule: Optional[PhaseSource] = None,
) -> Recipe:
    """FATW (docs/numerics.md section 4): NVFP4, 1D blocks along each GEMM's reduction axis (weights quantized once per
    orientation), round-to-nearest forward, stochastic rounding for the gradient operands of both backward
    GEMMs and for the activation of the weight-gradient GEMM, no Hadamard transform."""
    b = NVFP4.block_size
    rn = OperandPrecision(NVFP4, (1, b), RN)
    sr = OperandPrecision(NVFP4, (1, b), SR)
    precisions = (GemmPrecision(rn, rn), GemmPrecision(sr, rn), GemmPrecision(sr, sr))
    return _recipe("fp4_all_the_way", precisions, high_precision_first_blocks, high_precision_last_blocks,
                   high_precision, high_precision_layers, high_precision_roles, rules, quantize_output_head, schedule)


def high_precision() -> Recipe:
    """Every GEMM in high precision: the control that changes nothing."""
    return Recipe("high_precision", HIGH, HIGH, HIGH)


#: The names `from_name` accepts: the constructors above.
_CONSTRUCTORS = {"nvfp4": nvfp4, "fp4_all_the_way": fp4_all_the_way, "mxfp4": mxfp4, "high_precision": high_precision}
RECIPE_NAMES: tuple[str, ...] = tuple(_CONSTRUCTORS)


def from_name(name: str, **kwargs) -> Recipe:
    """The built-in recipe called ``name`` (one of `RECIPE_NAMES`), built with ``kwargs``.

    This is what a policy given as a string means: ``torch.compile(model, backend="fp4",
    options={"policy": "fp4_all_the_way"})`` and ``fp4compile.backend(policy="nvfp4")``.

    >>> from_name("nvfp4", high_precision=["*.attn.*"])
    """
    if not isinstance(name, str):
        raise TypeError(f"fp4compile.recipes.from_name: name must be a str, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    if key not in RECIPE_NAMES:
        raise ValueError(f"unknown recipe name {name!r}: fp4compile.recipes has {', '.join(RECIPE_NAMES)} "
                         f"(or pass a policy object, e.g. fp4compile.recipes.nvfp4(...))")
    return _CONSTRUCTORS[key](**kwargs)


def high_precision_flop_fraction(report: "SensitivityReport", policy: Optional[Recipe] = None) -> float:
    """The fraction of a model's linear-layer FLOPs (all sites, all roles, as measured in ``report``) that
    ``policy`` keeps in high precision; by default the NV recipe's rule (first and last block and the output
    head high). Gives `from_sensitivity` the same budget as a hand-written rule."""
    return report.high_precision_fraction(policy if policy is not None else nvfp4())


def from_sensitivity(report: "SensitivityReport", budget: float, granularity: str = "role",
                     metric: Optional[str] = None, name: str = "sensitivity") -> Recipe:
    """A policy that keeps the most FP4-sensitive parts of a model in high precision within a FLOP budget.

    Parts (a site in one role, or a site with all its roles for ``granularity="site"``) are taken in the order
    of ``report`` ranked by ``metric``; each is kept in high precision if its FLOPs still fit in ``budget``
    (the fraction of ``report.total_flops``), else it runs in FP4. Parts the report could not measure (a shape
    the format cannot block) run in high precision in any case and count against the budget first. Every site
    and role of the report gets a rule whose name, shown as the reason in the precision table, gives its rank
    and measured values; sites the report does not hold get the recipe's role precisions (the output head
    high).

    Args:
        report: a `fp4compile.inspect.sensitivity.SensitivityReport` (`fp4compile.sensitivity`).
        budget: fraction in [0, 1] of the linear-layer FLOPs kept in high precision, e.g.
            ``high_precision_flop_fraction(report)`` for the NV recipe's first-and-last-block rule.
        granularity: ``"role"`` (decide each site and role) or ``"site"`` (all three roles of a site together).
        metric: the ranking metric (default: the report's).
        name: the recipe's name.
    """
    if not isinstance(budget, (int, float)) or not 0.0 <= budget <= 1.0:
        raise ValueError(f"from_sensitivity: budget must be a fraction in [0, 1] of the linear-layer FLOPs, got {budget!r}")
    if granularity not in ("role", "site"):
        raise ValueError(f"from_sensitivity: granularity must be 'role' or 'site', got {granularity!r}")
    metric = metric or report.metric
    roles = {r: report.role_precision(r) for r in Role}
    role_entries = {(e.module, e.role): e for e in report.entries if e.scope == "role"}
    total = report.total_flops
    allowed = budget * total
    spent = 0
    decisions: dict[tuple[str, Role], tuple[GemmPrecision, str]] = {}

    for e in role_entries.values():  # high precision whatever the budget: the recipe or the format keeps them
        role = Role(e.role)
        if not e.measured:
            spent += e.flops
            decisions[(e.module, role)] = (HIGH, f"sensitivity: high precision, {e.describe()}")

    ranked = report.ranked(granularity, metric)
    if granularity == "site" and not ranked and any(e.measured for e in role_entries.values()):
        raise ValueError("from_sensitivity: granularity='site' needs a report measured with per_site=True")
    count = len(ranked)
    for rank, e in enumerate(ranked, start=1):
        members = [Role(e.role)] if granularity == "role" else [r for r in Role if (e.module, r) not in decisions]
        flops = sum(role_entries[(e.module, r.value)].flops for r in members)
        where = f"rank {rank}/{count} by {metric}: {e.describe()}"
        if spent + flops <= allowed:
            spent += flops
            for r in members:
                decisions[(e.module, r)] = (HIGH, f"sensitivity: kept high, {where}")
        else:
            for r in members:
                reason = f"sensitivity: {roles[r].precision}, {where}; the {budget:.1%} high-precision budget is spent"
                decisions[(e.module, r)] = (roles[r], reason)
    rules = []
    for site in report.sites:
        for role in Role:
            precision, reason = decisions[(site.module, role)]
            rules.append(Rule(precision, modules=(glob.escape(site.module),), roles=(role,), name=reason))
    return Recipe(name, roles[Role.FORWARD], roles[Role.INPUT_GRAD], roles[Role.WEIGHT_GRAD], rules=tuple(rules))
