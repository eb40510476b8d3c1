"""What every checkpoint format shares: which layers are FP4, their forward weights and activation amaxes (from
one calibration pass through the fp4 backend), the checks, and writing a folder atomically.

The layers come from the backend itself: the model is compiled with `fp4compile.Fp4Backend` (the same passes,
policy and shape legalization as in training) and run on the calibration batches without gradients; the
precision table's forward rows say which sites run in FP4, and a quantization observer
(`fp4compile.ops.observe`) hands over, per site, the quantized weight the forward GEMM used and the amax of
its input. Nothing here re-derives the policy's rule.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ..numerics.formats import E4M3, NVFP4
from ..numerics.qtensor import QuantizedTensor
from ..numerics.reference import tensor_encode_scale
from ..policy.recipe import Policy

__all__ = ["ExportFormat", "FP4Layer", "ExportPlan", "plan_export", "write_folder", "high_precision_state",
           "SERVING_BLOCK", "FUSED_SIBLINGS", "unshared_fused_scales"]

logger = logging.getLogger(__name__)

#: Elements per block along in-features in both serving formats (one E4M3 scale per 1 x 16 block).
SERVING_BLOCK = 16


class ExportFormat(str, enum.Enum):
    """The checkpoint layouts `fp4compile.export` writes (docs/export.md)."""

    COMPRESSED_TENSORS = "compressed-tensors"
    MODELOPT = "modelopt"


@dataclasses.dataclass(frozen=True)
class FP4Layer:
    """One linear layer whose forward GEMM ran in NVFP4.

    Attributes:
        module: the module path (``model.named_modules()``), the prefix of its tensors in the checkpoint.
        weight: the forward GEMM's quantized weight, ``(out_features, in_features)`` (a GPT-2 ``Conv1D``'s
            stored ``(in, out)`` weight transposed, as its GEMM uses it).
        weight_encode_scale: the weight's global encode scale ``S = 6 * 448 / amax`` (float32 0-dim) of the weight
            the forward quantized; ``1 / S`` correctly rounded is its decode scale ``D``.
        input_amax: the largest ``max |x|`` of the layer's input over the calibration batches (float32 0-dim).
        reason: the precision table's reason for the forward decision.
    """

    module: str
    weight: QuantizedTensor
    weight_encode_scale: torch.Tensor
    input_amax: torch.Tensor
    reason: str

    @property
    def input_encode_scale(self) -> torch.Tensor:
        """The activation's global encode scale for the calibrated amax, computed as the backend computes it for a
        tensor of that amax (docs/numerics.md section 2 step 2); 1 where the amax is 0."""
        return tensor_encode_scale(self.input_amax.to(torch.float32), NVFP4)

    def packed_weight(self, codes_name: str) -> dict[str, torch.Tensor]:
        """What both formats store alike: ``<module>.<codes_name>``, uint8 ``(out, in / 2)`` with the lower index
        in the low nibble (docs/numerics.md section 1), and ``<module>.weight_scale``, float8_e4m3fn
        ``(out, in / 16)``, a 16x16 tile's scale repeated over its rows (docs/numerics.md section 3.2)."""
        return {f"{self.module}.{codes_name}": self.weight.qdata.contiguous(),
                f"{self.module}.weight_scale": self.weight.row_block_scales().contiguous()}

    @staticmethod
    def decode_scale(encode: torch.Tensor) -> torch.Tensor:
        """``1 / S`` correctly rounded in float32: the decode scale ``D`` of docs/numerics.md section 2 step 2."""
        return torch.ones_like(encode) / encode


#: Sibling layers that vLLM and SGLang fuse into one GEMM (Llama-style names): the fused layer applies one weight
#: global scale, the largest encode scale of the siblings, to all of them.
FUSED_SIBLINGS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def unshared_fused_scales(layers: Mapping[str, FP4Layer]) -> list[list[str]]:
    """The groups of FP4 sibling layers (`FUSED_SIBLINGS` under one parent module) whose weight global scales
    differ. Training quantizes each layer with its own tensor scale (docs/numerics.md section 2 step 2); a server
    that fuses them decodes all with one scale, so their weights are then off by the ratio of the scales."""
    groups = []
    for siblings in FUSED_SIBLINGS:
        parents = {m.rsplit(".", 1)[0] for m in layers if m.rsplit(".", 1)[-1] in siblings}
        for parent in sorted(parents):
            names = [f"{parent}.{s}" for s in siblings if f"{parent}.{s}" in layers]
            scales = {layers[n].weight_encode_scale.item() for n in names}
            if len(names) > 1 and len(scales) > 1:
                groups.append(names)
    return groups


