"""Pass: find the stacks of repeated blocks and the output head, and place every GEMM site in them.

Reads: ``node.meta[SITE]``, ``node.meta[SCOPES]`` (also on the nodes a site's result flows into, for the head);
``gm.meta[MODEL_STACKS]`` and ``gm.meta[PLACEMENT]`` when the backend knows the model. Writes: ``node.meta[SITE]`` (with ``stack``, ``layer_index``, ``first_layer``,
``last_layer`` and ``is_output_head`` filled in).

A block stack is found by structure, whatever the names: two or more modules of the same class that hold
submodules and are children of the same module (or single layers, when their parent is a container holding
nothing else: a ``ModuleList`` of ``Linear`` layers, but not ``mlp.0`` and ``mlp.3`` of ``Sequential(Linear,
GELU, Dropout, Linear)``, nor ``attn.c_attn`` and ``attn.c_proj``): a ``ModuleList`` such as
``transformer.h`` or ``model.layers``, a ``Sequential`` such as torchvision's ``encoder.layers`` (blocks named
``encoder_layer_<i>``), or the root of an ``nn.Sequential``. A model may hold several stacks (an encoder's and
a decoder's): each has its own first and last block. A site belongs to the outermost stack above it. Block
indices are the blocks' names when these are integers, else the integers they end in, else their order.
Without the model the stacks come from the modules the graph's nodes ran in (``nn_module_stack``), so a graph
holding part of a stack counts that part; with it (``gm.meta[MODEL_STACKS]``, from the model's
``named_modules()``) indices count against the model's whole stacks.

The output head is every weight GEMM outside the stacks that runs after a stack's last block and whose result
feeds no later stack, only the loss or an output (a language model's ``lm_head``; BERT's MLM transform and
decoder; a classifier's pooler and classifier; both projections of a two-tower model such as CLIP, whichever
tower runs last); a GEMM between two stacks that feeds the second (a bridge from an encoder to a decoder) is
not. In a graph with no stack, its last weight GEMM is the head.

`BlockPlacement` (``gm.meta[PLACEMENT]``) covers a graph traced from one block's own forward, which Dynamo
reuses for every block (per-block compile, FSDP2; see fp4compile/distributed.py): its sites get the block's
path and index.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Optional, Sequence

import torch.fx as fx

from .meta import MODEL_STACKS, SCOPES, SITE
from .subgraphs import all_graph_modules

__all__ = ["annotate_layers", "block_index", "BlockPlacement", "BlockStack", "PLACEMENT", "find_block_stacks",
           "place_sites"]

_INDEX = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")
_TRAILING_DIGITS = re.compile(r"(\d+)$")

#: ``gm.meta`` key (on the graph module, not a node) of the graph's `BlockPlacement`, when the backend knows it.
PLACEMENT = "fp4compile.placement"


@dataclasses.dataclass(frozen=True)
class BlockStack:
    """A stack of repeated blocks: the module holding them, and the blocks' names in order.

    Attributes:
        prefix: the path of the module that holds the blocks (``transformer.h``; ``""`` for the root).
        blocks: the blocks' names in that module (``("0", "1", ...)``, ``("encoder_layer_0", ...)``).
        block_class: the blocks' class name.
    """

    prefix: str
    blocks: tuple[str, ...]
    block_class: str = ""

    @property
    def count(self) -> int:
        return len(self.blocks)

    @property
    def label(self) -> str:
        """How reasons name the stack: its path, or ``(root)``."""
        return self.prefix or "(root)"

    def indices(self) -> dict[str, int]:
        """Each block's index: its name if all names are integers, else the distinct integers the names end
        in, else its position."""
        if all(name.isdigit() for name in self.blocks):
            return {name: int(name) for name in self.blocks}
        trailing = [_TRAILING_DIGITS.search(name) for name in self.blocks]
        if all(trailing) and len({int(m.group(1)) for m in trailing}) == len(self.blocks):
            return {name: int(m.group(1)) for name, m in zip(self.blocks, trailing)}
        return {name: i for i, name in enumerate(self.blocks)}


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


def block_index(module: str) -> Optional[tuple[str, int]]:
    """``(stack prefix, index)`` of the first integer component of a module path, e.g.
    ``("transformer.h", 3)`` for ``transformer.h.3.mlp.c_fc``."""
    match = _INDEX.match(module)
    return (match.group(1), int(match.group(2))) if match else None


def _split(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition(".")
    return parent, name


def find_block_stacks(blocks: Iterable[tuple[str, str]]) -> tuple[BlockStack, ...]:
    """The stacks among candidate blocks ``(module path, class name)``, given in model or graph order: the
    candidates are the modules that hold submodules and weights; two or more of one class under one parent
    make a stack."""
    groups: dict[tuple[str, str], list[str]] = {}
    for path, cls in blocks:
        if not path:
            continue
        parent, name = _split(path)
        names = groups.setdefault((parent, cls), [])
        if name not in names:
            names.append(name)
    return tuple(BlockStack(parent, tuple(names), cls) for (parent, cls), names in groups.items() if len(names) >= 2)


def _under(module: str, path: str) -> bool:
    return not path or module == path or module.startswith(path + ".")


def _in_stack(module: str, stack: BlockStack) -> bool:
    return any(_under(module, _join(stack.prefix, name)) for name in stack.blocks)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _without_containers(stacks: tuple[BlockStack, ...], modules: list[str]) -> tuple[BlockStack, ...]:
    """``stacks`` less those whose blocks only hold other stacks (T5's ``encoder`` and ``decoder``, two
    ``T5Stack``s: every GEMM site in them lies in ``encoder.block`` or ``decoder.block``), so that each inner
    stack counts its own first and last block. A stack of blocks that hold other GEMMs too (decoder layers
    holding a list of experts next to their attention) stays the outer stack."""
    kept = []
    for stack in stacks:
        inner = [other for other in stacks if other is not stack and _in_stack(other.prefix, stack)]
        sites = [m for m in modules if _in_stack(m, stack)]
        if inner and sites and all(any(_in_stack(m, other) for other in inner) for m in sites):
            continue
        kept.append(stack)
    return tuple(kept)


def _stack_of(module: str, stacks: dict[str, list[BlockStack]]) -> Optional[tuple[BlockStack, str]]:
    """The outermost stack whose block holds ``module`` (or is it), with the block's name."""
    parts = module.split(".") if module else []
    for end in range(1, len(parts) + 1):
        parent, name = ".".join(parts[: end - 1]), parts[end - 1]
        for stack in stacks.get(parent, ()):
            if name in stack.blocks:
                return stack, name
    return None


