"""Policies: data that maps a GEMM site and role to a precision, with the reason.

A policy is anything with ``decide(site, role) -> Decision`` (and optionally a ``schedule``). `Recipe` is the
built-in one: a frozen dataclass holding the three role precisions of a recipe plus the rules that keep some
sites in high precision. See `fp4compile.recipes` for the published recipes.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from typing import Optional, Protocol, Sequence, runtime_checkable

from .precision import HIGH, Decision, GemmPrecision, Role
from .schedule import PhaseSource
from .site import GemmSite

__all__ = ["Policy", "Rule", "Recipe", "unmatched_patterns"]


@runtime_checkable
class Policy(Protocol):
    """What the compiler asks a policy: the precision of ``site`` in ``role``, with a reason."""

    def decide(self, site: GemmSite, role: Role) -> Decision: ...


@dataclasses.dataclass(frozen=True)
class Rule:
    """Give ``precision`` to the sites and roles that match every criterion given.

    Args:
        precision: what matching sites get (high precision by default).
        modules: glob patterns over the module path (``"*.attn.*"``) or weight name; any may match.
        layers: block indices (negative counts from the last block).
        roles: roles the rule applies to; all roles when empty.
        name: shown as the reason; derived from the criteria when empty.
    """

    precision: GemmPrecision = HIGH
    modules: tuple[str, ...] = ()
    layers: tuple[int, ...] = ()
    roles: tuple[Role, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.modules, str):
            object.__setattr__(self, "modules", (self.modules,))
        object.__setattr__(self, "modules", tuple(self.modules))
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        object.__setattr__(self, "roles", tuple(Role(r) for r in self.roles))
        if not isinstance(self.precision, GemmPrecision):
            raise TypeError(f"Rule: precision must be a GemmPrecision, got {type(self.precision).__name__}")

    def matches(self, site: GemmSite, role: Role) -> bool:
        if self.roles and role not in self.roles:
            return False
        if self.modules and not any(
            fnmatch.fnmatchcase(site.module, p) or fnmatch.fnmatchcase(site.weight, p) for p in self.modules
        ):
            return False
        if self.layers:
            if site.layer_index is None or site.last_layer is None:
                return False
            count = site.last_layer + 1
            if not any(site.layer_index == (i if i >= 0 else count + i) for i in self.layers):
                return False
        return True

    def describe(self) -> str:
        if self.name:
            return self.name
        parts = []
        if self.modules:
            parts.append("modules " + ",".join(self.modules))
        if self.layers:
            parts.append("layers " + ",".join(map(str, self.layers)))
        if self.roles:
            parts.append("roles " + ",".join(r.value for r in self.roles))
        return f"user rule ({'; '.join(parts) or 'all sites'}) -> {self.precision.precision}"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A training recipe: the precision of each role, and which sites stay in high precision.

    Decisions are taken in this order: user ``rules`` (first match wins), the output head (high precision
    unless ``quantize_output_head``), the first and last blocks of each block stack, then the role default.
    """

    name: str
    forward: GemmPrecision
    input_grad: GemmPrecision
    weight_grad: GemmPrecision
    high_precision_first_blocks: int = 0
    high_precision_last_blocks: int = 0
    quantize_output_head: bool = False
    rules: tuple[Rule, ...] = ()
    schedule: Optional[PhaseSource] = None

    def __post_init__(self) -> None:
        for field in ("high_precision_first_blocks", "high_precision_last_blocks"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"Recipe {self.name!r}: {field} must be an int >= 0, got {value!r}")
        object.__setattr__(self, "rules", tuple(self.rules))

    def role_default(self, role: Role) -> GemmPrecision:
        return {Role.FORWARD: self.forward, Role.INPUT_GRAD: self.input_grad, Role.WEIGHT_GRAD: self.weight_grad}[role]

    def decide(self, site: GemmSite, role: Role) -> Decision:
        for rule in self.rules:
            if rule.matches(site, role):
                return Decision(rule.precision, rule.describe())
        default = self.role_default(role)
        if default.is_high:
            return Decision(HIGH, f"recipe {self.name}: {role.value} runs in high precision")
        if site.is_output_head and not self.quantize_output_head:
            return Decision(HIGH, "output head stays in high precision (docs/numerics.md section 3.4)")
        if site.layer_index is not None and site.first_layer is not None and site.last_layer is not None:
            of = f" of {site.stack}" if site.stack else ""
            if site.layer_index - site.first_layer < self.high_precision_first_blocks:
                return Decision(HIGH, f"first {self.high_precision_first_blocks} block(s){of} stay in high precision "
                                        "(docs/numerics.md section 3.4)")
            if site.last_layer - site.layer_index < self.high_precision_last_blocks:
                return Decision(HIGH, f"last {self.high_precision_last_blocks} block(s){of} stay in high precision "
                                        "(docs/numerics.md section 3.4)")
        return Decision(default, f"recipe {self.name}: {role.value}")

    def with_rules(self, *rules: Rule) -> "Recipe":
        """A copy with ``rules`` tried before the existing ones."""
        return dataclasses.replace(self, rules=tuple(rules) + self.rules)

    def with_schedule(self, schedule: Optional[PhaseSource]) -> "Recipe":
        return dataclasses.replace(self, schedule=schedule)


def high_precision_rules(
    modules: Sequence[str] = (), layers: Sequence[int] = (), roles: Sequence["Role | str"] = ()
) -> tuple[Rule, ...]:
    """The rules behind the ``high_precision*`` arguments of the recipe constructors."""
    rules = []
    if modules:
        rules.append(Rule(HIGH, modules=tuple(modules), name=f"high_precision modules {', '.join(modules)}"))
    if layers:
        rules.append(Rule(HIGH, layers=tuple(layers), name=f"high_precision layers {', '.join(map(str, layers))}"))
    if roles:
        names = ", ".join(Role(r).value for r in roles)
        rules.append(Rule(HIGH, roles=tuple(Role(r) for r in roles), name=f"high_precision roles {names}"))
    return tuple(rules)


def unmatched_patterns(patterns: Sequence[str], paths: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The glob ``patterns`` (a `Rule`'s ``modules``) that match none of ``paths`` (module paths and weight
    names), each with the nearest paths (by `difflib`): a pattern written with other names than the sites'
    is reported instead of silently matching nothing."""
    unmatched = []
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(path, pattern) for path in paths):
            unmatched.append((pattern, difflib.get_close_matches(pattern, sorted(set(paths)), n=3, cutoff=0.3)))
    return unmatched