@dataclasses.dataclass
class ExportPlan:
    """What the calibration pass found: the FP4 layers, and the other weight GEMM sites with their reasons."""

    fp4: dict[str, FP4Layer]
    high_precision: dict[str, str]


class _Recorder:
    """A quantization observer: per site, the forward weight and the running input amax."""

    def __init__(self) -> None:
        self.weights: dict[str, QuantizedTensor] = {}
        self.weight_scales: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, QuantizedTensor] = {}
        self.amax: dict[str, torch.Tensor] = {}

    def __call__(self, label: str, x: torch.Tensor, qt: QuantizedTensor) -> None:
        module, role, operand = label.rsplit(":", 2)
        if role != "forward":
            return
        if operand == "rhs":
            self.weights[module] = qt
            self.weight_scales[module] = tensor_encode_scale(_amax(x), qt.format)
        else:
            self.inputs[module] = qt
            amax = _amax(x)
            previous = self.amax.get(module)
            self.amax[module] = amax if previous is None else torch.maximum(previous, amax)


def _amax(x: torch.Tensor) -> torch.Tensor:
    return x.detach().abs().amax().to(torch.float32) if x.numel() else torch.zeros(())


def _check_operand(module: str, shape: Sequence[int], qt: QuantizedTensor, described: str, which: str) -> None:
    """The forward GEMM's ``which`` operand (``qt``, the table's description ``described``) must be what the
    serving formats hold: NVFP4 (E4M3 block scales, an FP32 tensor scale), blocks of 16 along in-features, round to
    nearest, no Hadamard transform."""
    fmt = qt.format
    problems = []
    if fmt.scale_format is not E4M3 or not fmt.tensor_scale:
        problems.append(f"its format {fmt.name!r} is not NVFP4 (E4M3 block scales with an FP32 tensor scale)")
    if fmt.block_size != SERVING_BLOCK:
        problems.append(f"it was quantized in blocks of {fmt.block_size}, the formats hold blocks of {SERVING_BLOCK}")
    if "RN" not in described.split() or qt.hadamard:
        problems.append(f"it was quantized as {described}, the formats hold round-to-nearest without a Hadamard "
                        f"transform")
    if shape[-1] % SERVING_BLOCK:
        problems.append(f"in_features {shape[-1]} is not a multiple of {SERVING_BLOCK}")
    if problems:
        raise ValueError(f"cannot export layer {module!r} (weight {tuple(shape)} as (out_features, in_features)) in "
                         f"an NVFP4 checkpoint: {which}: {'; '.join(problems)}. Keep it in high precision with the "
                         f"policy (e.g. recipes.nvfp4(high_precision=[{module!r}])) and train with that policy")


def _check_module(model: nn.Module, module: str, weight_name: str) -> None:
    """The checkpoint formats quantize a layer's own ``weight``; a site on another parameter (an attention
    module's packed ``in_proj_weight``, a tied output head) has no place in them."""
    if weight_name != f"{module}.weight" or module not in dict(model.named_modules()):
        raise ValueError(f"cannot export layer {module!r} in an NVFP4 checkpoint: its FP4 GEMM multiplies "
                         f"{weight_name!r}, not the layer's own weight; the formats quantize nn.Linear weights only. "
                         f"Keep it in high precision with the policy (e.g. recipes.nvfp4(high_precision=[{module!r}]))")


