"""``fp4_linear``: the op that a rewritten GEMM site calls, with the three GEMMs of its autograd.

    forward      y  = x W^T      lhs x (..., K) along K        rhs W (N, K) along K
    input_grad   dx = dy W       lhs dy (M, N) along N         rhs W along N: the forward's 2D-quantized W
                                                                 reused transposed, or W^T quantized anew
    weight_grad  dW = dy^T x     lhs dy^T (N, M) along tokens  rhs x^T (K, M) along tokens

What is saved for backward (docs/numerics.md section 3.1; "keep the quantized forms, not high-precision copies"):
- the weight-gradient operand x^T is quantized in the forward pass and saved packed (4.5 bits per element),
  so the activation x itself is not saved at all when that GEMM runs in FP4;
- the forward's 2D-quantized weight is saved packed and reused by the input-gradient GEMM (the chain rule
  holds for the very matrix the forward used) when both roles share the same weight precision.

Stochastic rounding draws a fresh 64-bit Philox key per quantization from torch's generator on the operand's
device, so a run is reproducible from ``torch.manual_seed`` and resumable from the RNG state.
Token counts not divisible by the weight-gradient block are zero-padded: zero rows add nothing to
``dy^T x`` and leave every amax unchanged.

Every choice is made when the graph is traced, none per call: the activations' and gradients' tensor amaxes are
plain graph ops (`_activation_amaxes`: Inductor fuses them with the kernels that produce those tensors); on
CUDA the quantizations and the dequantization of the saved x^T are the traceable ``fp4compile::*_triton`` ops
(`fp4compile.ops.triton_ops`), whose kernels Inductor's generated code launches; each GEMM runs on the path the `choose_gemm_paths` pass
wrote (`fp4compile.passes.choose_gemm_paths`): ``graph_mm`` as graph ops, the others on ``fp4compile::gemm``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..policy.precision import GemmPrecision, LinearPrecision, OperandPrecision
from ..numerics.formats import Rounding
from ..numerics.hadamard import HADAMARD_SIZE
from ..numerics.reference import tensor_amax_along
from . import library  # noqa: F401  (registers torch.ops.fp4compile.*)
from .triton_ops import uses_triton_ops

__all__ = ["fp4_linear", "Fp4LinearFunction", "default_gemm_paths", "token_multiple", "pad_token_rows"]

_SEED_HIGH = 2**62


def _seed_for(op: OperandPrecision, device: torch.device) -> Optional[torch.Tensor]:
    """A fresh Philox key for one stochastic quantization, drawn on the operand's device: the kernel reads it
    from device memory, so nothing waits for the GPU and the step can be captured in a CUDA graph (whose
    replays then draw fresh keys through PyTorch's graph-safe generator)."""
    if op.rounding is not Rounding.STOCHASTIC:
        return None
    return _fold_rank(torch.randint(0, _SEED_HIGH, (), dtype=torch.int64, device=device))


def _fold_rank(key: torch.Tensor) -> torch.Tensor:
    """Ranks are seeded alike, so they draw the same key: XOR in a per-rank constant (`rank_key_salt`, a Python
    int fixed when the op is traced) so no two ranks share noise. Rank 0 and single processes keep the drawn
    key, hence exactly the keys of a run without torch.distributed."""
    from ..distributed import rank_key_salt  # not at import: distributed -> passes -> this module

    salt = rank_key_salt()
    return key if salt == 0 else torch.bitwise_xor(key, salt)


def _quantize(x: torch.Tensor, op: OperandPrecision, label: str, with_dequantized: bool = False,
              amax: Optional[torch.Tensor] = None) -> tuple:
    """(codes, scales, tensor scale, exact operand or empty): the operand is written in the same kernel pass
    when the GEMM will consume it (no separate dequantization launch). ``amax``: from `_activation_amaxes` (None: the
    quantization computes its own, the weights' case)."""
    seed = _seed_for(op, x.device)
    if uses_triton_ops(x, op):
        return torch.ops.fp4compile.quantize_triton(x, op.encode(), seed, with_dequantized, amax)
    return torch.ops.fp4compile.quantize(x, op.encode(), seed, label, with_dequantized, amax)


def _activation_amaxes(tokens_first: torch.Tensor, row_op: Optional[OperandPrecision],
                       col_op: Optional[OperandPrecision]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The tensor amaxes of an activation's (or gradient's) quantizations, written as plain ATen ops into the
    traced graph: ``(amax for row_op``, quantized along features, ``amax for col_op``, quantized along tokens,
    after the RHT where it has one). ``tokens_first`` is the ``(tokens, features)`` matrix, tokens zero-padded
    for ``col_op`` (zeros change no maximum). None for a role that is not quantized or has no tensor scale.

    The amax is exact (a maximum needs no rounding; the RHT before it is exact sign flips, adds in the fixed
    order of docs/numerics.md section 3.3 and an exact * 1/4: `tensor_amax_along`), so as graph ops it gives
    the reference's bits, and Inductor fuses the reduction into or next to the kernel that just wrote the
    activation (the norm, the GELU, the residual add) instead of a separate kernel reading it again. The
    quantizations, which divide, stay in the quantize kernels (docs/backend.md: Inductor's division is not
    correctly rounded).
    """
    def needs(op: Optional[OperandPrecision]) -> bool:
        return op is not None and op.format.tensor_scale

    plain = None
    if (needs(row_op) and not row_op.hadamard) or (needs(col_op) and not col_op.hadamard):
        plain = tensor_amax_along(tokens_first, False)

    def amax(op: Optional[OperandPrecision], dim: int) -> Optional[torch.Tensor]:
        if not needs(op):
            return None
        return tensor_amax_along(tokens_first, True, dim) if op.hadamard else plain

    return amax(row_op, -1), amax(col_op, 0)


def _gemm(a: tuple, b: tuple, precision: GemmPrecision, b_transposed: bool, bias, out_dtype, path: str) -> torch.Tensor:
    """The GEMM of two quantizations (``fp4compile::quantize`` parts) on ``path`` (`choose_gemm_paths`):
    ``graph_mm`` as graph ops (the dense product of the exact operands plus its epilogue, which Inductor fuses
    into the next kernel), ``triton_traced`` on the traced ``fp4compile::gemm_dense_traced`` (a TMA GEMM with the
    epilogue fused that Inductor's code launches), every other path on the ``fp4compile::gemm`` op."""
    if path in ("graph_mm", "triton_traced"):
        a, b = _with_exact_operand(a, precision.lhs), _with_exact_operand(b, precision.rhs)
        if _has_fp16_operand(a) and _has_fp16_operand(b):
            if path == "triton_traced" and a[3].is_cuda:
                k = a[3].shape[-1]
                return torch.ops.fp4compile.gemm_dense_traced(a[3].reshape(-1, k), b[3], a[2], b[2], bias,
                                                              b_transposed, out_dtype)
            return _dense_gemm(a, b, b_transposed, bias, out_dtype)
    # No exact operands (CPU, forced graph form): the op decides.
    op_path = "" if path in ("graph_mm", "triton_traced") else path
    return torch.ops.fp4compile.gemm(
        *a[:3], *b[:3], bias, precision.lhs.encode(), precision.rhs.encode(), b_transposed, out_dtype,
        a[3] if len(a) > 3 else None, b[3] if len(b) > 3 else None, op_path,
    )


def _has_fp16_operand(parts: tuple) -> bool:
    """Whether a quantization carries its exact operand in float16 (E4M3 scales; other scale formats need
    float32 and stay on the op's reference path)."""
    return len(parts) > 3 and parts[3].numel() > 0 and parts[3].dtype == torch.float16


def _with_exact_operand(parts: tuple, op: OperandPrecision) -> tuple:
    """``parts`` with its exact operand: as it is when the quantize kernel wrote it, else (the weight-gradient
    operand x^T, saved packed) dequantized by the traced ``fp4compile::dequantize_triton`` on CUDA."""
    if len(parts) > 3 and parts[3].numel() > 0:
        return parts
    if not uses_triton_ops(parts[0], op):
        return parts
    return (*parts[:3], torch.ops.fp4compile.dequantize_triton(*parts[:3], op.encode()))


def default_gemm_paths(cfg: LinearPrecision, x: torch.Tensor, weight: torch.Tensor):
    """The `GemmPaths` the `choose_gemm_paths` pass would write for an ``fp4_linear`` call outside the backend
    (no CUDA graphs): used when the caller passes none."""
    from ..passes.choose_gemm_paths import GemmPaths, gemm_path
    from ..policy.precision import Role

    tokens, (n, k) = x.numel() // max(x.shape[-1], 1), weight.shape
    shapes = {Role.FORWARD: (tokens, n, k), Role.INPUT_GRAD: (tokens, k, n), Role.WEIGHT_GRAD: (n, k, tokens)}
    return GemmPaths(*(gemm_path(cfg.for_role(r), r, shapes[r], x.device, False) for r in Role))


def _dense_gemm(a: tuple, b: tuple, b_transposed: bool, bias, out_dtype) -> torch.Tensor:
    """``(D_a D_b) (A_u B_u^T) (+ bias)`` in the reference's order (`fp4compile.numerics.gemm_reference`):
    the exact fp16 operands multiply with FP32 accumulation, then alpha, then bias in float32, then the cast."""
    a16, b16 = a[3], b[3]
    b_kn = b16 if b_transposed else b16.t()
    if a16.is_cuda:
        acc = torch.mm(a16, b_kn, out_dtype=torch.float32)
    else:  # no fp16 -> fp32 mm on CPU; fp16 values are exact in fp32, so it is the same product
        acc = a16.float() @ b_kn.float()
    c = acc * (a[2] * b[2])
    if bias is not None:
        c = c + bias.to(torch.float32)
    return c.to(out_dtype)


def token_multiple(precision: GemmPrecision) -> int:
    """Row multiple the weight-gradient GEMM needs along the token axis (its reduction axis)."""
    multiple = precision.lhs.format.block_size
    if precision.lhs.hadamard or precision.rhs.hadamard:
        multiple = math.lcm(multiple, HADAMARD_SIZE)
    return multiple


def pad_token_rows(x2: torch.Tensor, multiple: int) -> torch.Tensor:
    """``x2`` with zero rows appended up to a multiple of ``multiple``: zero tokens add nothing to ``dy^T x`` and
    leave every amax unchanged."""
    rows = x2.shape[0]
    if rows % multiple == 0:
        return x2
    return F.pad(x2, (0, 0, 0, multiple - rows % multiple))


def _reuses_forward_weight(cfg: LinearPrecision) -> bool:
    """The input-gradient GEMM can reuse the forward's quantized W when it is a square 2D tiling with the same
    precision (then W and W^T quantize to the same matrix, docs/numerics.md section 3.2)."""
    fwd, dgrad = cfg.forward, cfg.input_grad
    return not fwd.is_high and not dgrad.is_high and fwd.rhs.is_2d and dgrad.rhs == fwd.rhs


class Fp4LinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with each of its three GEMMs at the precision ``cfg`` gives."""

    @staticmethod
    def forward(ctx, x, weight, bias, cfg: LinearPrecision, out_dtype: torch.dtype, site: str, paths):
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        fwd, wgrad = cfg.forward, cfg.weight_grad
        # x^T, the weight-gradient operand: (features, tokens), tokens zero-padded to the block multiple.
        x_t = None if wgrad.is_high else pad_token_rows(x2, token_multiple(wgrad)).t()
        x_amax, xt_amax = _activation_amaxes(x2 if x_t is None else x_t.t(), None if fwd.is_high else fwd.lhs,
                                             None if wgrad.is_high else wgrad.rhs)
        q_weight = None
        if fwd.is_high:
            y = F.linear(x2, weight, bias).to(out_dtype)
        else:
            q_x = _quantize(x2, fwd.lhs, f"{site}:forward:lhs", with_dequantized=True, amax=x_amax)
            q_weight = _quantize(weight, fwd.rhs, f"{site}:forward:rhs", with_dequantized=True)
            y = _gemm(q_x, q_weight, fwd, False, bias, out_dtype, paths.forward)

        ctx.cfg, ctx.paths, ctx.site, ctx.x_shape, ctx.x_dtype, ctx.weight_dtype = cfg, paths, site, x.shape, x.dtype, weight.dtype
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.reuse_weight = _reuses_forward_weight(cfg)
        saved = []
        # The reused weight keeps its exact fp16 operand too (2 bytes/weight): weights are small next to
        # activations, and the input-gradient GEMM then needs no dequantization pass.
        saved += list(q_weight) if ctx.reuse_weight else [weight]
        if wgrad.is_high:
            saved.append(x2)
        else:
            # x^T is saved packed (4.5 bits per element): the activation itself is not kept.
            saved += list(_quantize(x_t, wgrad.rhs, f"{site}:weight_grad:rhs", amax=xt_amax))[:3]
        ctx.save_for_backward(*saved)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        cfg: LinearPrecision = ctx.cfg
        saved = list(ctx.saved_tensors)
        weight_parts = saved[:4] if ctx.reuse_weight else saved[:1]
        act_parts = saved[len(weight_parts):]
        n = dy.shape[-1]
        dy2 = dy.reshape(-1, n)
        dx = dw = db = None
        dgrad, wgrad = cfg.input_grad, cfg.weight_grad
        need_dw = ctx.needs_input_grad[1] and not wgrad.is_high
        dy_t = pad_token_rows(dy2, token_multiple(wgrad)).t() if need_dw else None
        dy_amax, dyt_amax = _activation_amaxes(
            dy2 if dy_t is None else dy_t.t(), dgrad.lhs if ctx.needs_input_grad[0] and not dgrad.is_high else None,
            wgrad.lhs if need_dw else None)

        if ctx.needs_input_grad[0]:
            if dgrad.is_high:
                dx = (dy2 @ weight_parts[0].to(dy2.dtype)).to(ctx.x_dtype)
            else:
                q_dy = _quantize(dy2, dgrad.lhs, f"{ctx.site}:input_grad:lhs", with_dequantized=True, amax=dy_amax)
                if ctx.reuse_weight:
                    dx = _gemm(q_dy, weight_parts, dgrad, True, None, ctx.x_dtype, ctx.paths.input_grad)
                else:
                    q_wt = _quantize(weight_parts[0].t(), dgrad.rhs, f"{ctx.site}:input_grad:rhs", with_dequantized=True)
                    dx = _gemm(q_dy, q_wt, dgrad, False, None, ctx.x_dtype, ctx.paths.input_grad)
            dx = dx.reshape(ctx.x_shape)

        if ctx.needs_input_grad[1]:
            if wgrad.is_high:
                dw = (dy2.t() @ act_parts[0].to(dy2.dtype)).to(ctx.weight_dtype)
            else:
                q_dyt = _quantize(dy_t, wgrad.lhs, f"{ctx.site}:weight_grad:lhs", with_dequantized=True, amax=dyt_amax)
                dw = _gemm(q_dyt, act_parts, wgrad, False, None, ctx.weight_dtype, ctx.paths.weight_grad)

        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None


def fp4_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], precision: str,
               out_dtype: torch.dtype, site: str = "", gemm_paths: str = "") -> torch.Tensor:
    """``x @ weight.T + bias`` with the per-role precisions encoded in ``precision``
    (`LinearPrecision.encode`), returned in ``out_dtype``; ``site`` (the module path) labels the operands;
    ``gemm_paths`` (`GemmPaths.encode`, written by the `choose_gemm_paths` pass) says how each GEMM runs
    (empty: `default_gemm_paths`).

    Without autograd (``torch.no_grad()``, inference graphs) only the forward GEMM runs, and it rounds to
    nearest whatever the policy says, so evaluation is deterministic.
    """
    from ..passes.choose_gemm_paths import GemmPaths

    cfg = LinearPrecision.decode(precision)
    paths = GemmPaths.decode(gemm_paths) if gemm_paths else default_gemm_paths(cfg, x, weight)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return Fp4LinearFunction.apply(x, weight, bias, cfg, out_dtype, site, paths)
    fwd = cfg.forward
    if fwd.is_high:
        return F.linear(x, weight, bias).to(out_dtype)
    lhs = OperandPrecision(fwd.lhs.format, fwd.lhs.block, Rounding.NEAREST, fwd.lhs.hadamard)
    rhs = OperandPrecision(fwd.rhs.format, fwd.rhs.block, Rounding.NEAREST, fwd.rhs.hadamard)
    x2 = x.reshape(-1, x.shape[-1])
    x_amax, _ = _activation_amaxes(x2, lhs, None)
    q_x, q_w = _quantize(x2, lhs, f"{site}:forward:lhs", amax=x_amax), _quantize(weight, rhs, f"{site}:forward:rhs")
    y = _gemm(q_x, q_w, GemmPrecision(lhs, rhs), False, bias, out_dtype, paths.forward)
    return y.reshape(*x.shape[:-1], y.shape[-1])
