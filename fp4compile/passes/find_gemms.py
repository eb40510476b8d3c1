"""Pass: find the GEMMs whose one operand is a weight, in every spelling, and describe them as `GemmSite`s.

Reads: ``node.meta["nn_module_stack"]`` and ``"example_value"`` (set by Dynamo); the graph's example inputs;
``gm.meta[PARAMETER_NAMES]`` when the backend knows the model. Writes: ``node.meta[MATCH]`` (`GemmMatch`) and
``node.meta[SITE]`` (`GemmSite`) on each weight GEMM; ``node.meta[UNSUPPORTED]`` (a reason) and
``node.meta[MODULE]`` on weight GEMMs it cannot rewrite (they stay in high precision); ``node.meta[SCOPES]`` on
every node that runs inside a module.

Module paths are the names the user's ``model.named_modules()`` gives. Dynamo names modules from the root of
the frame it traced: ``L['self']`` for ``model.forward``, ``L['args'][0]`` for a forward wrapped in a decorator
(``def wrapper(*args, **kwargs)``), and, inside wrappers, components such as ``_orig_mod``
(``torch.compile``), ``_checkpoint_wrapped_module`` and ``_fsdp_wrapped_module``: `module_path` drops all of
these. A frame rooted at a submodule (Dynamo compiles ``model.model.forward`` on its own after a graph break,
as under Hugging Face's gradient checkpointing) names paths from that submodule; only the model can tell:
with ``gm.meta[PARAMETER_NAMES]`` the weights' own names in the model give the missing prefix.

A mixture of experts' GEMMs on stacked 3-D expert weights ``(E, N, K)`` are sites too (`ExpertGemmMatch`,
``GemmSite.experts`` set): ``torch._grouped_mm``/``F.grouped_mm``/transformers' ``grouped_mm_fallback`` on sorted
rows and offsets, transformers' ``batched_mm`` form ``bmm(W[expert_ids], x.unsqueeze(-1))``, and ``bmm``/
``matmul`` of ``(E, T, K)`` activations with ``W.transpose(-2, -1)``. Other GEMMs on such weights, and GEMMs on
slices of a weight, are marked unsupported, so that the precision table lists them with the reason.

Spellings: ``F.linear(x, W, b)``; ``torch.addmm(b, x, B)``; ``torch.matmul``/``torch.mm``/``@``/``Tensor.matmul``
(``x @ B``), where ``B`` is ``W.t()``/``W.T``/``W.transpose(0, 1)``/``W.permute(1, 0)`` of an ``(N, K)`` weight,
or an ``(K, N)`` weight itself as in GPT-2's ``Conv1D``.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
import re
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..policy.site import GemmSite
from .meta import MATCH, MODULE, PARAMETER_NAMES, SCOPES, SITE, UNSUPPORTED
from .subgraphs import SUPPORTED_HIGHER_ORDER_OPS, examples_by_node, nested_body, operand_examples

__all__ = ["GemmMatch", "ExpertGemmMatch", "find_gemm_sites", "module_path"]

_LINEAR = {F.linear, torch._C._nn.linear}
_MATMUL = {torch.matmul, operator.matmul, torch.mm, torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.__matmul__}
_ADDMM = {torch.addmm, torch.Tensor.addmm}
_MATMUL_METHODS = {"matmul", "mm", "__matmul__"}
_TRANSPOSE_METHODS = {"t", "transpose", "permute"}


@dataclasses.dataclass(frozen=True)
class GemmMatch:
    """A weight GEMM ``y = x W^T + b`` as found in the graph.

    ``weight`` is the parameter node; ``weight_is_kn`` says the parameter is stored ``(K, N)`` (the GEMM uses it
    as is, like ``Conv1D``) rather than ``(N, K)`` (like ``nn.Linear``).
    """

    x: fx.Node
    weight: fx.Node
    weight_is_kn: bool
    bias: Optional[Any]
    spelling: str


def _target_name(node: fx.Node, default: Any = "") -> Any:
    """The name of what ``node`` calls: the method name, or the function's ``__name__`` (else ``default``)."""
    return node.target if node.op == "call_method" else getattr(node.target, "__name__", default)