#: Module classes that only hold other modules: single layers directly in one of them can make a stack. A
#: ``ModuleList`` never runs, so a parent path absent from the graph's modules counts as one.
_CONTAINERS = ("ModuleList", "Sequential", "ModuleDict")


def _graph_blocks(nodes: list[fx.Node], gm: fx.GraphModule) -> list[tuple[str, str]]:
    """Candidate blocks from the graph: modules above a site, and a site's own module if other modules ran
    inside it or if it lies in a container whose modules that ran are all of its class (a ``ModuleList`` of
    ``Linear`` layers; not ``mlp.0`` of a ``Sequential`` that also holds an activation, nor ``attn.c_attn``
    next to ``attn.c_proj``), with the class Dynamo recorded."""
    classes: dict[str, str] = {}
    for graph in all_graph_modules(gm):
        for node in graph.graph.nodes:
            for path, cls in node.meta.get(SCOPES, ()):
                classes.setdefault(path, cls)
    holders = {path.rpartition(".")[0] for path in classes}
    sibling_classes: dict[str, set[str]] = {}
    for path, cls in classes.items():
        sibling_classes.setdefault(path.rpartition(".")[0], set()).add(cls)
    blocks: list[tuple[str, str]] = []
    for node in nodes:
        module = node.meta[SITE].module
        for path, cls in node.meta.get(SCOPES, ()):
            parent = path.rpartition(".")[0]
            if module.startswith(path + ".") or (path == module and (path in holders or (
                    classes.get(parent, _CONTAINERS[0]) in _CONTAINERS and sibling_classes[parent] == {cls}))):
                blocks.append((path, cls))
    return blocks


