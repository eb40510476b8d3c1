"""Export a model trained with FP4 GEMMs as an NVFP4 checkpoint that serving stacks load (docs/export.md).

    fp4compile.export(model, "out/llama-nvfp4", batches=calibration_batches, format="compressed-tensors")

The layers whose forward GEMM the policy ran in NVFP4 are written quantized, with the very codes and scales
the forward used; every other tensor is written in ``dtype`` (bfloat16), and the high-precision linear layers
are listed in the format's ignore list. Two layouts: ``"compressed-tensors"`` (llm-compressor's
``nvfp4-pack-quantized``) and ``"modelopt"`` (NVIDIA Model Optimizer's ``hf_quant_config.json`` checkpoint).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from ..policy.recipe import Policy
from . import compressed_tensors, modelopt
from .common import ExportFormat, FP4Layer, high_precision_state, plan_export, unshared_fused_scales, write_folder

__all__ = ["export", "ExportFormat", "ExportResult", "FP4Layer"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ExportResult:
    """What `export` wrote.

    Attributes:
        path: the checkpoint folder.
        format: the layout.
        fp4_layers: the layers written in NVFP4, by module path.
        ignored: the linear layers written in high precision (the format's ignore list), by module path.
        high_precision_reasons: the precision table's reason for each weight GEMM site kept in high precision.
        unshared_fused_scales: groups of layers that vLLM and SGLang fuse (q/k/v, gate/up) whose weight global
            scales differ (see docs/export.md, "Fused layers").
    """

    path: str
    format: ExportFormat
    fp4_layers: dict[str, FP4Layer]
    ignored: list[str]
    high_precision_reasons: dict[str, str]
    unshared_fused_scales: list[list[str]]


def _parse_format(format: "str | ExportFormat") -> ExportFormat:
    try:
        return ExportFormat(format)
    except ValueError:
        raise ValueError(f"fp4compile.export: format must be one of {[f.value for f in ExportFormat]}, "
                         f"got {format!r}") from None


def _linear_layers(model: nn.Module) -> list[str]:
    """The module paths of the layers the formats' ``Linear`` target means (``nn.Linear`` and GPT-2's ``Conv1D``,
    as the sensitivity tool finds them)."""
    from ..inspect.sensitivity import find_sites

    return list(find_sites(model))


def _model_config(model: nn.Module, quantization_config: Optional[dict], dtype: torch.dtype) -> dict:
    """``config.json``: a Hugging Face model's own configuration with ``quantization_config`` added; for another
    model only ``quantization_config``."""
    config = getattr(model, "config", None)
    out: dict[str, Any] = dict(config.to_dict()) if hasattr(config, "to_dict") else {}
    if out:
        out.setdefault("architectures", [type(model).__name__])
        dtype_name = str(dtype).removeprefix("torch.")
        keys = [k for k in ("dtype", "torch_dtype") if k in out] or ["torch_dtype"]
        for key in keys:
            out[key] = dtype_name
    if quantization_config is not None:
        out["quantization_config"] = quantization_config
    return out


def _extra_files(model: nn.Module, tokenizer: Any):
    """Writes the generation config of a Hugging Face model and the tokenizer into the folder being built."""

    def write(folder: str) -> None:
        generation = getattr(model, "generation_config", None)
        if generation is not None and hasattr(generation, "save_pretrained"):
            generation.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    return write


def export(
    model: nn.Module,
    path: "str | os.PathLike",
    batches: Iterable[Any],
    format: "str | ExportFormat" = ExportFormat.COMPRESSED_TENSORS,
    policy: "Policy | str | None" = None,
    tokenizer: Any = None,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
) -> ExportResult:
    """Write ``model`` as an NVFP4 checkpoint folder at ``path`` (docs/export.md).

    The FP4 layers are those whose forward GEMM ``policy`` (the one the model was trained with; default the NV
    recipe) runs in NVFP4, found by compiling the model with the fp4 backend and running ``batches`` through it
    without gradients. That pass also calibrates the activations' global scales (the largest input amax per
    layer over ``batches``). Each FP4 weight is written as the forward quantized it (round to nearest; a 16x16
    tile's scale repeated over its 16 rows in the formats' 1 x 16 layout, exactly the same values,
    docs/numerics.md section 3.2).

    Args:
        model: the trained model (a Hugging Face model's ``config``/``generation_config`` are written too).
        path: the folder to create; it must not exist. Written beside it first and renamed when complete.
        batches: calibration batches: each a mapping of keyword inputs (``{"input_ids": ...}``), a tuple of
            positional inputs, or one tensor; at least one.
        format: ``"compressed-tensors"`` or ``"modelopt"``.
        policy: the training policy, as for `fp4compile.backend`.
        tokenizer: anything with ``save_pretrained(folder)`` (a Hugging Face tokenizer), written beside the weights.
        dtype: the dtype of every tensor not in FP4.
        progress: show a progress bar over the calibration batches.

    Returns:
        An `ExportResult`.

    Raises:
        ValueError: an unknown format, a path that exists, no batches, a model with no FP4 layer, or an FP4
            layer the formats cannot hold (named in the message); nothing is left at ``path``.
    """
    from .. import __version__

    if not isinstance(model, nn.Module):
        raise TypeError(f"fp4compile.export: model must be a torch.nn.Module, got {type(model).__name__}")
    fmt = _parse_format(format)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"fp4compile.export: path must be a str or os.PathLike, got {type(path).__name__}")
    if os.path.lexists(os.fspath(path)):
        raise ValueError(f"fp4compile.export: {os.fspath(path)} already exists; give a path that does not exist")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"fp4compile.export: dtype must be a floating torch.dtype, got {dtype!r}")

    plan = plan_export(model, batches, policy, progress)
    if not plan.fp4:
        raise ValueError("fp4compile.export: the policy runs no linear layer of this model in FP4 (every weight GEMM "
                         "site is high precision), so there is nothing to write in NVFP4; the reasons: "
                         + "; ".join(f"{m or '<root>'}: {r}" for m, r in sorted(plan.high_precision.items())))
    unshared = unshared_fused_scales(plan.fp4)
    if unshared:
        # A warning, not an error: the checkpoint holds exactly the trained weights; it is the fusing server
        # that would change them (docs/export.md, "Fused layers").
        logger.warning("fp4compile export: %d groups of layers that vLLM and SGLang fuse into one GEMM have different "
                       "weight global scales (e.g. %s); those servers decode a fused layer with one scale, so these "
                       "weights would not be served exactly as trained (docs/export.md, 'Fused layers')",
                       len(unshared), ", ".join(unshared[0]))
    ignored = [m for m in _linear_layers(model) if m not in plan.fp4]
    tensors = high_precision_state(model, (f"{m}.weight" for m in plan.fp4), dtype)
    writer = compressed_tensors if fmt is ExportFormat.COMPRESSED_TENSORS else modelopt
    for layer in plan.fp4.values():
        tensors.update(writer.layer_tensors(layer))
    if fmt is ExportFormat.COMPRESSED_TENSORS:
        files = {"config.json": _model_config(model, compressed_tensors.quantization_config(ignored), dtype)}
    else:
        files = {"config.json": _model_config(model, modelopt.quantization_config(ignored, __version__), dtype),
                 "hf_quant_config.json": modelopt.hf_quant_config(ignored, __version__)}
    written = write_folder(path, tensors, files, _extra_files(model, tokenizer))
    logger.info("fp4compile export: wrote %s (%s): %d layers in NVFP4, %d in %s", written, fmt.value, len(plan.fp4),
                len(ignored), dtype)
    return ExportResult(written, fmt, plan.fp4, ignored, plan.high_precision, unshared)
