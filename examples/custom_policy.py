"""Write your own precision policy: a class with ``decide(site, role) -> Decision``.

This one quantizes only the MLP of each block (the NV recipe's operands), keeps attention projections and
narrow layers in high precision, and says why for each. Run it to see the precision table of one step.
"""

from __future__ import annotations

import os
import sys

import torch

import fp4compile
from fp4compile import HIGH, Decision, GemmSite, Role
from fp4compile.recipes import nv_recipe_precisions

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt import GPT, GPTConfig  # noqa: E402


class MlpOnly:
    """MLP linears in NVFP4 (NV recipe operands), everything else in high precision."""

    def __init__(self, min_features: int = 64) -> None:
        self.min_features = min_features
        self.precisions = dict(zip(Role, nv_recipe_precisions()))

    def decide(self, site: GemmSite, role: Role) -> Decision:
        if ".mlp." not in site.module:
            return Decision(HIGH, "custom: only MLP linears are quantized")
        if min(site.in_features, site.out_features) < self.min_features:
            return Decision(HIGH, f"custom: narrower than {self.min_features} features")
        return Decision(self.precisions[role], f"custom: MLP {role.value} in NVFP4")


def main() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64))
    backend = fp4compile.backend(policy=MlpOnly(), inner="aot_eager")
    compiled = torch.compile(model, backend=backend)
    idx = torch.randint(0, 256, (4, 64))
    compiled(idx, idx).backward()
    print(f"{'module':28s} {'role':12s} {'precision':9s} reason")
    for row in backend.rows():
        print(f"{row.module:28s} {row.role:12s} {row.precision:9s} {row.reason}")


if __name__ == "__main__":
    main()
