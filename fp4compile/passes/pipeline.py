"""The pass pipeline: decompose attention -> find GEMMs -> find layers -> assign precision -> legalize ->
choose GEMM paths -> rewrite.

Each pass is a function from graph to graph; the pipeline keeps the code of the graph after each pass (for
``fp4compile dump``) and, when asked (tests set ``FP4COMPILE_VERIFY=1``), runs the verifier after each one.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional, Sequence

import torch.fx as fx

from ..policy.recipe import Policy
from ..policy.schedule import FP4_PHASE, Phase
from .annotate_layers import annotate_layers
from .assign_precision import assign_precision
from .choose_gemm_paths import choose_gemm_paths
from .decompose_attention import decompose_attention
from .find_gemms import find_gemm_sites
from .legalize import legalize_precision
from .rewrite import rewrite_gemms
from .subgraphs import copy_nested_bodies
from .verify import verify_graph

__all__ = ["PassResult", "run_passes", "copy_graph_module"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PassResult:
    """The rewritten graph, the annotated graph before the rewrite (it carries every decision), and the code
    of the graph before the first pass and after each pass, in order."""

    graph_module: fx.GraphModule
    annotated: fx.GraphModule
    snapshots: list[tuple[str, str]]


#: What Dynamo attaches to its graph module and placeholders outside ``meta``. AOTAutograd reads them to tell
#: parameters (static inputs) from activations: without them a CUDA-graph replay copies every parameter into
#: its static buffer first (on GPT-2 small, 149 copies per step).
_DYNAMO_MODULE_ATTRS = ("_param_name_to_source", "_source_to_user_stacks")
_DYNAMO_PLACEHOLDER_ATTRS = ("_dynamo_source",)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose graph can be rewritten without touching ``gm`` (node meta copied shallowly, and
    Dynamo's attributes on the module and its placeholders kept)."""
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen
    node_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, node_map)
    graph.output(out)
    copy = fx.GraphModule(gm, graph)
    copy.meta = dict(getattr(gm, "meta", {}))
    for attr in _DYNAMO_MODULE_ATTRS:
        if hasattr(gm, attr):
            setattr(copy, attr, getattr(gm, attr))
    for old, new in node_map.items():
        if old.op == "placeholder":
            for attr in _DYNAMO_PLACEHOLDER_ATTRS:
                if hasattr(old, attr):
                    setattr(new, attr, getattr(old, attr))
    copy_nested_bodies(copy, copy_graph_module)
    return copy


def run_passes(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    policy: Policy,
    phase: Phase = FP4_PHASE,
    verify: bool = False,
    cudagraphs: bool = False,
    graph_meta: Optional[dict[str, Any]] = None,
) -> PassResult:
    """Run the pipeline on a copy of ``gm``; ``gm`` itself is not modified. ``cudagraphs``: the compiled
    graphs will be replayed as CUDA graphs (the GEMM paths depend on it). ``graph_meta``: entries set on the
    copy's ``meta`` before the first pass (what the backend knows of the model: `fp4compile.passes.meta`)."""
    work = copy_graph_module(gm)
    work.meta.update(graph_meta or {})
    snapshots = [("input", work.code)]
    passes: list[tuple[str, Callable[[fx.GraphModule], fx.GraphModule]]] = [
        ("decompose_attention", decompose_attention),
        ("find_gemm_sites", lambda g: find_gemm_sites(g, example_inputs)),
        ("annotate_layers", annotate_layers),
        ("assign_precision", lambda g: assign_precision(g, policy, phase)),
        ("legalize_precision", legalize_precision),
        ("choose_gemm_paths", lambda g: choose_gemm_paths(g, cudagraphs)),
    ]
    for name, fn in passes:
        work = fn(work)
        if verify:
            verify_graph(work, after=name)
    annotated = copy_graph_module(work)
    work = rewrite_gemms(work)
    if verify:
        verify_graph(work, after="rewrite_gemms")
    snapshots.append(("rewrite_gemms", work.code))
    return PassResult(work, annotated, snapshots)
