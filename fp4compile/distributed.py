"""fp4compile across processes: FSDP2 (``fully_shard``) and DistributedDataParallel.

    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    model = torch.compile(model, backend="fp4", options={"model": model})     # or compile each block

Giving the backend the model (`ModelLayout`): Dynamo does not always hand the backend the whole model in one
graph. FSDP2's hooks are excluded from tracing, so a whole-model compile breaks at every sharded block and
Dynamo compiles each block's forward as a graph of its own, whose module paths start inside the block
(``attn.c_attn``) and which it then reuses for every block of the same shape; per-block ``torch.compile``
does the same; DDP's graph splitting (``optimize_ddp``) cuts the model at bucket boundaries. A recipe that
treats the first and last blocks differently (the NV recipe) cannot be applied from such a graph alone. With
the model, the backend knows the block stack (prefix and length) and, for a graph traced from one block's
forward, which block each call runs: it compiles one variant per block, picked at call time by the identity of
the block's weights (`GraphRoute`), so every block gets the precisions and precision-table rows that a
whole-model compile in one process gives.

What FSDP2 hands the compiled graph: the unsharded weights as plain tensors (FSDP2 all-gathers them in its
pre-forward hook, outside the graph), not DTensors. Each rank therefore quantizes the full weight, with the
full weight's amax: every rank gets the same codes and scales.

Stochastic-rounding keys per rank (`rank_key_salt`): every quantization draws its Philox key from torch's
generator, and ranks are usually seeded alike, so without more they would round with the same noise. The key
is XOR-ed with a constant derived from the process's global rank; rank 0, and any process without an
initialized process group, keeps the drawn key unchanged, so single-process runs are bit for bit what they
were. The rank is a Python int read when the op is traced, so the fold is one tensor op on the drawn key
(nothing reaches the host, and CUDA-graph capture still works).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import weakref
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx

from .passes.annotate_layers import BlockPlacement, BlockStack, find_block_stacks
from .passes.find_gemms import module_path, unwrapped_path

__all__ = ["process_rank", "rank_key_salt", "BlockStack", "find_block_stack", "model_block_stacks", "ModelLayout",
           "model_layout",
           "GraphRoute", "route_graph", "split_warning", "unplaced_warning"]

logger = logging.getLogger(__name__)

# An odd constant (2^64 / golden ratio): multiplying by it is a bijection modulo any power of two, so distinct
# ranks get distinct salts; masked to the 62 bits that keys are drawn in, so a salted key stays in range.
_GOLDEN = 0x9E3779B97F4A7C15
_KEY_BITS = 62


def process_rank() -> int:
    """This process's global rank, or 0 when torch.distributed is unavailable or not initialized."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 0
    return torch.distributed.get_rank()


def rank_key_salt(rank: int | None = None) -> int:
    """The constant XOR-ed into every stochastic-rounding key on ``rank`` (default: this process's rank).

    0 for rank 0 (keys unchanged); distinct and in ``[0, 2**62)`` for every other rank, so a salted key is
    still a valid key and no two ranks of a run share one.
    """
    rank = process_rank() if rank is None else rank
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"rank must be an int >= 0, got {rank!r}")
    return (rank * _GOLDEN) & ((1 << _KEY_BITS) - 1)


#: Classes that wrap one module under a `fp4compile.passes.find_gemms.WRAPPER_COMPONENTS` name.
_WRAPPER_CLASSES = frozenset({"OptimizedModule", "CheckpointWrapper", "FullyShardedDataParallel"})


