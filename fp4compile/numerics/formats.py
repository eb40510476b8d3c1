"""FP4 formats as data: the E2M1 element, the 8-bit block-scale formats, and block-scaled FP4 formats.

Spec: docs/numerics.md section 1. A format is a frozen dataclass, so research sweeps over block size
and scale format (FATW swept blocks 8..128 and scales E1M6..E8M0) are parameters, not kernels.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Optional

import torch

__all__ = [
    "E2M1_VALUES",
    "E2M1_MAX",
    "ScaleFormat",
    "ScaleRounding",
    "Rounding",
    "Fp4Format",
    "SCALE_FORMATS",
    "NVFP4",
    "MXFP4",
    "resolve_format",
    "BLOCK_SIZES",
]

#: Magnitudes of the eight E2M1 codes 0..7 (docs/numerics.md section 1); bit 3 of a code is the sign.
E2M1_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0

#: Block sizes a format may use (FATW's sweep, docs/numerics.md section 1).
BLOCK_SIZES: tuple[int, ...] = (8, 16, 32, 64, 128)


class Rounding(str, enum.Enum):
    """How an element is rounded to E2M1 (docs/numerics.md section 2 step 5)."""

    NEAREST = "nearest"
    STOCHASTIC = "stochastic"


class ScaleRounding(str, enum.Enum):
    """How a block's decode scale is chosen from the block amax.

    ``NEAREST``: ``d = round_to_nearest_even(amax_b * S / 6)`` in the scale format (NVFP4, docs/numerics.md section 2
    step 3). ``FLOOR``: power-of-two ``d = 2^(floor(log2(amax_b)) - 2)``, the OCP MX rule; the block max may saturate.
    ``CEIL``: the smallest power of two with ``6 * d >= amax_b`` (NV's MXFP4 variant; nothing saturates).
    """

    NEAREST = "nearest"
    FLOOR = "floor"
    CEIL = "ceil"


@dataclasses.dataclass(frozen=True)
class ScaleFormat:
    """An 8-bit floating-point format for block decode scales.

    Values follow the "fn" convention of ``torch.float8_e4m3fn``: exponent bias ``2^(E-1) - 1``, subnormals,
    no infinities, NaN only where every exponent and mantissa bit is set. ``E5M2`` follows IEEE (its top
    exponent is reserved) as ``torch.float8_e5m2`` does. ``E8M0`` is the unsigned power-of-two format
    ``torch.float8_e8m0fnu``. Formats without a torch dtype are emulated exactly and stored as float32.
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    max_value: float
    min_value: float  # the smallest positive value (subnormal where the format has subnormals)
    torch_dtype: Optional[torch.dtype] = None

    @property
    def is_power_of_two(self) -> bool:
        return self.mantissa_bits == 0

    @property
    def bias(self) -> int:
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def min_normal_exponent(self) -> int:
        return 1 - self.bias

    @property
    def storage_dtype(self) -> torch.dtype:
        """The dtype of a quantized tensor's ``scale`` for this format."""
        return self.torch_dtype if self.torch_dtype is not None else torch.float32


def _fn_format(name: str, e: int, m: int, dtype: Optional[torch.dtype] = None) -> ScaleFormat:
    """An "fn"-style format: the all-ones exponent is a normal binade whose all-ones mantissa is NaN."""
    bias = 2 ** (e - 1) - 1
    top_exponent = (2**e - 1) - bias
    # The largest finite mantissa at the top exponent is all ones but the last bit (that pattern is NaN);
    # with no mantissa bits that leaves nothing, so the top binade below it holds the maximum.
    if m == 0:
        max_value = 2.0 ** (top_exponent - 1)
    else:
        max_value = 2.0**top_exponent * (2.0 - 2.0 ** (1 - m))
    min_value = 2.0 ** (1 - bias - m)
    return ScaleFormat(name, e, m, max_value, min_value, dtype)


E4M3 = _fn_format("e4m3", 4, 3, torch.float8_e4m3fn)
E5M2 = ScaleFormat("e5m2", 5, 2, 57344.0, 2.0**-16, torch.float8_e5m2)
E8M0 = ScaleFormat("e8m0", 8, 0, 2.0**127, 2.0**-127, torch.float8_e8m0fnu)
E1M6 = _fn_format("e1m6", 1, 6)
E2M5 = _fn_format("e2m5", 2, 5)
E3M4 = _fn_format("e3m4", 3, 4)
E6M1 = _fn_format("e6m1", 6, 1)

#: Every block-scale format by name.
SCALE_FORMATS: dict[str, ScaleFormat] = {f.name: f for f in (E4M3, E5M2, E8M0, E1M6, E2M5, E3M4, E6M1)}


@dataclasses.dataclass(frozen=True)
class Fp4Format:
    """A block-scaled FP4 format: E2M1 elements, one ``scale_format`` scale per block, optional FP32 tensor scale.

    Args:
        block_size: elements per block along the reduction axis (one of ``BLOCK_SIZES``).
        scale_format: the format of the per-block decode scale.
        tensor_scale: whether a per-tensor FP32 decode scale ``D`` is used (docs/numerics.md section 2 step 2).
        scale_rounding: how the block scale is rounded (``NEAREST`` for non-power-of-two scale formats).
        name: a display name; derived from the fields when empty.
    """

    block_size: int = 16
    scale_format: ScaleFormat = E4M3
    tensor_scale: bool = True
    scale_rounding: ScaleRounding = ScaleRounding.NEAREST
    name: str = dataclasses.field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"Fp4Format: block_size must be one of {BLOCK_SIZES}, got {self.block_size}")
        if not isinstance(self.scale_format, ScaleFormat):
            raise TypeError(f"Fp4Format: scale_format must be a ScaleFormat, got {type(self.scale_format).__name__}")
        rounding = ScaleRounding(self.scale_rounding)
        object.__setattr__(self, "scale_rounding", rounding)
        if self.scale_format.is_power_of_two == (rounding is ScaleRounding.NEAREST):
            raise ValueError(
                f"Fp4Format: scale_rounding {rounding.value!r} does not fit scale format "
                f"{self.scale_format.name!r}: power-of-two scales take 'floor' or 'ceil', others 'nearest'"
            )
        if not self.name:
            object.__setattr__(self, "name", self.spec)

    @property
    def spec(self) -> str:
        """A canonical string that names this format exactly, e.g. ``e2m1:e4m3:16:ts:nearest``."""
        ts = "ts" if self.tensor_scale else "nots"
        return f"e2m1:{self.scale_format.name}:{self.block_size}:{ts}:{self.scale_rounding.value}"

    @property
    def family(self) -> str:
        """``"nvfp4"``, ``"mxfp4"`` or ``"fp4"`` for other variants: the precision column of the table."""
        if self.scale_format is E4M3 and self.tensor_scale:
            return "nvfp4"
        if self.scale_format is E8M0 and not self.tensor_scale:
            return "mxfp4"
        return "fp4"

    @property
    def scale_max(self) -> float:
        return self.scale_format.max_value


