"""The ``compressed-tensors`` NVFP4 layout (``format: nvfp4-pack-quantized``), as llm-compressor writes it and
vLLM and SGLang load it (docs/export.md).

Per FP4 layer ``<m>``:

- ``<m>.weight_packed``: uint8 ``(out, in / 2)``, two E2M1 codes per byte along in-features, the lower index in
  the low nibble (compressed-tensors' ``pack_fp4_to_uint8``; the layout of docs/numerics.md section 1);
- ``<m>.weight_scale``: float8_e4m3fn ``(out, in / 16)``, one block decode scale per 1 x 16 block along
  in-features (a 16x16 training tile's scale repeated over its rows, docs/numerics.md section 3.2);
- ``<m>.weight_global_scale``: float32 ``(1,)``, the **encode** scale ``S = 6 * 448 / amax``: the format
  dequantizes ``E2M1 * weight_scale / weight_global_scale`` and vLLM's kernels apply ``1 / weight_global_scale``,
  which is fp4compile's decode scale ``D`` bit for bit (``D`` is ``1 / S`` correctly rounded);
- ``<m>.input_global_scale``: float32 ``(1,)``, the activation's encode scale from calibration; the block scales
  of the activation are computed at run time (``dynamic: "local"``).

``config.json`` gets ``quantization_config`` with one config group targeting ``Linear`` and the high-precision
layers in ``ignore``.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .common import SERVING_BLOCK, FP4Layer

__all__ = ["layer_tensors", "quantization_config", "FORMAT"]

#: compressed-tensors' name of the packed NVFP4 layout (``CompressionFormat.nvfp4_pack_quantized``).
FORMAT = "nvfp4-pack-quantized"


def layer_tensors(layer: FP4Layer) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one FP4 layer."""
    m = layer.module
    return {**layer.packed_weight("weight_packed"),
            f"{m}.weight_global_scale": layer.weight_encode_scale.reshape(1).to(torch.float32),
            f"{m}.input_global_scale": layer.input_encode_scale.reshape(1).to(torch.float32)}


def _fp4_args(dynamic: "bool | str") -> dict:
    # NVFP4 in compressed-tensors: 4-bit floats, symmetric, one scale per group of 16 under a tensor-wide global
    # scale ("tensor_group"). compressed-tensors rounds the block scales it computes (the activations' at run
    # time) to E4M3 only where scale_dtype says so; older releases ignore the key.
    return {"num_bits": 4, "type": "float", "symmetric": True, "group_size": SERVING_BLOCK,
            "strategy": "tensor_group", "dynamic": dynamic, "observer": "minmax",
            "scale_dtype": "torch.float8_e4m3fn"}


def quantization_config(ignore: Iterable[str]) -> dict:
    """``config.json``'s ``quantization_config``: the weights static, the activations' block scales dynamic
    (``"local"``) under the calibrated ``input_global_scale``; the listed layers unquantized."""
    group = {"targets": ["Linear"], "weights": _fp4_args(False), "input_activations": _fp4_args("local"),
             "output_activations": None, "format": FORMAT}
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
