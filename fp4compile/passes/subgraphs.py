"""Graphs nested in higher-order ops: ``torch.utils.checkpoint`` regions become
``higher_order.tag_activation_checkpoint(body, *operands)`` with the region's code in the submodule ``body``.
The passes visit such bodies like the top graph; a body's placeholders stand for the operands of the call.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import torch
import torch.fx as fx

__all__ = ["nested_body", "operand_examples", "all_graph_modules", "SUPPORTED_HIGHER_ORDER_OPS"]

#: Higher-order ops whose body the passes rewrite, and the index of the first operand in their arguments.
SUPPORTED_HIGHER_ORDER_OPS = {"tag_activation_checkpoint": 1}


def _hop_name(node: fx.Node) -> Optional[str]:
    if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
        return node.target.__name__
    return None


def nested_body(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple[str, fx.GraphModule]]:
    """``(higher-order op name, body)`` if ``node`` calls a higher-order op with a GraphModule body."""
    name = _hop_name(node)
    if name is None or not node.args or not isinstance(node.args[0], fx.Node) or node.args[0].op != "get_attr":
        return None
    body = getattr(gm, str(node.args[0].target), None)
    return (name, body) if isinstance(body, fx.GraphModule) else None


def operand_examples(node: fx.Node, name: str, examples: dict[fx.Node, Any]) -> list[Any]:
    """Example values for the body's placeholders: the outer examples of the call's operands."""
    first = SUPPORTED_HIGHER_ORDER_OPS[name]
    return [examples.get(a) if isinstance(a, fx.Node) else None for a in node.args[first:]]


def all_graph_modules(gm: fx.GraphModule) -> Iterator[fx.GraphModule]:
    """``gm`` and every supported nested body, depth first in graph order."""
    yield gm
    for node in gm.graph.nodes:
        found = nested_body(gm, node)
        if found and found[0] in SUPPORTED_HIGHER_ORDER_OPS:
            yield from all_graph_modules(found[1])


def copy_nested_bodies(gm: fx.GraphModule, copy_fn) -> None:
    """Replace every GraphModule body that ``gm`` references by ``copy_fn(body)``, so rewriting a copy never
    touches the original (``copy_fn`` copies deeper bodies in turn)."""
    for node in gm.graph.nodes:
        found = nested_body(gm, node)
        if found:
            setattr(gm, str(node.args[0].target), copy_fn(found[1]))


def examples_by_node(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> dict[fx.Node, Any]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return dict(zip(placeholders, example_inputs))