NVFP4 = Fp4Format(16, E4M3, True, ScaleRounding.NEAREST, "nvfp4")
MXFP4 = Fp4Format(32, E8M0, False, ScaleRounding.FLOOR, "mxfp4")
MXFP4_CEIL = Fp4Format(32, E8M0, False, ScaleRounding.CEIL, "mxfp4_ceil")

_PRESETS: dict[str, Fp4Format] = {"nvfp4": NVFP4, "mxfp4": MXFP4, "mxfp4_ceil": MXFP4_CEIL}
_SPEC_RE = re.compile(r"^e2m1:(?P<scale>\w+):(?P<block>\d+):(?P<ts>ts|nots):(?P<rounding>nearest|floor|ceil)$")


def resolve_format(fmt: "str | Fp4Format") -> Fp4Format:
    """Return the `Fp4Format` named by ``fmt``: a preset (``"nvfp4"``, ``"mxfp4"``, ``"mxfp4_ceil"``),
    a spec string from `Fp4Format.spec`, or an `Fp4Format` itself."""
    if isinstance(fmt, Fp4Format):
        return fmt
    if not isinstance(fmt, str):
        raise TypeError(f"format must be a preset name or an Fp4Format, got {type(fmt).__name__}")
    key = fmt.lower()
    if key in _PRESETS:
        return _PRESETS[key]
    for preset in _PRESETS.values():
        if key == preset.spec:
            return preset
    match = _SPEC_RE.match(key)
    if match is None:
        raise ValueError(
            f"unknown format {fmt!r}: expected one of {sorted(_PRESETS)} or a spec like 'e2m1:e4m3:16:ts:nearest'"
        )
    scale_name = match["scale"]
    if scale_name not in SCALE_FORMATS:
        raise ValueError(f"unknown scale format {scale_name!r} in {fmt!r}: expected one of {sorted(SCALE_FORMATS)}")
    return Fp4Format(
        block_size=int(match["block"]),
        scale_format=SCALE_FORMATS[scale_name],
        tensor_scale=match["ts"] == "ts",
        scale_rounding=ScaleRounding(match["rounding"]),
    )
