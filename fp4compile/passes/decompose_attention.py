"""Pass: split ``F.multi_head_attention_forward`` into its in-projection, attention and out-projection.

``nn.MultiheadAttention`` (and so ``nn.TransformerEncoderLayer``/``DecoderLayer`` and torchvision's ViT) calls
``F.multi_head_attention_forward``, which Dynamo keeps as one call: its projections, two weight GEMMs, are
hidden inside it. This pass writes them out as ``F.linear`` calls, so that `find_gemm_sites` sees them like
any other linear layer (the policy decides their precision; the precision table lists them):

- in-projection: self-attention (query, key and value the same node) with the packed ``in_proj_weight`` is one
  ``F.linear(query, in_proj_weight, in_proj_bias)`` whose output is split into q, k and v;
  ``use_separate_proj_weight`` (``kdim``/``vdim`` other than ``embed_dim``) is three ``F.linear`` calls on
  ``q_proj_weight``, ``k_proj_weight`` and ``v_proj_weight``; the packed weight with a key other than the
  query (cross-attention) is three ``F.linear`` calls on row slices of ``in_proj_weight``, which
  find_gemm_sites reports as high precision (a GEMM on a slice of a weight is not rewritten);
- attention: `attention_heads`, the computation between the projections, as
  ``F.multi_head_attention_forward`` does it (mask merging, ``scaled_dot_product_attention``, or explicit
  softmax weights when ``need_weights``);
- out-projection: ``F.linear(attention, out_proj_weight, out_proj_bias)`` in the ``out_proj`` submodule.

Calls using ``bias_k``/``bias_v`` (``add_bias_kv``), ``add_zero_attn`` or ``static_k``/``static_v`` are left as
they are and marked ``node.meta[UNSUPPORTED]``: their projections stay in high precision, with that reason in
the table.

Reads: ``node.meta["nn_module_stack"]`` and ``"example_value"``. Writes: the new nodes, each with the call's
module stack (the out-projection's extended by ``out_proj``) and an ``"example_value"`` computed under the
graph's fake mode; ``node.meta[UNSUPPORTED]`` on calls it leaves.
"""

from __future__ import annotations

import inspect
import math
import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from .meta import UNSUPPORTED
from .subgraphs import all_graph_modules

__all__ = ["decompose_attention", "attention_heads", "attention_outputs"]

_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def attention_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, dropout_p: float,
                    training: bool, key_padding_mask: Optional[torch.Tensor], need_weights: bool,
                    attn_mask: Optional[torch.Tensor], average_attn_weights: bool,
                    is_causal: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The attention of ``F.multi_head_attention_forward`` between its projections.

    Takes the projected ``q`` ``(L, N, E)``, ``k`` and ``v`` ``(S, N, E)`` (or unbatched, without ``N``) and
    returns the heads' output as ``(L * N, E)`` rows ready for the out-projection, and the attention weights
    (``need_weights``; averaged over heads if ``average_attn_weights``) or None.
    """
    is_batched = q.dim() == 3
    if not is_batched:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = q.shape
    head_dim = embed_dim // num_heads
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=q.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("nn.MultiheadAttention: is_causal needs attn_mask (it is only a hint)")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # scaled_dot_product_attention builds the causal mask itself
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=q.dtype, check_other=False)
        if key_padding_mask is not None:
            is_causal = False
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    q = q.reshape(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.reshape(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.reshape(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    src_len = k.size(1)
    if key_padding_mask is not None:
        key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
                            .reshape(bsz * num_heads, 1, src_len))
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    if not training:
        dropout_p = 0.0
    if need_weights:
        scores = q * math.sqrt(1.0 / float(head_dim))
        scores = (torch.baddbmm(attn_mask, scores, k.transpose(-2, -1)) if attn_mask is not None
                  else torch.bmm(scores, k.transpose(-2, -1)))
        weights = F.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v).transpose(0, 1).contiguous().view(tgt_len * bsz, embed_dim)
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights if is_batched else weights.squeeze(0)
    if attn_mask is not None:
        attn_mask = attn_mask.unsqueeze(0) if attn_mask.size(0) == 1 and attn_mask.dim() == 3 else \
            attn_mask.view(bsz, num_heads, -1, src_len)
    q, k, v = (t.view(bsz, num_heads, -1, head_dim) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    return out.permute(2, 0, 1, 3).contiguous().view(bsz * tgt_len, embed_dim), None


def attention_outputs(projected: torch.Tensor, query: torch.Tensor,
                      weights: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``F.multi_head_attention_forward``'s result: the out-projection's rows in the query's layout, and the
    weights."""
    out = projected.view(query.shape[0], -1, projected.size(-1)) if query.dim() == 3 else projected
    return out, weights