def _is_transpose_2d(node: fx.Node) -> bool:
    """Whether ``node`` swaps the two axes of a 2D tensor."""
    target, args = node.target, node.args
    if node.op == "call_function" and target is getattr and args[1] in ("T", "mT"):
        return True
    name = _target_name(node)
    if name == "t" and len(args) == 1:
        return True
    if name == "transpose":
        dims = {d % 2 for d in args[1:3]} if len(args) >= 3 else set()
        return dims == {0, 1}
    if name == "permute":
        dims = tuple(args[1]) if len(args) == 2 and isinstance(args[1], (tuple, list)) else tuple(args[1:])
        return tuple(d % 2 for d in dims) == (1, 0)
    return False


def _as_weight(node: Any, params: dict[fx.Node, torch.Tensor]) -> Optional[tuple[fx.Node, bool]]:
    """``(parameter node, transposed)`` if ``node`` is a 2D parameter or its transpose, else None."""
    if not isinstance(node, fx.Node):
        return None
    if node in params:
        return node, False
    if _is_transpose_2d(node) and isinstance(node.args[0], fx.Node) and node.args[0] in params:
        return node.args[0], True
    return None


def _sliced_weight(node: Any, params: dict[fx.Node, torch.Tensor]) -> Optional[fx.Node]:
    """The parameter node if ``node`` takes part of a 2D parameter (``W[a:b]``, ``W.narrow(...)``), else None."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    name = _target_name(node)
    if name in ("getitem", "__getitem__", "narrow") and node.args[0] in params:
        return node.args[0]
    return None


_VIEW_NAMES = {"transpose", "permute", "t", "getitem", "__getitem__", "view", "reshape", "contiguous", "narrow",
               "select"}
_GEMM_WORDS = ("mm", "matmul", "linear", "einsum")
_GROUPED_MM = {"grouped_mm", "_grouped_mm", "grouped_mm_fallback"}
_BATCHED_MM = {"bmm", "matmul", "__matmul__"}


@dataclasses.dataclass(frozen=True)
class ExpertGemmMatch:
    """A GEMM of a mixture of experts on stacked expert weights, as found in the graph.

    ``weight`` is the parameter node, ``(E, N, K)``, or ``(E, K, N)`` when ``weight_is_kn``. ``kind`` says how
    rows find their expert: ``"grouped"`` (``x`` ``(S, K)`` sorted by expert, ``routing`` the offsets of
    ``torch._grouped_mm``), ``"gather"`` (transformers' ``batched_mm``: ``bmm(W[routing], x.unsqueeze(-1))``,
    ``routing`` the expert id of each row) or ``"bmm"`` (``x`` ``(E, T, K)``: expert ``e`` runs on ``x[e]``).
    """

    x: fx.Node
    weight: fx.Node
    weight_is_kn: bool
    kind: str
    routing: Optional[fx.Node]
    spelling: str


def _stacked_weight(value: Any, stacked: dict[fx.Node, torch.Tensor]) -> Optional[fx.Node]:
    """The parameter node if ``value`` is a parameter of 3 or more dimensions, or a view of one."""
    while isinstance(value, fx.Node):
        if value in stacked:
            return value
        name = _target_name(value)
        if name not in _VIEW_NAMES or not value.args:
            return None
        value = value.args[0]
    return None


def _is_last_two_swapped(node: fx.Node, ndim: int) -> bool:
    """Whether ``node`` swaps the last two axes of an ``ndim``-D tensor (``transpose(-2, -1)``, ``mT``)."""
    if node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return True
    if _target_name(node) != "transpose" or len(node.args) < 3:
        return False
    return {d % ndim for d in node.args[1:3]} == {ndim - 2, ndim - 1}


def _expert_weight(value: Any, stacked: dict[fx.Node, torch.Tensor]) -> Optional[tuple[fx.Node, bool]]:
    """``(3-D parameter node, last two axes swapped)`` if ``value`` is a 3-D parameter or its
    ``transpose(-2, -1)``, else None."""
    if not isinstance(value, fx.Node):
        return None
    if value in stacked and stacked[value].dim() == 3:
        return value, False
    if value.args and isinstance(value.args[0], fx.Node) and value.args[0] in stacked:
        param = value.args[0]
        if stacked[param].dim() == 3 and _is_last_two_swapped(value, 3):
            return param, True
    return None


def _gathered_weight(value: Any, stacked: dict[fx.Node, torch.Tensor]) -> Optional[tuple[fx.Node, fx.Node]]:
    """``(3-D parameter node, ids node)`` if ``value`` is ``W[ids]`` with a 1-D integer tensor ``ids``."""
    if not isinstance(value, fx.Node) or _target_name(value) not in ("getitem", "__getitem__") or len(value.args) != 2:
        return None
    param, ids = value.args
    if not (isinstance(param, fx.Node) and param in stacked and stacked[param].dim() == 3 and isinstance(ids, fx.Node)):
        return None
    ids_val = _example_value(ids)
    if ids_val is None or ids_val.dim() != 1 or ids_val.dtype.is_floating_point or ids_val.dtype == torch.bool:
        return None
    return param, ids


def _unsqueezed(value: Any, dim: int) -> Optional[fx.Node]:
    """``t`` if ``value`` is ``t.unsqueeze(dim)`` of a 2-D ``t`` (``dim`` counted on the 3-D result), else None."""
    if not isinstance(value, fx.Node) or _target_name(value) != "unsqueeze" or len(value.args) < 2:
        return None
    x = value.args[0]
    x_val = _example_value(x)
    if x_val is None or x_val.dim() != 2 or value.args[1] % 3 != dim % 3:
        return None
    return x


def _expert_match(node: fx.Node, stacked: dict[fx.Node, torch.Tensor]) -> "ExpertGemmMatch | str | None":
    """An `ExpertGemmMatch` for a GEMM on a 3-D weight that runs one GEMM per expert, the reason a GEMM-like
    call on a stacked weight stays in high precision, or None for other nodes."""
    if not stacked or node.op not in ("call_function", "call_method"):
        return None
    name = str(_target_name(node, node.target))
    if name in _GROUPED_MM and len(node.args) >= 2:
        if _arg(node, 3, "bias") is not None or _arg(node, 4, "out_dtype") is not None:
            return f"{name} with a bias or out_dtype on the stacked expert weights is not rewritten"
        found = _expert_weight(node.args[1], stacked)
        offsets = _arg(node, 2, "offs")
        if found is not None and isinstance(offsets, fx.Node) and _example_value(node.args[0]) is not None \
                and _example_value(node.args[0]).dim() == 2:
            param, swapped = found
            return ExpertGemmMatch(node.args[0], param, not swapped, "grouped", offsets, name)
    elif name in _BATCHED_MM and len(node.args) == 2:
        lhs, rhs = node.args
        gathered = _gathered_weight(lhs, stacked)
        if gathered is not None and _unsqueezed(rhs, -1) is not None:  # bmm(W[ids], x.unsqueeze(-1)): (S, N, 1)
            return ExpertGemmMatch(_unsqueezed(rhs, -1), gathered[0], False, "gather", gathered[1], name)
        gathered = _gathered_weight(rhs, stacked)
        if gathered is not None and _unsqueezed(lhs, 1) is not None:  # bmm(x.unsqueeze(1), W[ids]): (S, 1, N)
            return ExpertGemmMatch(_unsqueezed(lhs, 1), gathered[0], True, "gather", gathered[1], name)
        found = _expert_weight(rhs, stacked)
        lhs_val = _example_value(lhs)
        if found is not None and lhs_val is not None and lhs_val.dim() == 3 \
                and lhs_val.shape[0] == stacked[found[0]].shape[0]:  # bmm(x (E, T, K), W^T (E, K, N))
            param, swapped = found
            return ExpertGemmMatch(lhs, param, not swapped, "bmm", None, name)
    return _stacked_gemm_reason(node, stacked)


def _stacked_gemm_reason(node: fx.Node, stacked: dict[fx.Node, torch.Tensor]) -> Optional[str]:
    """Why a GEMM-like call on a weight of 3 or more dimensions that `_expert_match` does not recognise stays
    in high precision, or None if ``node`` is no such call."""
    name = str(_target_name(node, node.target)).lower()
    if not any(word in name for word in _GEMM_WORDS):
        return None
    for arg in (*node.args, *node.kwargs.values()):
        param = _stacked_weight(arg, stacked)
        if param is not None:
            return (f"{name} on the {stacked[param].dim()}-D weight {_param_name(param)} (stacked expert weights) "
                    "is not rewritten: per-expert GEMMs are rewritten when written as torch._grouped_mm, "
                    "bmm(W[expert_ids], x.unsqueeze(-1)) or bmm(x (E, T, K), W.transpose(-2, -1))")
    return None


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _match(node: fx.Node, params: dict[fx.Node, torch.Tensor]) -> "GemmMatch | str | None":
    """A `GemmMatch`, a reason string for a weight GEMM we cannot rewrite, or None for other nodes."""
    target = node.target
    is_method = node.op == "call_method"
    if node.op == "call_function" and target in _LINEAR:
        x, w, b = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
        found = _as_weight(w, params)
        if found is None:
            sliced = _sliced_weight(w, params)
            if sliced is not None:
                return (f"the weight is a slice of parameter {_param_name(sliced)}: GEMMs on part of a weight are "
                        "not rewritten")
            return None
        param, transposed = found
        return GemmMatch(x, param, transposed, b, "linear")
    if (node.op == "call_function" and target in _MATMUL) or (is_method and target in _MATMUL_METHODS):
        lhs, rhs = node.args[0], node.args[1]
        found = _as_weight(rhs, params)
        if found is None:
            if _as_weight(lhs, params) is not None:
                return "the weight is the left operand (W @ x); only x @ W^T layouts are rewritten"
            return None
        param, transposed = found
        return GemmMatch(lhs, param, not transposed, None, "mm" if getattr(target, "__name__", target) == "mm" else "matmul")
    if (node.op == "call_function" and target in _ADDMM) or (is_method and target == "addmm"):
        bias, lhs, rhs = node.args[0], node.args[1], node.args[2]
        found = _as_weight(rhs, params)
        if found is None:
            return "the weight is the left operand of addmm" if _as_weight(lhs, params) is not None else None
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return "addmm with beta or alpha other than 1"
        param, transposed = found
        return GemmMatch(lhs, param, not transposed, bias, "addmm")
    return None


_ROOT = re.compile(r"^L\['args'\]\[\d+\]\.?|^L\['[^']*'\]\.?")
_KEYED = re.compile(r"\.?_(?:modules|parameters|buffers)\['([^']*)'\]")
_INDEXED = re.compile(r"\[(\d+)\]")


#: Module-path components that wrappers insert between a module and the one they wrap (torch.compile's
#: OptimizedModule, activation checkpointing's CheckpointWrapper, FSDP1).
WRAPPER_COMPONENTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


def unwrapped_path(path: str) -> str:
    """``path`` without the components that wrappers insert (`WRAPPER_COMPONENTS`)."""
    return ".".join(part for part in path.split(".") if part and part not in WRAPPER_COMPONENTS)


def module_path(raw: str) -> str:
    """Normalise a Dynamo path (``L['self']._modules['h']._modules['0'].mlp``, ``L['args'][0].model``) to
    ``h.0.mlp``, without wrapper components."""
    path = _ROOT.sub("", raw)
    path = _KEYED.sub(r".\1", path)
    path = _INDEXED.sub(r".\1", path)
    return unwrapped_path(path.strip("."))


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path


def _scopes(node: fx.Node) -> tuple[tuple[str, str], ...]:
    """``(module path, class name)`` of every module ``node`` runs inside, outermost first (a wrapper, whose
    path equals the wrapped module's, appears once, with the wrapped module's class)."""
    scopes: dict[str, str] = {}
    for entry in (node.meta.get("nn_module_stack") or {}).values():
        path, cls = module_path(str(entry[0])), entry[1]
        scopes[path] = getattr(cls, "__qualname__", None) or str(cls)
    return tuple(scopes.items())


def _param_name(node: fx.Node) -> str:
    source = getattr(node, "_dynamo_source", None)
    if source is not None:
        name = source.name() if callable(source.name) else source.name
        return module_path(name)
    return node.name


def _call_module(node: fx.Node) -> str:
    scopes = _scopes(node)
    return scopes[-1][0] if scopes else ""


def _owner_inside(module: str, weight: str) -> str:
    """The module a site is named after: the module whose forward made the call, or the weight's own module if
    that lies inside it (an ``out_proj`` weight used by its parent's forward, as ``F.multi_head_attention_forward``
    does when Dynamo traces into it). A weight from elsewhere (a tied embedding) leaves the calling module."""
    owner = weight.rpartition(".")[0]
    return owner if module and owner.startswith(module + ".") else module


def _model_prefix(gm: fx.GraphModule, matches: list[tuple[fx.Node, GemmMatch]],
                  params: dict[fx.Node, torch.Tensor]) -> tuple[str, dict[fx.Node, str]]:
    """The prefix that turns this graph's paths into the model's (``model.`` for a frame Dynamo rooted at
    ``model.model``) and the model's name of each GEMM weight, read from ``gm.meta[PARAMETER_NAMES]``; ``""``
    and no names without it. The prefix is the one most parameters agree on, comparing each parameter's name
    in the graph (its Dynamo source, or the module that calls it) with its names in the model."""
    names_of = getattr(gm, "meta", {}).get(PARAMETER_NAMES)
    if names_of is None:
        return "", {}
    votes: dict[str, int] = {}

    def vote(raw: str, candidates: Sequence[str]) -> None:
        for name in candidates:
            if raw and (name == raw or name.endswith("." + raw)):
                prefix = name[: len(name) - len(raw)].rstrip(".")
                votes[prefix] = votes.get(prefix, 0) + 1

    for node, tensor in params.items():
        if getattr(node, "_dynamo_source", None) is not None:
            vote(_param_name(node), names_of(tensor))
    for node, match in matches:  # inside checkpoint regions weights have no source: their module path votes
        vote(_call_module(node), [name.rsplit(".", 1)[0] for name in names_of(params[match.weight])])
    prefix = max(votes, key=lambda p: (votes[p], -len(p)), default="")
    names: dict[fx.Node, str] = {}
    for _, match in matches:
        candidates = tuple(names_of(params[match.weight]))
        full = _join(prefix, _param_name(match.weight))
        names[match.weight] = full if full in candidates or not candidates else candidates[0]
    return prefix, names


def _example_value(node: Any) -> Optional[torch.Tensor]:
    if isinstance(node, fx.Node):
        value = node.meta.get("example_value", node.meta.get("val"))
        return value if isinstance(value, torch.Tensor) else None
    return None


def _parameters(gm: fx.GraphModule, example_inputs: Sequence[Any], stacked: bool = False) -> dict[fx.Node, torch.Tensor]:
    """Placeholders and ``get_attr`` nodes that hold 2D ``nn.Parameter``s (``stacked``: 3D and more)."""
    params: dict[fx.Node, torch.Tensor] = {}

    def wanted(value: Any) -> bool:
        return isinstance(value, torch.nn.Parameter) and (value.dim() > 2 if stacked else value.dim() == 2)

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, example in zip(placeholders, example_inputs):
        if wanted(example):
            params[node] = example
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = gm
            for part in str(node.target).split("."):
                value = getattr(value, part, None)
            if wanted(value):
                params[node] = value
    return params


def find_gemm_sites(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """Annotate every weight GEMM of ``gm`` and of the checkpoint regions it holds with its `GemmMatch` and
    `GemmSite` (see the module docstring). Weight GEMMs inside other higher-order ops are reported as
    unsupported on the op's node."""
    found: list[tuple[fx.Node, "GemmMatch | str", dict[fx.Node, torch.Tensor]]] = []
    scoped: list[fx.Node] = []
    _find(gm, example_inputs, found, scoped)
    matches = [(node, match) for node, match, _ in found if isinstance(match, (GemmMatch, ExpertGemmMatch))]
    params = {k: v for _, _, p in found for k, v in p.items()}
    prefix, names = _model_prefix(gm, matches, params)
    for node in scoped:
        node.meta[SCOPES] = tuple((_join(prefix, path), cls) for path, cls in _scopes(node))
    positions = itertools.count()
    for node, match, params in found:
        module = _join(prefix, _call_module(node))
        if not isinstance(match, str):
            module = _owner_inside(module, names.get(match.weight) or _join(prefix, _param_name(match.weight)))
        if isinstance(match, str):
            node.meta[UNSUPPORTED] = match
            node.meta[MODULE] = module
            continue
        weight = params[match.weight]
        n, k = (weight.shape[-1], weight.shape[-2]) if match.weight_is_kn else (weight.shape[-2], weight.shape[-1])
        x_val = _example_value(match.x)
        if x_val is None or x_val.dim() < 1 or x_val.shape[-1] != k:
            node.meta[UNSUPPORTED] = f"could not read the activation's shape (expected (..., {k}))"
            node.meta[MODULE] = module
            continue
        weight_name = names.get(match.weight) or _join(prefix, _param_name(match.weight))
        node.meta[MATCH] = match
        node.meta[SITE] = GemmSite(
            node=node.name,
            module=module if _call_module(node) else weight_name.rpartition(".")[0],
            weight=weight_name,
            spelling=match.spelling,
            in_features=int(k),
            out_features=int(n),
            input_shape=tuple(str(s) for s in x_val.shape),
            dtype=str(x_val.dtype),
            trainable=bool(weight.requires_grad),
            position=next(positions),
            experts=int(weight.shape[0]) if isinstance(match, ExpertGemmMatch) else 0,
        )
    return gm


