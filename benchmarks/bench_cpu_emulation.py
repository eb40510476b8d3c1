"""What exact FP4 emulation costs on CPU: a training step of the main example's tiny GPT, eager against fp4.

    PYTHONPATH=. python3 benchmarks/bench_cpu_emulation.py                  # the README's example model
    PYTHONPATH=. python3 benchmarks/bench_cpu_emulation.py --threads 2 --steps 20

Modes: ``eager`` (the model as written, float32), ``fp4`` (``backend=fp4compile.backend(inner="aot_eager")``,
the NV recipe: what ``examples/train_gpt.py --tiny`` runs on CPU) and ``fp4-high`` (the same backend with
`recipes.high_precision`: the cost of the compiled graph without any quantization). Per mode: the median and
range of ``--steps`` steps after ``--warmup`` (forward, backward, AdamW), in wall time and in this process's
CPU time (``time.process_time``: less sensitive to other processes on a shared machine), and the first
steps' time (compilation). Ratios are to ``eager``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from gpt import GPT, GPTConfig  # noqa: E402

import fp4compile  # noqa: E402

MODES = ("eager", "fp4", "fp4-high")


def run_mode(mode: str, steps: int, warmup: int, batch: int) -> dict:
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=64)  # examples/train_gpt.py --tiny
    model = GPT(cfg)
    if mode == "eager":
        step_model = model
    else:
        policy = fp4compile.recipes.nvfp4() if mode == "fp4" else fp4compile.recipes.high_precision()
        step_model = torch.compile(model, backend=fp4compile.backend(policy=policy, inner="aot_eager"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    inputs = [(torch.randint(0, 256, (batch, cfg.block_size), generator=gen),
               torch.randint(0, 256, (batch, cfg.block_size), generator=gen)) for _ in range(4)]

    def step(i: int) -> torch.Tensor:
        loss = step_model(*inputs[i % len(inputs)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    first_s = time.perf_counter() - t0
    wall, cpu = [], []
    for i in range(steps):
        w, c = time.perf_counter(), time.process_time()
        loss = step(i).detach()
        wall.append(1e3 * (time.perf_counter() - w))
        cpu.append(1e3 * (time.process_time() - c))
    return dict(mode=mode, wall_ms=statistics.median(wall), wall_min=min(wall), wall_max=max(wall),
                cpu_ms=statistics.median(cpu), first_s=first_s, loss=loss.item())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: steadier on a "
                   "shared machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = [run_mode(m, args.steps, args.warmup, args.batch_size) for m in args.modes]
    base = next((r for r in results if r["mode"] == "eager"), None)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, batch {args.batch_size}x64, "
          f"{args.steps} steps after {args.warmup}")
    print(f"{'mode':10s} {'wall ms (min-max)':>24s} {'x':>6s} {'CPU ms':>8s} {'x':>6s} {'first steps s':>14s}")
    for r in results:
        xw = r["wall_ms"] / base["wall_ms"] if base else float("nan")
        xc = r["cpu_ms"] / base["cpu_ms"] if base else float("nan")
        span = f"{r['wall_ms']:.1f} ({r['wall_min']:.1f}-{r['wall_max']:.1f})"
        print(f"{r['mode']:10s} {span:>24s} {xw:6.2f} {r['cpu_ms']:8.1f} {xc:6.2f} {r['first_s']:14.1f}")


if __name__ == "__main__":
    main()
