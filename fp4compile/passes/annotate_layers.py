"""Pass: find the stack of repeated blocks from the module paths, and the output head.

Reads: ``node.meta[SITE]``. Writes: ``node.meta[SITE]`` (with ``layer_index``, ``first_layer``,
``last_layer`` and ``is_output_head`` filled in).

The block stack is the module-path prefix followed by an integer (``transformer.h.<i>``) that holds the
most distinct indices among the graph's weight GEMMs; nothing about the model is hard-coded. The output
head is the last weight GEMM of the graph that lies outside the stack.

When the backend knows the model (``fp4compile.backend(model=...)``) it puts a `BlockPlacement` in
``gm.meta[PLACEMENT]``: the stack and its length come from the model instead of the graph, which matters when
Dynamo hands the model over in parts (per-block compile, FSDP2, DDP's bucket splits; see
fp4compile/distributed.py).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Optional

import torch.fx as fx

from .meta import SITE
from .subgraphs import all_graph_modules

__all__ = ["annotate_layers", "block_index", "BlockPlacement", "PLACEMENT"]

_INDEX = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")

#: ``gm.meta`` key (on the graph module, not a node) of the graph's `BlockPlacement`, when the backend knows it.
PLACEMENT = "fp4compile.placement"


@dataclasses.dataclass(frozen=True)
class BlockPlacement:
    """Where one graph lies in its model's block stack, known from the model rather than from the graph.

    Attributes:
        stack: the stack's module-path prefix in the model, e.g. ``transformer.h``.
        count: the number of blocks in the stack (the last block is ``count - 1``).
        block: for a graph traced from one block's own forward (its module paths start inside the block,
            ``attn.c_attn``), that block's index: its sites get the path ``<stack>.<block>.`` prepended. None
            when the graph's module paths start at the model's root.
    """

    stack: str
    count: int
    block: Optional[int] = None

    def __post_init__(self) -> None:
        if not self.stack or self.count < 1:
            raise ValueError(f"BlockPlacement: expected a stack prefix and count >= 1, got {self.stack!r}, {self.count}")
        if self.block is not None and not 0 <= self.block < self.count:
            raise ValueError(f"BlockPlacement: block must lie in [0, {self.count}), got {self.block}")

    def in_stack(self, prefix: str) -> bool:
        """Whether a graph's stack prefix names this stack: equal, or one ends the other at a component boundary
        (a wrapper such as DDP's ``module.`` appears in the model's paths but not in Dynamo's, or the reverse)."""
        return prefix == self.stack or prefix.endswith("." + self.stack) or self.stack.endswith("." + prefix)


def block_index(module: str) -> Optional[tuple[str, int]]:
    """``(stack prefix, index)`` of the first integer component of a module path, e.g.
    ``("transformer.h", 3)`` for ``transformer.h.3.mlp.c_fc``."""
    match = _INDEX.match(module)
    return (match.group(1), int(match.group(2))) if match else None


def annotate_layers(gm: fx.GraphModule) -> fx.GraphModule:
    nodes = sorted((n for g in all_graph_modules(gm) for n in g.graph.nodes if SITE in n.meta),
                   key=lambda n: n.meta[SITE].position)
    placement = getattr(gm, "meta", {}).get(PLACEMENT)
    if placement is not None:
        return _annotate_placed(gm, nodes, placement)
    indices: dict[str, set[int]] = collections.defaultdict(set)
    for node in nodes:
        found = block_index(node.meta[SITE].module)
        if found:
            indices[found[0]].add(found[1])
    stack = max(indices, key=lambda p: len(indices[p]), default=None)
    first = min(indices[stack]) if stack is not None else None
    last = max(indices[stack]) if stack is not None else None
    head: Optional[fx.Node] = None
    for node in nodes:
        site = node.meta[SITE]
        found = block_index(site.module)
        if found and found[0] == stack:
            node.meta[SITE] = dataclasses.replace(site, layer_index=found[1], first_layer=first, last_layer=last)
        else:
            head = node
    if head is not None and nodes and head is nodes[-1]:
        head.meta[SITE] = dataclasses.replace(head.meta[SITE], is_output_head=True)
    return gm


def _annotate_placed(gm: fx.GraphModule, nodes: list[fx.Node], placement: BlockPlacement) -> fx.GraphModule:
    """`annotate_layers` with the stack taken from ``placement``: block indices count against the model's
    whole stack (``first_layer`` 0, ``last_layer`` ``count - 1``), whatever part of it the graph holds."""
    head: Optional[fx.Node] = None
    for node in nodes:
        site = node.meta[SITE]
        if placement.block is not None:
            prefix = f"{placement.stack}.{placement.block}"
            site = dataclasses.replace(site, module=f"{prefix}.{site.module}" if site.module else prefix,
                                       weight=f"{prefix}.{site.weight}")
        found = block_index(site.module)
        if found and placement.in_stack(found[0]) and found[1] < placement.count:
            site = dataclasses.replace(site, layer_index=found[1], first_layer=0, last_layer=placement.count - 1)
        else:
            head = node
        node.meta[SITE] = site
    # A graph traced from one block's forward holds no output head, whatever its last GEMM is.
    if placement.block is None and head is not None and nodes and head is nodes[-1]:
        head.meta[SITE] = dataclasses.replace(head.meta[SITE], is_output_head=True)
    return gm
