"""Pass: ask the policy for the precision of every GEMM site in every role, and apply the schedule's phase.

Reads: ``node.meta[SITE]``. Writes: ``node.meta[DECISIONS]`` (``dict[Role, Decision]``).
"""

from __future__ import annotations

import torch.fx as fx

from ..policy.precision import HIGH, Decision, Role
from ..policy.recipe import Policy
from ..policy.schedule import FP4_PHASE, Phase
from .subgraphs import all_graph_modules
from .meta import DECISIONS, SITE

__all__ = ["assign_precision"]


def assign_precision(gm: fx.GraphModule, policy: Policy, phase: Phase = FP4_PHASE) -> fx.GraphModule:
    for node in (n for g in all_graph_modules(gm) for n in g.graph.nodes):
        site = node.meta.get(SITE)
        if site is None:
            continue
        decisions = {}
        for role in Role:
            if role is Role.WEIGHT_GRAD and not site.trainable:
                decisions[role] = Decision(HIGH, "frozen weight: no weight-gradient GEMM runs")
                continue
            if role in phase.high_precision_roles:
                decisions[role] = Decision(HIGH, f"schedule: phase {phase.name!r} from step {phase.start_step}")
                continue
            if (site.module, role) in phase.high_precision_sites:
                decisions[role] = Decision(HIGH, f"schedule: phase {phase.name!r} keeps this site's {role.value} "
                                                 f"in high precision")
                continue
            decision = policy.decide(site, role)
            if not isinstance(decision, Decision):
                raise TypeError(
                    f"policy {type(policy).__name__}.decide({site.module!r}, {role.value!r}) must return a "
                    f"fp4compile.Decision, got {type(decision).__name__}"
                )
            decisions[role] = decision
        node.meta[DECISIONS] = decisions
    return gm
