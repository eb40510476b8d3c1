"""NVIDIA Model Optimizer's NVFP4 checkpoint (``quant_algo: NVFP4``), as ``modelopt.torch.export`` writes it
and TensorRT-LLM, vLLM and SGLang load it (docs/export.md).

Per FP4 layer ``<m>``:

- ``<m>.weight``: uint8 ``(out, in / 2)``, two E2M1 codes per byte along in-features, the lower index in the low
  nibble (modelopt's ``NVFP4QTensor`` packs ``codes[..., 1::2] << 4 | codes[..., 0::2]``);
- ``<m>.weight_scale``: float8_e4m3fn ``(out, in / 16)``, one block decode scale per 1 x 16 block along
  in-features (a 16x16 training tile's scale repeated over its rows, docs/numerics.md section 3.2);
- ``<m>.weight_scale_2``: float32 scalar, the **decode** scale ``D`` (modelopt computes ``amax / (6 * 448)``); the
  value is ``E2M1 * weight_scale * weight_scale_2``;
- ``<m>.input_scale``: float32 scalar, the activation's decode scale from calibration (``1 / S`` for the
  calibrated amax); servers quantize activations with its inverse and apply ``input_scale * weight_scale_2``.

Beside them ``hf_quant_config.json`` (``{"producer", "quantization": {"quant_algo": "NVFP4", "group_size": 16,
"exclude_modules": [...]}}``) and, as modelopt's exporter also writes it, ``config.json``'s
``quantization_config`` with ``quant_method: "modelopt"``.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .common import SERVING_BLOCK, FP4Layer

__all__ = ["layer_tensors", "hf_quant_config", "quantization_config", "QUANT_ALGO"]

QUANT_ALGO = "NVFP4"


def layer_tensors(layer: FP4Layer) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one FP4 layer."""
    m = layer.module
    # weight_scale_2 is the forward's own D (1 / S correctly rounded, docs/numerics.md section 2 step 2).
    return {**layer.packed_weight("weight"),
            f"{m}.weight_scale_2": layer.weight.per_tensor_scale.reshape(()).to(torch.float32),
            f"{m}.input_scale": FP4Layer.decode_scale(layer.input_encode_scale).reshape(()).to(torch.float32)}


def hf_quant_config(exclude: Iterable[str], producer_version: str) -> dict:
    """``hf_quant_config.json``."""
    return {
        "producer": {"name": "fp4compile", "version": producer_version},
        "quantization": {"quant_algo": QUANT_ALGO, "kv_cache_quant_algo": None, "group_size": SERVING_BLOCK,
                         "exclude_modules": sorted(exclude)},
    }


def quantization_config(exclude: Iterable[str], producer_version: str) -> dict:
    """``config.json``'s ``quantization_config``: what modelopt's exporter derives from ``hf_quant_config.json``
    (``convert_hf_quant_config_format``) for loaders that read ``config.json`` only."""
    args = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": SERVING_BLOCK}
    return {
        "quant_method": "modelopt",
        "quant_algo": QUANT_ALGO,
        "config_groups": {"group_0": {"input_activations": dict(args), "weights": dict(args), "targets": ["Linear"]}},
        "ignore": sorted(exclude),
        "producer": {"name": "fp4compile", "version": producer_version},
    }