def _split_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v from the packed self-attention projection (the order of ``in_proj_weight``'s rows)."""
    q, k, v = qkv.chunk(3, dim=-1)
    return q, k, v


def _example(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return value.meta.get("example_value", value.meta.get("val"))
    if isinstance(value, (tuple, list)):
        return type(value)(_example(v) for v in value)
    return value


def _fake_mode(node: fx.Node):
    """The fake mode of the call's own example value (Dynamo's), or None."""
    value = node.meta.get("example_value", node.meta.get("val"))
    first = value[0] if isinstance(value, (tuple, list)) and value else value
    return getattr(first, "fake_mode", None)


class _Builder:
    """Inserts nodes before the call being replaced, with its module stack and computed example values."""

    def __init__(self, graph: fx.Graph, call: fx.Node) -> None:
        self.graph, self.call, self.fake_mode = graph, call, _fake_mode(call)
        self.stack = dict(call.meta.get("nn_module_stack") or {})

    def add(self, target: Any, args: tuple, kwargs: Optional[dict] = None, stack: Optional[dict] = None) -> fx.Node:
        with self.graph.inserting_before(self.call):
            node = self.graph.call_function(target, args, kwargs or {})
        for key in ("stack_trace", "source_fn_stack"):
            if key in self.call.meta:
                node.meta[key] = self.call.meta[key]
        node.meta["nn_module_stack"] = stack if stack is not None else dict(self.stack)
        if self.fake_mode is not None:
            with self.fake_mode:
                node.meta["example_value"] = target(*_example(args), **{k: _example(v) for k, v in (kwargs or {}).items()})
        return node

    def out_proj_stack(self) -> dict:
        """The call's module stack with the ``out_proj`` submodule appended."""
        stack = dict(self.stack)
        if stack:
            key, (path, _) = list(stack.items())[-1]
            stack[f"{key}_out_proj"] = (f"{path}.out_proj", torch.nn.modules.linear.NonDynamicallyQuantizableLinear)
        return stack


def _unsupported(a: dict) -> Optional[str]:
    if a["bias_k"] is not None or a["bias_v"] is not None:
        return "bias_k/bias_v (add_bias_kv=True)"
    if a["add_zero_attn"]:
        return "add_zero_attn=True"
    if a["static_k"] is not None or a["static_v"] is not None:
        return "static_k/static_v"
    if not all(isinstance(a[name], (int, float, bool)) for name in ("num_heads", "dropout_p", "training",
                                                                     "need_weights", "average_attn_weights",
                                                                     "is_causal")):
        return "a head count, dropout or flag that is not a constant of the graph"
    return None


def _in_projection(b: _Builder, a: dict) -> tuple[fx.Node, fx.Node, fx.Node]:
    query, key, value, bias = a["query"], a["key"], a["value"], a["in_proj_bias"]
    embed_dim = a["embed_dim_to_check"]
    if not a["use_separate_proj_weight"] and query is key and key is value:
        qkv = b.add(F.linear, (query, a["in_proj_weight"], bias))
        split = b.add(_split_qkv, (qkv,))
        return tuple(b.add(operator.getitem, (split, i)) for i in range(3))  # type: ignore[return-value]
    if a["use_separate_proj_weight"]:
        weights = (a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"])
    else:  # row slices of the packed weight: reported by find_gemm_sites, kept in high precision
        weights = tuple(b.add(operator.getitem, (a["in_proj_weight"], slice(i * embed_dim, (i + 1) * embed_dim)))
                        for i in range(3))
    biases = ((None,) * 3 if bias is None else
              tuple(b.add(operator.getitem, (bias, slice(i * embed_dim, (i + 1) * embed_dim))) for i in range(3)))
    return tuple(b.add(F.linear, (x, w, bb)) for x, w, bb in zip((query, key, value), weights, biases))  # type: ignore[return-value]


def _decompose(graph: fx.Graph, call: fx.Node) -> None:
    try:
        bound = _SIGNATURE.bind(*call.args, **call.kwargs)
    except TypeError as exc:
        call.meta[UNSUPPORTED] = f"F.multi_head_attention_forward called with unexpected arguments ({exc})"
        return
    bound.apply_defaults()
    a = bound.arguments
    reason = _unsupported(a)
    if reason is not None:
        call.meta[UNSUPPORTED] = (f"nn.MultiheadAttention with {reason} is not split into its projections: its "
                                  "in- and out-projection run in high precision")
        return
    b = _Builder(graph, call)
    q, k, v = _in_projection(b, a)
    heads = b.add(attention_heads, (q, k, v, a["num_heads"], a["dropout_p"], a["training"], a["key_padding_mask"],
                                    a["need_weights"], a["attn_mask"], a["average_attn_weights"], a["is_causal"]))
    rows, weights = b.add(operator.getitem, (heads, 0)), b.add(operator.getitem, (heads, 1))
    projected = b.add(F.linear, (rows, a["out_proj_weight"], a["out_proj_bias"]), stack=b.out_proj_stack())
    result = b.add(attention_outputs, (projected, a["query"], weights))
    call.replace_all_uses_with(result)
    graph.erase_node(call)


def decompose_attention(gm: fx.GraphModule) -> fx.GraphModule:
    """Split every ``F.multi_head_attention_forward`` call of ``gm`` and its checkpoint regions (module
    docstring)."""
    for graph_module in all_graph_modules(gm):
        calls = [n for n in graph_module.graph.nodes
                 if n.op == "call_function" and n.target is F.multi_head_attention_forward]
        for call in calls:
            _decompose(graph_module.graph, call)
        if calls:
            graph_module.recompile()
    return gm
