"""``fp4_expert_linear``: a mixture of experts' GEMMs on stacked expert weights, one NVFP4 GEMM per expert.

    x (S, K) token rows, weight (E, N, K) stacked expert weights, expert_ids (S,): row s runs expert
    expert_ids[s]; y[s] = x[s] weight[expert_ids[s]]^T. Ids outside [0, E) give zero rows.

Each expert's rows (in their order in ``x``) and its weight ``weight[e]`` form an independent linear layer,
and its three GEMMs (forward, input gradient, weight gradient) are exactly `Fp4LinearFunction`'s: the same
operand quantizations, blocks along each GEMM's reduction axis, and a tensor scale per expert (each
expert's amax: docs/numerics.md section 3.7). Routing by token-expert pairs (transformers' ``batched_mm``),
by sorted groups with offsets (``grouped_mm``) or by equal groups (``bmm`` on ``(E, T, K)``) all reduce to
expert ids per row (`expert_ids_from_offsets`, `fp4_expert_bmm`).

The group sizes are data, so the loop over experts cannot be traced: ``fp4compile::expert_linear`` and its
backward ``fp4compile::expert_linear_backward`` are opaque custom ops (as transformers' own
``grouped_mm_fallback``) that read the sizes on the host. The backward op recomputes each expert's forward
quantizations from the saved high-precision ``x`` and ``weight`` (round to nearest in every built-in recipe's
forward, so the same codes) instead of saving the packed forms, which a custom op cannot hand from forward to
backward per expert; a recipe with stochastic rounding on ``x^T`` (FATW) then draws that key in the backward.
Stochastic-rounding keys are drawn expert by expert in order, forward then backward.
"""

from __future__ import annotations

import torch

from ..policy.precision import HIGH, LinearPrecision
from .linear import Fp4LinearFunction

__all__ = ["fp4_expert_linear", "fp4_expert_bmm", "fp4_expert_gather", "fp4_expert_grouped_mm",
           "expert_ids_from_offsets"]


class _ExpertContext:
    """What `Fp4LinearFunction`'s forward and backward read and write on their autograd context, for calling
    them on one expert outside autograd."""

    def __init__(self, needs_input_grad: tuple[bool, ...]) -> None:
        self.needs_input_grad = needs_input_grad
        self.saved_tensors: tuple[torch.Tensor, ...] = ()

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        self.saved_tensors = tensors


def _groups(expert_ids: torch.Tensor, experts: int) -> list[tuple[int, torch.Tensor]]:
    """``(expert, row indices in order)`` of every expert with rows. One host read of the ids (a sync on CUDA)."""
    # Ids outside [0, experts) (grouped_mm's unused tail) all become `experts`, sorted last and run by none.
    ids = torch.where((expert_ids >= 0) & (expert_ids < experts), expert_ids, experts).to(torch.int64)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=experts + 1).tolist()
    groups, start = [], 0
    for e, count in enumerate(counts[:experts]):
        if count:
            groups.append((e, order[start:start + count]))
        start += count
    return groups


def _decode(precision: str, gemm_paths: str, x: torch.Tensor, weight: torch.Tensor):
    from ..passes.choose_gemm_paths import GemmPaths
    from .linear import default_gemm_paths

    cfg = LinearPrecision.decode(precision)
    paths = GemmPaths.decode(gemm_paths) if gemm_paths else default_gemm_paths(cfg, x, weight[0])
    return cfg, paths


def _expert_label(site: str, e: int) -> str:
    return f"{site}[{e}]"


#: The ops read the group sizes on the host, which a CUDA-graph capture forbids: Inductor leaves such ops out
#: of its CUDA graphs (the steps around them are still captured, with graph partitioning) or skips the graph.
_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


@torch.library.custom_op("fp4compile::expert_linear", mutates_args=(), tags=_TAGS)
def _expert_linear(x: torch.Tensor, weight: torch.Tensor, expert_ids: torch.Tensor, precision: str,
                   out_dtype: torch.dtype, site: str = "", gemm_paths: str = "") -> torch.Tensor:
    """The forward GEMM of every expert (see the module docstring)."""
    cfg, paths = _decode(precision, gemm_paths, x, weight)
    # Nothing is saved from here (the backward recomputes), so x^T is not quantized: weight gradient HIGH.
    forward_only = LinearPrecision(cfg.forward, cfg.input_grad, HIGH)
    y = x.new_zeros((x.shape[0], weight.shape[1]), dtype=out_dtype)
    for e, rows in _groups(expert_ids, weight.shape[0]):
        ctx = _ExpertContext((True, True, False))
        y[rows] = Fp4LinearFunction.forward(ctx, x[rows], weight[e], None, forward_only, out_dtype,
                                            _expert_label(site, e), paths)
    return y


@_expert_linear.register_fake
def _expert_linear_fake(x, weight, expert_ids, precision, out_dtype, site="", gemm_paths=""):
    return x.new_empty((x.shape[0], weight.shape[1]), dtype=out_dtype)