def _root(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose ``named_modules()`` names the user means: the model itself, or the one a
    DistributedDataParallel, FSDP1 or torch.compile wrapper at the root holds."""
    while isinstance(getattr(model, "module", None), torch.nn.Module) and type(model).__name__ in (
            "DistributedDataParallel", "FullyShardedDataParallel"):
        model = model.module
    return getattr(model, "_orig_mod", model)


def model_block_stacks(model: torch.nn.Module) -> tuple[BlockStack, ...]:
    """Every block stack of ``model``, by structure (`fp4compile.passes.annotate_layers.find_block_stacks`):
    the candidates are the modules that hold a 2-D parameter and submodules (or lie in a container whose other
    modules are all of their class), named as ``named_modules()``
    names them without wrapper components, each as the module it wraps (a compiled or checkpoint-wrapped
    block counts as the block)."""
    holds_weight: set[str] = set()
    for name, param in _root(model).named_parameters(remove_duplicate=False):
        if param.ndim == 2:
            parts = unwrapped_path(name).split(".")[:-1]
            holds_weight.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    containers = {unwrapped_path(name) for name, module in _root(model).named_modules()
                  if isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict))}
    inner: dict[str, tuple[str, bool]] = {}
    for name, module in _root(model).named_modules():
        if type(module).__name__ in _WRAPPER_CLASSES:
            continue
        inner[unwrapped_path(name)] = (type(module).__qualname__, any(True for _ in module.children()))
    sibling_classes: dict[str, set[str]] = {}
    for path, (cls, _) in inner.items():
        if path:
            sibling_classes.setdefault(path.rpartition(".")[0], set()).add(cls)
    # Blocks hold submodules; single layers make a stack only in a container that holds nothing else.
    return find_block_stacks((path, cls) for path, (cls, has_children) in inner.items()
                             if path and path in holds_weight and (has_children or (
                                 path.rpartition(".")[0] in containers
                                 and sibling_classes[path.rpartition(".")[0]] == {cls})))


def _largest_stack(stacks: Sequence[BlockStack]) -> Optional[BlockStack]:
    """The first of the largest of ``stacks``, or None: the stack that per-block compiles and FSDP2 route calls
    in (`GraphRoute`)."""
    return max(stacks, key=lambda s: s.count) if stacks else None


def find_block_stack(model: torch.nn.Module) -> Optional[BlockStack]:
    """The largest block stack of ``model`` (the first of the largest), or None."""
    return _largest_stack(model_block_stacks(model))


class ModelLayout:
    """What the backend knows about the model it compiles: its block stack, and which block a tensor is a
    parameter of (by identity: FSDP2 swaps its unsharded parameters into the modules for the forward, and
    keeps the same tensor objects from step to step, so the map is rebuilt only when a tensor is new).

    The model is held weakly: a layout does not keep a model alive.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._model = weakref.ref(model)
        self.stacks = model_block_stacks(model)
        self.stack = _largest_stack(self.stacks)
        self._owners: dict[int, tuple[weakref.ref, Optional[int]]] = {}
        self._names: dict[int, tuple[weakref.ref, tuple[str, ...]]] = {}

    def __repr__(self) -> str:
        return f"ModelLayout({self.stacks})"

    @property
    def model(self) -> Optional[torch.nn.Module]:
        """The model (its root module, without DDP/FSDP1/compile wrappers), or None once it is gone."""
        model = self._model()
        return _root(model) if model is not None else None

    def _rescan(self) -> None:
        """Add the model's current parameters to the maps. Entries are kept, not cleared: under FSDP2 a block's
        unsharded parameters are in the module only while it runs, and must still be known at its next call."""
        model = self._model()
        self._owners = {k: v for k, v in self._owners.items() if v[0]() is not None}
        self._names = {k: v for k, v in self._names.items() if v[0]() is not None}
        if model is None:
            return
        names: dict[int, list[str]] = collections.defaultdict(list)
        params: dict[int, torch.Tensor] = {}
        # remove_duplicate=False: a tied weight is seen under every name (the head's owner then decides).
        for name, param in _root(model).named_parameters(remove_duplicate=False):
            name = unwrapped_path(name)
            names[id(param)].append(name)
            params[id(param)] = param
            if self.stack is not None:
                block = self._block_in_stack(name)
                if block is not None:
                    self._owners[id(param)] = (weakref.ref(param), block)
        for key, found in names.items():
            self._names[key] = (weakref.ref(params[key]), tuple(found))

    def _block_in_stack(self, name: str) -> Optional[int]:
        assert self.stack is not None
        rest = name[len(self.stack.prefix) + 1:] if self.stack.prefix else name
        if self.stack.prefix and not name.startswith(self.stack.prefix + "."):
            return None
        block = rest.split(".", 1)[0]
        return self.stack.indices().get(block) if block in self.stack.blocks else None

    def block_of(self, tensor: Any) -> Optional[int]:
        """The index of the stack block that ``tensor`` is a parameter of, or None (remembered too, so that a
        tensor outside the stack costs one scan of the model, not one per call)."""
        if not isinstance(tensor, torch.Tensor):
            return None
        hit = self._owners.get(id(tensor))
        if hit is None or hit[0]() is not tensor:
            self._rescan()
            hit = self._owners.get(id(tensor))
            if hit is None or hit[0]() is not tensor:
                hit = self._owners[id(tensor)] = (weakref.ref(tensor), None)
        return hit[1]

    def names(self) -> list[str]:
        """The model's module and parameter names (``named_modules()``/``named_parameters()``, wrapper
        components dropped)."""
        model = self._model()
        if model is None:
            return []
        root = _root(model)
        return sorted({unwrapped_path(n) for n, _ in root.named_modules()} |
                      {unwrapped_path(n) for n, _ in root.named_parameters()} - {""})

    def names_of(self, tensor: Any) -> tuple[str, ...]:
        """Every name of ``tensor`` among the model's parameters (``named_parameters()``, wrapper components
        dropped; several for a tied weight), or ``()``."""
        if not isinstance(tensor, torch.Tensor):
            return ()
        hit = self._names.get(id(tensor))
        if hit is None or hit[0]() is not tensor:
            self._rescan()
            hit = self._names.get(id(tensor))
            if hit is None or hit[0]() is not tensor:
                hit = self._names[id(tensor)] = (weakref.ref(tensor), ())
        return hit[1]


# One layout per model, so that backends built for the same model compare equal (Dynamo compares backends).
_LAYOUTS: "weakref.WeakKeyDictionary[torch.nn.Module, ModelLayout]" = weakref.WeakKeyDictionary()


def model_layout(model: torch.nn.Module) -> ModelLayout:
    """The `ModelLayout` of ``model`` (the same object for the same model)."""
    layout = _LAYOUTS.get(model)
    if layout is None:
        layout = _LAYOUTS[model] = ModelLayout(model)
    return layout


@dataclasses.dataclass(frozen=True)
class GraphRoute:
    """How the backend places one Dynamo graph in the model's block stack.

    ``per_call`` False: every call gets ``placement`` (None: the graph decides alone, as without a model).
    ``per_call`` True: the graph was traced from one block's forward and Dynamo reuses it for every block;
    `at_call` reads which block a call runs from the identity of its weight arguments (``positions``).
    """

    placement: Optional[BlockPlacement] = None
    per_call: bool = False
    layout: Optional[ModelLayout] = None
    positions: tuple[int, ...] = ()

    def at_call(self, args: Sequence[Any]) -> Optional[BlockPlacement]:
        if not self.per_call:
            return self.placement
        assert self.layout is not None and self.layout.stack is not None
        blocks = {self.layout.block_of(args[i]) for i in self.positions if i < len(args)}
        blocks.discard(None)
        if len(blocks) != 1:
            return None
        return BlockPlacement(self.layout.stack.prefix or "(root)", self.layout.stack.count, blocks.pop())

    def name(self, graph_id: str, placement: Optional[BlockPlacement]) -> str:
        """The report name of the variant compiled for ``placement`` (one per block for per-call routes)."""
        if not self.per_call or placement is None or placement.block is None:
            return graph_id
        return f"{graph_id}@{placement.stack}.{placement.block}"


def _graph_paths(gm: fx.GraphModule) -> set[str]:
    return {module_path(str(entry[0])) for node in gm.graph.nodes
            for entry in (node.meta.get("nn_module_stack") or {}).values()}


def _reaches_into(path: str, stack: BlockStack) -> bool:
    """Whether a graph's module path lies in a block of ``stack``. The graph's paths may hold a component more
    than the model's in front (DDP's ``module.``) or lack some (a frame rooted at a submodule)."""
    parts, prefix = path.split("."), stack.prefix.split(".") if stack.prefix else []
    for i, part in enumerate(parts):
        if part not in stack.blocks:
            continue
        before = parts[:i]
        if not prefix:
            if not before:
                return True
        elif before and (before[-len(prefix):] == prefix or prefix[-len(before):] == before):
            return True
    return False


def route_graph(layout: ModelLayout, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> GraphRoute:
    """The `GraphRoute` of ``gm`` in ``layout``'s model.

    A graph whose module paths reach into the stack (a whole-model graph, or a DDP split) is placed once: its
    block indices count against the model's stacks. A graph whose paths never do, and whose weight inputs are
    parameters, was traced from inside one block: it is routed per call.
    """
    stack = layout.stack
    if stack is None:
        return GraphRoute()
    placement = BlockPlacement(stack.prefix or "(root)", stack.count)
    if any(_reaches_into(path, stack) for path in _graph_paths(gm)):
        return GraphRoute(placement)
    # Only the stack's own weights tell blocks apart: an activation (a mixture of experts' token rows in a graph
    # of its own after a graph break) is no weight, and routing on it compiled one variant for its first shape.
    positions = tuple(i for i, x in enumerate(example_inputs)
                      if isinstance(x, torch.Tensor) and x.ndim == 2 and layout.block_of(x) is not None)
    if not positions:
        return GraphRoute(placement)
    return GraphRoute(per_call=True, layout=layout, positions=positions)


def split_warning(gm: fx.GraphModule, graph_id: str) -> Optional[str]:
    """The warning for a graph that DDP's graph splitting produced, when the backend was not given the
    model (each split holds part of the block stack, so first/last blocks would be counted per split)."""
    if "DDPOptimizer" not in str(getattr(gm, "compile_subgraph_reason", "")):
        return None
    return (f"fp4compile: {graph_id} is one of the graphs DDP's graph splitting (torch._dynamo.config.optimize_ddp)"
            " made: without the model the first and last blocks are counted in each split, not in the model;"
            " pass it, torch.compile(ddp_model, backend='fp4', options={'model': ddp_model}), or set"
            " torch._dynamo.config.optimize_ddp = False")


def unplaced_warning(graph_id: str, modules: Sequence[str]) -> Optional[str]:
    """The warning for a graph of weight GEMMs outside any block stack in a distributed run without the
    model: under FSDP2 or per-block compile it is one block's forward, reused for every block."""
    if not modules or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    shown = ", ".join(sorted(set(modules))[:4])
    return (f"fp4compile: {graph_id}'s weight GEMMs ({shown}) lie in no block stack: under FSDP2 or per-block"
            " torch.compile this graph is one block's forward, which Dynamo reuses for every block, so the"
            " recipe's first/last-block rules cannot be applied; pass the model: options={'model': model}")
