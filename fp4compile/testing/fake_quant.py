"""The eager reference: fake-quantized linear layers swapped into a model (the classic module-swap way of
emulating FP4 training), built only from the public quantizer (`fp4compile.quantize`, reference
implementation) and the reference GEMM.

The compiled backend must reproduce it (tests), and it is the "plain-PyTorch fake quantization" baseline of
the benchmarks. Seeds for stochastic rounding are drawn from torch's generator in the order the backend's
operands are quantized: forward (x, W, then x^T for the weight gradient), backward (dy, [W^T], dy^T).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import fp4compile
from fp4compile.numerics.gemm import gemm_reference
from fp4compile.policy.precision import LinearPrecision, OperandPrecision, Rounding


__all__ = ["ReferenceFakeQuantLinear", "swap_in_reference"]


def _q(x, op: OperandPrecision):
    seed = 0
    if op.rounding is Rounding.STOCHASTIC:
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=x.device)
    return fp4compile.quantize(x, op.format, op.block, op.rounding, seed, 0, op.hadamard, impl="reference")


# The padding below deliberately restates the op's convention instead of importing it: an oracle that shares
# code with what it checks cannot see that code's bugs (a mutation padding with ones went unnoticed when shared).
def _token_multiple(g) -> int:
    """Weight-gradient operands are zero-padded along tokens to a whole number of blocks (and of 16-runs for
    the Hadamard transform)."""
    return math.lcm(g.lhs.format.block_size, 16 if (g.lhs.hadamard or g.rhs.hadamard) else 1)


def _pad(x2, multiple):
    r = x2.shape[0] % multiple
    return x2 if r == 0 else F.pad(x2, (0, 0, 0, multiple - r))


class ReferenceFakeQuantLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, cfg: LinearPrecision):
        x2 = x.reshape(-1, x.shape[-1])
        f = cfg.forward
        if f.is_high:
            y = F.linear(x2, w, b)
        else:
            qw = _q(w, f.rhs)
            y = gemm_reference(_q(x2, f.lhs), qw, bias=b, out_dtype=x.dtype)
        ctx.cfg, ctx.shape, ctx.has_bias = cfg, x.shape, b is not None
        ctx.qw = qw if not f.is_high else None
        g = cfg.weight_grad
        ctx.qxt = None if g.is_high else _q(_pad(x2, _token_multiple(g)).t(), g.rhs)
        ctx.save_for_backward(x2, w)
        return y.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x2, w = ctx.saved_tensors
        cfg = ctx.cfg
        dy2 = dy.reshape(-1, dy.shape[-1])
        d, g = cfg.input_grad, cfg.weight_grad
        if not ctx.needs_input_grad[0]:
            dx = None  # no input gradient wanted: the GEMM (and its random draws) never runs
        elif d.is_high:
            dx = dy2 @ w
        else:
            q_dy = _q(dy2, d.lhs)
            if ctx.qw is not None and d.rhs == cfg.forward.rhs and d.rhs.is_2d:
                dx = gemm_reference(q_dy, ctx.qw, b_transposed=True, out_dtype=x2.dtype)
            else:
                dx = gemm_reference(q_dy, _q(w.t(), d.rhs), out_dtype=x2.dtype)
        if g.is_high:
            dw = dy2.t() @ x2
        else:
            dw = gemm_reference(_q(_pad(dy2, _token_multiple(g)).t(), g.lhs), ctx.qxt, out_dtype=w.dtype)
        db = dy2.sum(0) if ctx.has_bias else None
        return (dx.reshape(ctx.shape) if dx is not None else None), dw, db, None


def swap_in_reference(model: torch.nn.Module, precisions: dict[str, LinearPrecision]) -> torch.nn.Module:
    """Make every nn.Linear / Conv1D named in ``precisions`` run the reference fake-quantized linear."""
    for name, module in model.named_modules():
        if name not in precisions:
            continue
        cfg = precisions[name]
        if isinstance(module, torch.nn.Linear):
            module.forward = lambda x, m=module, c=cfg: ReferenceFakeQuantLinear.apply(x, m.weight, m.bias, c)
        else:  # Conv1D: weight stored (in, out)
            def conv_forward(x, m=module, c=cfg):
                return ReferenceFakeQuantLinear.apply(x, m.weight.t(), m.bias, c)

            module.forward = conv_forward
    return model