def _find(gm: fx.GraphModule, example_inputs: Sequence[Any],
          found: list[tuple[fx.Node, "GemmMatch | str", dict[fx.Node, torch.Tensor]]], scoped: list[fx.Node]) -> None:
    """Collect, in graph order, each weight GEMM of ``gm`` and its checkpoint regions with its match (or the
    reason it cannot be rewritten) and its graph's parameters, and every node that runs inside a module."""
    params = _parameters(gm, example_inputs)
    stacked = _parameters(gm, example_inputs, stacked=True)
    weights = {**params, **stacked}
    examples = examples_by_node(gm, example_inputs)
    for node in gm.graph.nodes:
        if node.meta.get("nn_module_stack"):
            scoped.append(node)
        nested = nested_body(gm, node)
        if nested is not None:
            name, body = nested
            if name in SUPPORTED_HIGHER_ORDER_OPS:
                _find(body, operand_examples(node, name, examples), found, scoped)
            elif any(_match(n, _parameters(body, [None] * len(body.graph.nodes))) for n in body.graph.nodes):
                found.append((node, f"weight GEMMs inside higher-order op {name!r} are not rewritten", params))
            continue
        if node.op not in ("call_function", "call_method"):
            continue
        if UNSUPPORTED in node.meta:  # marked by an earlier pass (decompose_attention)
            found.append((node, node.meta[UNSUPPORTED], params))
            continue
        match = _match(node, params) or _expert_match(node, stacked)
        if match is not None:
            found.append((node, match, weights))
