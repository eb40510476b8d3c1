"""Pass: find the stack of repeated blocks from the module paths, and the output head.

Reads: ``node.meta[SITE]``. Writes: ``node.meta[SITE]`` (with ``layer_index``, ``first_layer``,
``last_layer`` and ``is_output_head`` filled in).

The block stack is the module-path prefix followed by an integer (``transformer.h.<i>``) that holds the
most distinct indices among the graph's weight GEMMs; nothing about the model is hard-coded. The output
head is the last weight GEMM of the graph that lies outside the stack.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Optional

import torch.fx as fx

from .meta import SITE
from .subgraphs import all_graph_modules

__all__ = ["annotate_layers", "block_index"]

_INDEX = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")


def block_index(module: str) -> Optional[tuple[str, int]]:
    """``(stack prefix, index)`` of the first integer component of a module path, e.g.
    ``("transformer.h", 3)`` for ``transformer.h.3.mlp.c_fc``."""
    match = _INDEX.match(module)
    return (match.group(1), int(match.group(2))) if match else None


def annotate_layers(gm: fx.GraphModule) -> fx.GraphModule:
    nodes = sorted((n for g in all_graph_modules(gm) for n in g.graph.nodes if SITE in n.meta),
                   key=lambda n: n.meta[SITE].position)
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
