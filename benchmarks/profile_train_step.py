"""Where the time of one training step goes: GPU time by kernel category, and GPU busy time vs wall time.

    python benchmarks/profile_train_step.py --model gpt2-small --mode fp4

Categories: GEMM (cuBLAS/CUTLASS and fp4compile's Triton GEMMs), quantization (fp4compile's amax, quantize,
dequantize and alpha kernels), everything else (Inductor's fused kernels, attention, optimizer). If GPU busy
time is far below wall time, the step is bound by host-side overhead (launches, Python), not the GPU.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_step import build  # noqa: E402

QUANT = ("_amax_kernel", "_quantize_kernel", "_dequantize_kernel", "_scale_bias_kernel")
GEMM = ("gemm", "nvjet", "cutlass", "_gemm_kernel", "sm90_xmma", "wgmma")


def category(name: str) -> str:
    if any(k in name for k in QUANT):
        return "quantization"
    if any(k in name.lower() for k in GEMM):
        return "GEMM"
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="gpt2-small")
    p.add_argument("--mode", default="fp4")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=15, help="how many kernels to list")
    args = p.parse_args()
    model, step_model, opt, batch, seq = build(args.model, args.mode, "cuda")
    vocab = model.lm_head.out_features if hasattr(model, "lm_head") else model.output.out_features
    x = torch.randint(0, vocab, (batch, seq), device="cuda")

    def step():
        step_model(x, x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(args.steps):
            step()
        end.record()
        torch.cuda.synchronize()
    wall = start.elapsed_time(end) / args.steps
    by_cat: dict[str, float] = collections.defaultdict(float)
    by_kernel: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for evt in prof.key_averages():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            t = evt.self_device_time_total / 1e3 / args.steps  # ms per step
            by_cat[category(evt.key)] += t
            by_kernel[evt.key][0] += t
            by_kernel[evt.key][1] += evt.count // args.steps
    busy = sum(by_cat.values())
    print(f"{args.model} {args.mode}: wall {wall:.2f} ms/step, GPU busy {busy:.2f} ms/step ({100 * busy / wall:.0f}%)")
    for cat, t in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:14s} {t:8.2f} ms  {100 * t / busy:5.1f}% of GPU time")
    print("top kernels (ms/step, launches/step):")
    for name, (t, n) in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"  {t:7.2f}  {n:5d}  {name[:110]}")
    cpu_ops = sorted((e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU),
                     key=lambda e: -e.self_cpu_time_total)[:8]
    print("top host-side ops (self CPU ms/step, calls/step):")
    for e in cpu_ops:
        print(f"  {e.self_cpu_time_total / 1e3 / args.steps:7.2f}  {e.count // args.steps:5d}  {e.key[:100]}")


if __name__ == "__main__":
    main()