def plan_export(model: nn.Module, batches: Iterable[Any], policy: "Policy | str | None" = None,
                progress: bool = True) -> ExportPlan:
    """Run ``batches`` through ``model`` compiled with the fp4 backend (``policy``; default the NV recipe),
    without gradients and in eval mode (no dropout; the model's mode is restored), and collect the FP4 layers
    (`FP4Layer`) and the sites kept in high precision.

    Raises:
        ValueError: no batch, or a layer the NVFP4 checkpoint formats cannot hold (the message names it).
    """
    from ..capture.compiler import Fp4Backend
    from ..inspect.sensitivity import call_with_batch
    from ..ops.observe import observe_quantization
    from ..policy.schedule import StepCounter

    batches = list(batches)
    if not batches:
        raise ValueError("fp4compile.export: batches must hold at least one batch (the calibration pass runs the "
                         "model through the fp4 backend to find its FP4 layers and their input scales), got none")
    # inner="eager": the quantize ops and their numerics are the same under any inner compiler; eager compiles
    # in seconds on CPU. A step counter of its own makes this backend unequal to any other (the training one
    # included), so Dynamo compiles the frames again for it instead of reusing another backend's graphs, and its
    # precision table holds them. The counter stays at step 0: a schedule's FP4 phase is what is exported.
    backend = Fp4Backend(policy=policy, inner="eager", model=model, step_counter=StepCounter())
    compiled = torch.compile(model, backend=backend, dynamic=False)
    recorder = _Recorder()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), observe_quantization(recorder):
            for batch in _progress(batches, progress):
                call_with_batch(compiled, batch)
    finally:
        model.train(was_training)

    fp4: dict[str, FP4Layer] = {}
    high: dict[str, str] = {}
    for row in (r for r in backend.rows() if r.role == "forward"):
        if row.precision == "high":
            high.setdefault(row.module, row.reason)
            continue
        if row.module in fp4:
            continue
        _check_module(model, row.module, row.weight)
        weight = recorder.weights.get(row.module)
        if weight is None or row.module not in recorder.amax:
            raise ValueError(f"fp4compile.export: the FP4 site {row.module!r} was compiled but not run on the "
                             f"calibration batches (its input amax is unknown)")
        _check_operand(row.module, tuple(weight.shape), recorder.inputs[row.module], row.lhs, "activation")
        _check_operand(row.module, tuple(weight.shape), weight, row.rhs, "weight")
        fp4[row.module] = FP4Layer(row.module, weight, recorder.weight_scales[row.module], recorder.amax[row.module],
                                   row.reason)
    conflicting = sorted(set(fp4) & set(high))
    if conflicting:
        raise ValueError(f"fp4compile.export: layers {conflicting} run in FP4 in one compiled graph and in high "
                         f"precision in another; a checkpoint holds one weight per layer")
    logger.info("fp4compile export: %d FP4 layers, %d weight GEMM sites in high precision", len(fp4), len(high))
    return ExportPlan(fp4, high)


def _progress(batches: list, enabled: bool):
    if not enabled:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, desc="fp4compile export: calibration", unit="batch")


def high_precision_state(model: nn.Module, skip: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` without the keys in ``skip``, floating tensors in ``dtype``, each storage once
    (a tied weight under its first name, as Hugging Face's ``save_pretrained`` keeps it)."""
    skip = set(skip)
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in model.state_dict().items():
        if name in skip:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        tensor = tensor.detach()
        out[name] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous().cpu()
    return out


def write_folder(path: "str | os.PathLike", tensors: Mapping[str, torch.Tensor], json_files: Mapping[str, dict],
                 extra: Optional[Callable[[str], None]] = None) -> str:
    """Write ``model.safetensors`` and the ``json_files`` into a new folder ``path``, all or nothing: everything
    goes into a temporary folder beside it, renamed to ``path`` at the end (removed on any error).
    ``extra(folder)`` may add files (a tokenizer) before the rename."""
    from safetensors.torch import save_file

    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path):
        raise ValueError(f"fp4compile.export: {path} already exists; give a path that does not exist (the "
                         f"checkpoint is written to a new folder)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}  # a model trained on a GPU
        save_file(cpu, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name, content in json_files.items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(content, f, indent=2, sort_keys=False)
                f.write("\n")
        if extra is not None:
            extra(tmp)
        _default_permissions(tmp)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _default_permissions(folder: str) -> None:
    """The permissions a plain ``mkdir`` and ``open`` would have given (``mkdtemp`` makes the folder 0700, and
    a checkpoint is usually read by a server running as another user)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)
