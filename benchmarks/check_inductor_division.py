"""What Inductor emits for float32 division and reciprocals on CUDA, and whether it is correctly rounded.

    python benchmarks/check_inductor_division.py

The NVFP4 spec needs correctly rounded divisions (docs/numerics.md; the kernels use ``tl.div_rn``). fp4compile
keeps every such division inside its own Triton kernels; this script says whether graph ops would be safe too:
for tensor / tensor, tensor / Python scalar and ``torch.reciprocal`` it counts the results that differ from
the correctly rounded quotient (computed on CPU, where PyTorch divides exactly) and shows the Triton line
Inductor generated for it.
"""

from __future__ import annotations

import re
import sys

import torch
from torch._inductor.utils import run_and_get_code


def _division_lines(code: str) -> list[str]:
    return sorted({line.strip() for line in code.splitlines()
                   if re.search(r"div_rn|div_full|/ |reciprocal|fdividef", line) and "tl.store" not in line})[:3]


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("check_inductor_division needs a CUDA device")
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(1 << 16, generator=gen) * 100 + 1e-3
    b = torch.rand(1 << 16, generator=gen) * 7 + 1e-3
    cases = {
        "tensor / tensor": (lambda x, y: x / y, lambda: a / b),
        "tensor / 3.0": (lambda x, y: x / 3.0, lambda: a / torch.tensor(3.0)),
        "reciprocal": (lambda x, y: torch.reciprocal(y), lambda: 1 / b),
    }
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    for name, (fn, exact) in cases.items():
        torch._dynamo.reset()
        compiled = torch.compile(fn)
        got, codes = run_and_get_code(compiled, a.cuda(), b.cuda())
        differ = int((got.cpu() != exact()).sum())
        print(f"{name:16s} differs from correctly rounded in {differ} of {a.numel()}; emitted: "
              f"{_division_lines(''.join(codes))}")


if __name__ == "__main__":
    main()
