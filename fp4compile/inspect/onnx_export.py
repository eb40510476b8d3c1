"""ONNX export of the rewritten forward graph, with every FP4 GEMM operand as standard ``DequantizeLinear``.

    model = export_onnx(rewritten_graph, example_inputs, "model.onnx")   # opset 23, onnx.checker-clean

How a forward GEMM ``y = x W^T + b`` that the policy put in NVFP4 looks in the ONNX graph (opset 23):

- the weight is stored quantized, as three initializers: ``<module>.weight_fp4`` (FLOAT4E2M1, shape
  ``(N, K)``, the very codes the compiled step used, packed as ONNX packs FLOAT4E2M1: two per byte, lower
  index in the low nibble), ``<module>.weight_scale_e4m3`` (FLOAT8E4M3FN, ``(N, K / 16)``; 16x16 tiles are
  stored repeated over their 16 rows, since ``block_size`` blocks one axis only) and
  ``<module>.weight_tensor_scale`` (FLOAT, the per-tensor decode scale ``D``);
- E4M3 is not a legal ``DequantizeLinear`` scale type, so the block scales are themselves dequantized
  against the per-tensor scale, ``DequantizeLinear(scale_e4m3, D) = d_b * D``, and that float tensor is the
  scale of ``DequantizeLinear(weight_fp4, d_b * D, axis=1, block_size=16)``;
- the activation ``x`` is quantized at run time by standard ops following docs/numerics.md section 2 (tensor amax,
  ``S = 2688 / amax``, block amax, ``d_b = Cast<FLOAT8E4M3FN>(min(amax_b * (S / 6), 448))``, ``x * e_b``
  clamped to [-6, 6], ``QuantizeLinear`` to FLOAT4E2M1 with scale 1, i.e. round-to-nearest-even on the E2M1
  grid), then dequantized the same two-level way as the weight;
- ``MatMul(x_hat, Transpose(W_hat))`` in FLOAT, plus the bias.

The rest of the forward graph is exported by ``torch.onnx.export(..., dynamo=True)`` with a
``custom_translation_table`` for a private op (``fp4compile_export::nvfp4_linear``) that stands in for each
FP4 site; GEMMs the policy keeps in high precision are plain ``MatMul``/``Gemm``.

Semantics and limits (checked on torch 2.13, onnx 1.23, onnxscript 0.7):

- The export is the *inference* forward: every FP4 forward GEMM rounds to nearest, as the compiled graph
  does without autograd (the NV and FATW recipes' forward GEMMs round to nearest anyway). Backward GEMMs
  have no ONNX form.
- Only NVFP4-style operands are exported: E4M3 block scales with an FP32 tensor scale, ``1 x b`` activation
  blocks, no Hadamard transform in the forward GEMM. MXFP4 (E8M0 scales) and other variants raise
  `OnnxExportError` naming the site.
- The graph must have tensor inputs only (no symbolic sizes): compile with ``dynamic=False``.
- Agreement with the compiled forward: the quantized codes and scales are the same bits; the products
  ``E2M1 * (d_b * D)`` and the float32 MatMul round in a different order than the compiled GEMM (which
  applies ``D_a D_b`` once at the end), so outputs agree to float32 rounding (a few 1e-7 relative), except
  that such a last-bit difference can move a downstream activation across an E2M1 rounding threshold. The
  tests bound the loss of the example GPT by 1e-4 relative.
- ``onnxruntime`` has no CPU kernel for FLOAT4E2M1 ``DequantizeLinear``; run the model with
  ``onnx.reference.ReferenceEvaluator`` (`run_reference`), or view it in Netron.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..numerics.api import quantize
from ..numerics.gemm import gemm_reference
from ..numerics.qtensor import QuantizedTensor
from ..ops.linear import fp4_linear
from ..passes.pipeline import copy_graph_module
from ..policy.precision import LinearPrecision, OperandPrecision

__all__ = ["OnnxExportError", "export_onnx", "run_reference", "ONNX_OPSET"]

logger = logging.getLogger(__name__)

#: The opset of the exported model: FLOAT4E2M1 in (De)QuantizeLinear with ``block_size`` needs 23.
ONNX_OPSET = 23
_FLT_MAX = 3.4028234663852886e38
_E4M3_MAX = 448.0


class OnnxExportError(RuntimeError):
    """The graph cannot be expressed in ONNX by this exporter (the message says which site and why)."""


# --- the stand-in op each FP4 site becomes for torch.export ------------------------------------------------

@torch.library.custom_op("fp4compile_export::nvfp4_linear", mutates_args=())
def _nvfp4_linear(x: torch.Tensor, w_data: torch.Tensor, w_scale: torch.Tensor, w_tensor_scale: torch.Tensor,
                  bias: Optional[torch.Tensor], lhs: str) -> torch.Tensor:
    """``x W^T + b`` with ``x`` quantized as ``lhs`` says (round to nearest) and ``W`` given quantized:
    codes (float4_e2m1fn_x2), E4M3 scales repeated to 1 x b blocks, tensor scale."""
    op = OperandPrecision.decode(lhs)
    k = x.shape[-1]
    q_x = quantize(x.reshape(-1, k), op.format, op.block)
    q_w = QuantizedTensor(w_data.view(torch.uint8), w_scale, w_tensor_scale, op.format, (1, op.format.block_size))
    y = gemm_reference(q_x, q_w, bias=bias, out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


@_nvfp4_linear.register_fake
def _nvfp4_linear_fake(x, w_data, w_scale, w_tensor_scale, bias, lhs):
    return x.new_empty((*x.shape[:-1], w_data.shape[0]))


def _translate_nvfp4_linear(x, w_data, w_scale, w_tensor_scale, bias=None, lhs: str = ""):
    """The ONNX form of ``fp4compile_export::nvfp4_linear`` (traced by onnxscript inside torch.onnx.export)."""
    from onnxscript import ir
    from onnxscript import opset23 as op

    b = OperandPrecision.decode(lhs).format.block_size
    f32 = ir.DataType.FLOAT

    def c(value: float):
        return op.Constant(value_float=value)

    # The weight: DequantizeLinear(E4M3 scales, D) feeds DequantizeLinear(FLOAT4E2M1 codes, ., block_size).
    w_block_scale = op.DequantizeLinear(w_scale, w_tensor_scale)
    w_hat = op.DequantizeLinear(w_data, w_block_scale, axis=1, block_size=b)

    # The activation, quantized at run time (docs/numerics.md section 2, round to nearest).
    xf = op.Cast(x, to=f32)
    amax = op.ReduceMax(op.Abs(xf), keepdims=0)
    s = op.Min(op.Div(c(6.0 * _E4M3_MAX), amax), c(_FLT_MAX))
    s = op.Where(op.Or(op.Equal(amax, c(0.0)), op.Equal(s, c(0.0))), c(1.0), s)
    d = op.Div(c(1.0), s)
    blocked_shape = op.Concat(op.Shape(xf, end=-1), op.Div(op.Shape(xf, start=-1), op.Constant(value_ints=[b])),
                              op.Constant(value_ints=[b]), axis=0)
    blocks = op.Reshape(xf, blocked_shape)
    block_amax = op.ReduceMax(op.Abs(blocks), op.Constant(value_ints=[-1]), keepdims=0)
    d_b = op.Cast(op.Min(op.Mul(block_amax, op.Mul(s, c(1.0 / 6.0))), c(_E4M3_MAX)), to=ir.DataType.FLOAT8E4M3FN)
    e_b = op.Min(op.Div(c(1.0), op.Mul(op.Cast(d_b, to=f32), d)), c(_FLT_MAX))
    scaled = op.Mul(blocks, op.Unsqueeze(e_b, op.Constant(value_ints=[-1])))
    scaled = op.Reshape(op.Clip(scaled, c(-6.0), c(6.0)), op.Shape(xf))
    x_fp4 = op.QuantizeLinear(scaled, c(1.0), output_dtype=ir.DataType.FLOAT4E2M1)
    x_hat = op.DequantizeLinear(x_fp4, op.DequantizeLinear(d_b, d), axis=-1, block_size=b)

    y = op.MatMul(x_hat, op.Transpose(w_hat, perm=[1, 0]))
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=f32))
    return op.CastLike(y, x)


# --- preparing the rewritten graph ------------------------------------------------------------------------

def _state_name(placeholder: fx.Node, index: int) -> str:
    """``L_self_modules_transformer_modules_wte_parameters_weight_`` -> ``transformer.wte.weight``."""
    name = str(placeholder.target)
    name = re.sub(r"^[Ll]_self_", "", name).rstrip("_")
    name = re.sub(r"(^|_)(modules|parameters|buffers)_", ".", name).strip(".")
    return name or f"input_{index}"


def _set_nested(root: torch.nn.Module, dotted: str, tensor: torch.Tensor) -> str:
    """Register ``tensor`` as a buffer at the dotted path under ``root`` (creating empty modules on the way);
    returns the path used (a numbered one where the readable one is taken)."""
    parts = [p if p else "_" for p in dotted.split(".")]
    module = root
    for part in parts[:-1]:
        child = getattr(module, part, None)
        if child is None:
            child = torch.nn.Module()
            module.add_module(part, child)
        elif not isinstance(child, torch.nn.Module):
            return _set_nested(root, f"_state.n{len(list(root.buffers()))}", tensor)
        module = child
    if hasattr(module, parts[-1]):
        return _set_nested(root, f"_state.n{len(list(root.buffers()))}", tensor)
    module.register_buffer(parts[-1], tensor)
    return ".".join(parts)


def _check_operand(op: OperandPrecision, site: str, which: str, activation: bool) -> None:
    fmt = op.format
    problems = []
    if fmt.scale_format.name != "e4m3" or not fmt.tensor_scale:
        problems.append(f"format {fmt.name!r} has {fmt.scale_format.name} block scales"
                        f"{'' if fmt.tensor_scale else ' and no tensor scale'} (only E4M3 + FP32 tensor scale is exported)")
    if op.hadamard:
        problems.append("the Hadamard transform has no ONNX form here")
    if activation and op.block[0] != 1:
        problems.append(f"activation blocks must be 1 x b, got {op.block}")
    if problems:
        raise OnnxExportError(f"cannot export the forward GEMM of {site or '<unnamed site>'} ({which} operand "
                              f"{op.describe()}): {'; '.join(problems)}")


def _prepare(rewritten: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """A copy of ``rewritten`` whose module state is buffers, whose FP4 sites call the stand-in op with their
    weights quantized, and whose placeholders are the user inputs only; returns it and those inputs."""
    gm = copy_graph_module(rewritten)
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise ValueError(f"export_onnx: the graph has {len(placeholders)} inputs but {len(example_inputs)} example "
                         f"inputs were given")
    user_inputs: list[torch.Tensor] = []
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(value, torch.Tensor):
            raise OnnxExportError(f"export_onnx: graph input {node.target!r} is a {type(value).__name__}, not a tensor "
                                  f"(symbolic sizes): compile with dynamic=False to export")
        is_state = isinstance(value, torch.nn.Parameter) or "_parameters_" in str(node.target) or "_buffers_" in str(node.target)
        if not is_state:
            user_inputs.append(value.detach())
            continue
        path = _set_nested(gm, _state_name(node, i), value.detach().clone())
        with graph.inserting_before(node):
            attr = graph.get_attr(path)
        attr.meta = dict(node.meta)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)

    # The actual weight of every FP4 site (a transpose for GPT-2's Conv1D, ...): run the graph once.
    sites: dict[str, torch.Tensor] = {}

    class _Recorder(fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if target is fp4_linear:
                sites[self.current_node_name] = args[1].detach()
            return super().call_function(target, args, kwargs)

        def run_node(self, n):
            self.current_node_name = n.name
            return super().run_node(n)

    gm.recompile()
    with torch.no_grad():
        _Recorder(gm).run(*user_inputs)

    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not fp4_linear:
            continue
        x, weight, bias, precision, _out_dtype, site = node.args[:6]  # then the GEMM paths
        fwd = LinearPrecision.decode(precision).forward
        if fwd.is_high:
            node.target, node.args = F.linear, (x, weight, bias)
            continue
        _check_operand(fwd.lhs, site, "activation", True)
        _check_operand(fwd.rhs, site, "weight", False)
        q_w = quantize(sites[node.name], fwd.rhs.format, fwd.rhs.block)
        scale = q_w.row_block_scales()
        base = f"{site or node.name}"
        names = [
            _set_nested(gm, f"{base}.weight_fp4", q_w.qdata.view(torch.float4_e2m1fn_x2).contiguous()),
            _set_nested(gm, f"{base}.weight_scale_e4m3", scale.contiguous()),
            _set_nested(gm, f"{base}.weight_tensor_scale", q_w.per_tensor_scale.clone()),
        ]
        with graph.inserting_before(node):
            attrs = [graph.get_attr(n) for n in names]
        node.target = torch.ops.fp4compile_export.nvfp4_linear.default
        node.args = (x, *attrs, bias, fwd.lhs.encode())
    graph.eliminate_dead_code()
    gm.recompile()
    gm.eval()
    return gm, user_inputs


def export_onnx(rewritten: fx.GraphModule, example_inputs: Sequence[Any], path: "Optional[str | os.PathLike]" = None):
    """Export the forward of a rewritten graph (`fp4compile.passes.pipeline.run_passes(...).graph_module`)
    to ONNX opset 23 with its FP4 GEMM operands as ``DequantizeLinear`` of FLOAT4E2M1 data (module docstring).

    Args:
        rewritten: the graph after ``rewrite_gemms``; it is not modified.
        example_inputs: the inputs the graph was compiled with (Dynamo's: parameters included). Parameters
            and buffers become initializers, the other tensors the ONNX model's inputs, in order.
        path: where to save the model (optional).

    Returns:
        The ``onnx.ModelProto``; ``onnx.checker.check_model(model, full_check=True)`` passes on it.

    Raises:
        OnnxExportError: a site or input this exporter cannot express (the message names it).
        ImportError: ``onnx``/``onnxscript`` are missing (``pip install onnxscript``).
    """
    if not isinstance(rewritten, fx.GraphModule):
        raise TypeError(f"export_onnx: rewritten must be a torch.fx.GraphModule, got {type(rewritten).__name__}")
    import onnx

    gm, user_inputs = _prepare(rewritten, example_inputs)
    table = {torch.ops.fp4compile_export.nvfp4_linear.default: _translate_nvfp4_linear}
    log = io.StringIO()
    registry_logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_logger.level
    registry_logger.setLevel(logging.ERROR)  # "torchvision is not installed" warnings: not ours to show
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            # torch.export's run_decompositions deep-copies its module call graph, whose pytree specs warn that
            # `isinstance(treespec, LeafSpec)` is deprecated (torch 2.13): torch's own call, nothing we pass.
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            program = torch.onnx.export(gm, tuple(user_inputs), dynamo=True, opset_version=ONNX_OPSET,
                                        custom_translation_table=table, optimize=True, verbose=False)
    except Exception as exc:
        raise OnnxExportError(f"torch.onnx.export failed on the rewritten forward graph: {exc}") from exc
    finally:
        registry_logger.setLevel(level)
    logger.debug("torch.onnx.export: %s", log.getvalue())
    model = program.model_proto
    model.producer_name = "fp4compile"
    model.doc_string = ("Forward graph rewritten by fp4compile: FP4 GEMM operands are DequantizeLinear of FLOAT4E2M1 "
                        "data (block_size) whose scales are DequantizeLinear of E4M3 block scales against the FP32 "
                        "per-tensor scale.")
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        onnx.save(model, os.fspath(path))
    return model


def run_reference(model: Any, inputs: Sequence[torch.Tensor]) -> list:
    """Run an exported model with ``onnx.reference.ReferenceEvaluator`` on torch tensors (in graph-input
    order); returns its outputs as NumPy arrays. ``model`` is a ModelProto or a path."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model))
    names = [i.name for i in model.graph.input]
    if len(names) != len(inputs):
        raise ValueError(f"run_reference: the model has inputs {names} but {len(inputs)} tensors were given")
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}
    return ReferenceEvaluator(model).run(None, feeds)