@torch.library.custom_op("fp4compile::expert_linear_backward", mutates_args=(), tags=_TAGS)
def _expert_linear_backward(x: torch.Tensor, weight: torch.Tensor, expert_ids: torch.Tensor, dy: torch.Tensor,
                            precision: str, site: str, gemm_paths: str, need_dx: bool,
                            need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dweight)``: each expert's input- and weight-gradient GEMMs, its forward quantizations recomputed."""
    cfg, paths = _decode(precision, gemm_paths, x, weight)
    dx = torch.zeros_like(x)
    dw = torch.zeros_like(weight)
    for e, rows in _groups(expert_ids, weight.shape[0]):
        ctx = _ExpertContext((need_dx, need_dw, False))
        Fp4LinearFunction.forward(ctx, x[rows], weight[e], None, cfg, dy.dtype, _expert_label(site, e), paths)
        dx_e, dw_e = Fp4LinearFunction.backward(ctx, dy[rows])[:2]
        if dx_e is not None:
            dx[rows] = dx_e.to(dx.dtype)
        if dw_e is not None:
            dw[e] = dw_e
    return dx, dw


@_expert_linear_backward.register_fake
def _expert_linear_backward_fake(x, weight, expert_ids, dy, precision, site, gemm_paths, need_dx, need_dw):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, expert_ids, precision, out_dtype, site, gemm_paths = inputs
    ctx.save_for_backward(x, weight, expert_ids)
    ctx.precision, ctx.site, ctx.gemm_paths = precision, site, gemm_paths


def _backward(ctx, dy):
    x, weight, expert_ids = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = torch.ops.fp4compile.expert_linear_backward(x, weight, expert_ids, dy.contiguous(), ctx.precision,
                                                        ctx.site, ctx.gemm_paths, need_dx, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None), None, None, None, None, None


_expert_linear.register_autograd(_backward, setup_context=_setup_context)


def _check(x: torch.Tensor, weight: torch.Tensor, site: str) -> None:
    if weight.dim() != 3 or x.dim() != 2 or x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"fp4_expert_linear at {site or '?'}: expected x (S, K) and weight (E, N, K), got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")


def fp4_expert_linear(x: torch.Tensor, weight: torch.Tensor, expert_ids: torch.Tensor, precision: str,
                      out_dtype: torch.dtype, site: str = "", gemm_paths: str = "") -> torch.Tensor:
    """``y[s] = x[s] weight[expert_ids[s]]^T`` with each expert's GEMMs at the precisions ``precision`` encodes
    (`LinearPrecision.encode`), as `fp4_linear` runs them for one linear layer; returned in ``out_dtype``.
    Without autograd only the forward GEMM runs."""
    _check(x, weight, site)
    return torch.ops.fp4compile.expert_linear(x, weight, expert_ids, precision, out_dtype, site, gemm_paths)


def expert_ids_from_offsets(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """The expert of each of ``rows`` sorted rows from grouped-GEMM offsets (``offsets[e]`` is where expert
    ``e``'s rows end, as ``torch._grouped_mm`` takes them); rows past the last offset get ``len(offsets)``,
    an id no expert has (zero rows, as ``grouped_mm`` leaves them unused)."""
    positions = torch.arange(rows, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets, positions, right=True)


def fp4_expert_grouped_mm(x: torch.Tensor, weight_kn: torch.Tensor, offsets: torch.Tensor, precision: str,
                          out_dtype: torch.dtype, site: str = "", gemm_paths: str = "") -> torch.Tensor:
    """``torch._grouped_mm(x, weight_kn, offs=offsets)`` (``weight_kn`` ``(E, K, N)``) through `fp4_expert_linear`."""
    ids = expert_ids_from_offsets(offsets, x.shape[0])
    return fp4_expert_linear(x, weight_kn.transpose(-2, -1), ids, precision, out_dtype, site, gemm_paths)


def fp4_expert_bmm(x: torch.Tensor, weight_kn: torch.Tensor, precision: str, out_dtype: torch.dtype,
                   site: str = "", gemm_paths: str = "") -> torch.Tensor:
    """``torch.bmm(x, weight_kn)`` for ``x`` ``(E, T, K)``, ``weight_kn`` ``(E, K, N)``: expert ``e`` runs on
    ``x[e]``."""
    experts, tokens, k = x.shape
    ids = torch.arange(experts, device=x.device).repeat_interleave(tokens)
    y = fp4_expert_linear(x.reshape(experts * tokens, k), weight_kn.transpose(-2, -1), ids, precision, out_dtype,
                          site, gemm_paths)
    return y.reshape(experts, tokens, -1)


def fp4_expert_gather(x: torch.Tensor, weight: torch.Tensor, expert_ids: torch.Tensor, precision: str,
                      out_dtype: torch.dtype, site: str = "", gemm_paths: str = "",
                      weight_is_kn: bool = False) -> torch.Tensor:
    """transformers' ``batched_mm``: ``bmm(weight[expert_ids], x.unsqueeze(-1)).squeeze(-1)`` (``weight``
    ``(E, N, K)``), or with ``weight_is_kn`` ``bmm(x.unsqueeze(1), weight[expert_ids]).squeeze(1)``; returns the
    ``(S, N)`` result (the caller's squeeze is rewritten away)."""
    w = weight.transpose(-2, -1) if weight_is_kn else weight
    return fp4_expert_linear(x, w, expert_ids, precision, out_dtype, site, gemm_paths)