def annotate_layers(gm: fx.GraphModule) -> fx.GraphModule:
    nodes = sorted((n for g in all_graph_modules(gm) for n in g.graph.nodes if SITE in n.meta),
                   key=lambda n: n.meta[SITE].position)
    meta = getattr(gm, "meta", {})
    placement = meta.get(PLACEMENT)
    if placement is not None and placement.block is not None:
        _annotate_block(nodes, placement)
        return gm
    stacks = meta.get(MODEL_STACKS)
    if stacks is None and placement is not None:
        stacks = (BlockStack(placement.stack, tuple(str(i) for i in range(placement.count))),)
    if stacks is None:
        stacks = find_block_stacks(_graph_blocks(nodes, gm))
    stacks = tuple(stacks)
    places = place_sites([n.meta[SITE].module for n in nodes], stacks, _feeds_a_stack(nodes, gm, stacks))
    for node, place in zip(nodes, places):
        if place is not None:
            node.meta[SITE] = dataclasses.replace(node.meta[SITE], **place)
    return gm


def _feeds_a_stack(nodes: list[fx.Node], gm: fx.GraphModule, stacks: tuple[BlockStack, ...]) -> list[bool]:
    """For each site node, whether its result flows into a node that runs in a block of ``stacks`` (in the
    node's own graph; a site inside a checkpoint region counts as feeding none)."""
    by_parent: dict[str, list[BlockStack]] = {}
    for stack in stacks:
        by_parent.setdefault(stack.prefix, []).append(stack)
    feeds: dict[fx.Node, bool] = {}
    for node in reversed(list(gm.graph.nodes)):  # users come after their inputs
        in_block = any(_stack_of(path, by_parent) is not None for path, _ in node.meta.get(SCOPES, ()))
        feeds[node] = in_block or any(feeds.get(user, False) for user in node.users)
    return [any(feeds.get(user, False) for user in node.users) for node in nodes]


def place_sites(modules: Sequence[str], stacks: tuple[BlockStack, ...],
                feeds_a_stack: Optional[Sequence[bool]] = None) -> list[Optional[dict[str, Any]]]:
    """Where each of ``modules`` (GEMM sites' module paths, in call order) lies: for a site in a block of one of
    ``stacks``, its `GemmSite` fields ``stack``, ``layer_index``, ``first_layer`` and ``last_layer``; for a site of
    the output head, ``is_output_head=True``; else None. Containers of stacks give way to their inner stacks
    (`_without_containers`), so that each stack has its own first and last block.

    The head: with ``feeds_a_stack`` (per site, whether its result flows into a later stack's block), every site
    outside the stacks after the first site in a stack that feeds no stack, so each tower of a model has its
    head; without it, every site after the last one in a stack. The last site when no site is in a stack."""
    by_parent: dict[str, list[BlockStack]] = {}
    for stack in _without_containers(stacks, list(modules)):
        by_parent.setdefault(stack.prefix, []).append(stack)
    places: list[Optional[dict[str, Any]]] = [None] * len(modules)
    in_stack = []
    for i, module in enumerate(modules):
        found = _stack_of(module, by_parent)
        if found is None:
            continue
        stack, name = found
        indices = stack.indices()
        places[i] = dict(stack=stack.label, layer_index=indices[name], first_layer=min(indices.values()),
                         last_layer=max(indices.values()))
        in_stack.append(i)
    if not in_stack:
        heads = [len(modules) - 1] if modules else []
    elif feeds_a_stack is None:
        heads = list(range(in_stack[-1] + 1, len(modules)))
    else:
        heads = [i for i in range(in_stack[0] + 1, len(modules)) if places[i] is None and not feeds_a_stack[i]]
    for i in heads:
        places[i] = dict(is_output_head=True)
    return places


def _annotate_block(nodes: list[fx.Node], placement: BlockPlacement) -> None:
    """`annotate_layers` for a graph traced from one block's forward: every site lies in block
    ``placement.block`` of the model's stack (``first_layer`` 0, ``last_layer`` ``count - 1``), and the graph
    holds no output head."""
    prefix = str(placement.block) if placement.stack == "(root)" else f"{placement.stack}.{placement.block}"
    for node in nodes:
        site = node.meta[SITE]
        if not (site.module == prefix or site.module.startswith(prefix + ".")):  # not yet named from the model
            site = dataclasses.replace(site, module=f"{prefix}.{site.module}" if site.module else prefix,
                                       weight=f"{prefix}.{site.weight}")
        node.meta[SITE] = dataclasses.replace(site, stack=placement.stack, layer_index=placement.block,
                                              first_layer=0, last_layer=placement.count - 1)
