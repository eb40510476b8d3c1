"""Train one model three ways on the same data and seeds, and compare: high precision, the NV recipe compiled by
fp4compile, and the NV recipe written by hand in eager PyTorch (`fp4compile.testing.eager_nvfp4`, which shares
no code with the backend).

    python examples/eager_twin_study.py --seeds 0 1 2 --steps 2000 --jobs 9    # docs/convergence.md (GPU)
    python examples/eager_twin_study.py --tiny --steps 40 --seeds 0 1           # a quick CPU check

The model is a nanoGPT-style byte-level GPT (6 layers, width 384, T=256, batch 64) with float32 master weights
under bfloat16 autocast on the GPU, AdamW (lr 1e-3, betas 0.9/0.99, weight decay 0.1, 100 warm-up steps, cosine
to 1e-4, clipping at 1.0). Each seed fixes the initial weights, the batches and the random draws. Both FP4 runs
quantize the same layers: every linear layer of the blocks between the first and the last (the NV recipe's
default; the head stays high). Prints each run's validation loss, each FP4 run's relative gap to the
high-precision run of its seed, and the mean and standard deviation of the gaps over the seeds. The twin rounds
gradients stochastically with exact probabilities; ``--arms ... eager_twin_sr8`` adds it with the hardware's
8-bit stochastic rounding, the compiled recipe's (docs/numerics.md section 2.2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt import GPT, GPTConfig  # noqa: E402
from train_gpt import get_batch, load_bytes  # noqa: E402

import fp4compile  # noqa: E402
from fp4compile.testing.eager_nvfp4 import EagerNvfp4Config, swap_in_eager_nvfp4  # noqa: E402

ARMS = ("high", "compiled", "eager_twin", "eager_twin_sr8")
TWINS = {"eager_twin": EagerNvfp4Config(), "eager_twin_sr8": EagerNvfp4Config(sr_bits=8)}
LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def model_config(tiny: bool) -> GPTConfig:
    if tiny:
        return GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=64)
    return GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384)


def fp4_layers(cfg: GPTConfig) -> list[str]:
    """The linear layers the NV recipe quantizes: those of every block but the first and the last."""
    return [f"transformer.h.{i}.{n}" for i in range(1, cfg.n_layer - 1) for n in LINEARS]


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to a tenth (nanoGPT's schedule)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr / 10 + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.lr / 10)


def build(arm: str, cfg: GPTConfig, seed: int, device: str, cudagraphs: bool):
    """``(model, the callable that trains it, fp4compile backend or None)`` for one arm."""
    torch.manual_seed(seed)
    model = GPT(cfg).to(device)
    if arm in TWINS:
        return model, swap_in_eager_nvfp4(model, fp4_layers(cfg), TWINS[arm]), None
    policy = fp4compile.recipes.high_precision() if arm == "high" else fp4compile.recipes.nvfp4()
    inner = "inductor" if device == "cuda" else "aot_eager"
    backend = fp4compile.backend(policy=policy, inner=inner, cudagraphs=cudagraphs)
    return model, torch.compile(model, backend=backend), backend


def evaluate(run, data, cfg, args, device, autocast) -> float:
    gen = torch.Generator().manual_seed(1234)
    total = 0.0
    with torch.no_grad(), autocast:
        for _ in range(args.eval_batches):
            total += float(run(*get_batch(data, args.batch_size, cfg.block_size, gen, device)))
    return total / args.eval_batches


def train(arm: str, seed: int, cfg: GPTConfig, splits, args, device: str) -> dict:
    train_data, val_data = splits
    model, run, backend = build(arm, cfg, seed, device, cudagraphs=device == "cuda" and not args.no_cudagraphs)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.1,
                            fused=device == "cuda")
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1000)  # the stochastic-rounding draws of both FP4 arms start from the same state
    start, curve = time.time(), []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        x, y = get_batch(train_data, args.batch_size, cfg.block_size, gen, device)
        with autocast:
            loss = run(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve.append(loss.detach().clone())  # a CUDA-graph output is overwritten by the next replay
    seconds = time.time() - start
    model.eval()
    val = evaluate(run, val_data, cfg, args, device, autocast)
    if backend is not None and arm == "compiled":
        quantized = sorted({r.module for r in backend.rows() if r.precision != "high"})
        if quantized != sorted(fp4_layers(cfg)):  # the twin must quantize exactly what the backend does
            raise RuntimeError(f"the backend quantized {quantized}, the eager twin {sorted(fp4_layers(cfg))}")
    losses = [float(v) for v in curve]
    result = dict(arm=arm, seed=seed, val_loss=val, train_loss=statistics.fmean(losses[-50:]), seconds=seconds,
                  curve=losses[:: max(1, len(losses) // 200)])
    print(f"seed {seed} {arm:10s} val {val:.4f}  train {result['train_loss']:.4f}  ({seconds:.0f} s)", flush=True)
    return result


def data_splits(path: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The bytes: 90% for training, the last 10% held out for validation."""
    data = load_bytes(path, limit=20_000_000)
    split = int(0.9 * len(data))
    return data[:split], data[split:]


def result_path(args, arm: str, seed: int) -> str:
    return os.path.join(args.out, f"{arm}_seed{seed}.json")


def summarize(results: list[dict]) -> dict:
    """Each FP4 arm's relative validation gap to the high-precision run of the same seed, in percent, with the
    mean and the standard deviation over the seeds."""
    high = {r["seed"]: r["val_loss"] for r in results if r["arm"] == "high"}
    summary = {}
    for arm in ARMS[1:]:
        gaps = [100 * (r["val_loss"] / high[r["seed"]] - 1) for r in results if r["arm"] == arm and r["seed"] in high]
        if gaps:
            summary[arm] = dict(gaps=gaps, mean=statistics.fmean(gaps),
                                std=statistics.stdev(gaps) if len(gaps) > 1 else float("nan"))
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS[:3]),
                   help="eager_twin_sr8: the twin with the hardware's 8-bit stochastic rounding (docs/numerics.md 2.2)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, one process each (they share the GPU)")
    p.add_argument("--resume", action="store_true", help="skip the runs whose results are already in --out")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one run of a --jobs study
    p.add_argument("--data", default=None)
    p.add_argument("--no-cudagraphs", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/eager_twin"))
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        args.batch_size, args.warmup = min(args.batch_size, 16), min(args.warmup, 10)
    os.makedirs(args.out, exist_ok=True)
    print(f"{model_config(args.tiny)}, {args.steps} steps of {args.batch_size} sequences, seeds {args.seeds}, "
          f"device {device}", flush=True)

    runs = [(arm, seed) for seed in args.seeds for arm in args.arms
             if not (args.resume and os.path.exists(result_path(args, arm, seed)))]
    if args.jobs > 1 and len(runs) > 1:
        # One process per run: small models leave the GPU idle between launches, so runs overlap well.
        for first in range(0, len(runs), args.jobs):
            procs = []
            for arm, seed in runs[first:first + args.jobs]:
                cmd = [sys.executable, __file__, *sys.argv[1:], "--seeds", str(seed), "--arms", arm, "--jobs", "1", "--child"]
                procs.append(((arm, seed), subprocess.Popen(cmd, stdout=subprocess.DEVNULL)))
            for run, proc in procs:
                if proc.wait() != 0:
                    raise RuntimeError(f"{run} failed (exit {proc.returncode})")
    else:
        splits = data_splits(args.data) if runs else None  # read once for all the runs of this process
        for arm, seed in runs:
            # Written only when complete, so --resume skips whole runs.
            result = train(arm, seed, model_config(args.tiny), splits, args, device)
            with open(result_path(args, arm, seed), "w") as f:
                json.dump(result, f)
            torch._dynamo.reset()
        if args.child:
            return  # one run of a parallel study: the parent summarizes
    results = [json.load(open(result_path(args, arm, seed))) for seed in args.seeds for arm in args.arms
               if os.path.exists(result_path(args, arm, seed))]

    summary = summarize(results)
    with open(os.path.join(args.out, "eager_twin_study.json"), "w") as f:
        json.dump({"args": vars(args), "results": results, "summary": summary}, f)
    print(f"\n{'seed':>4s} " + " ".join(f"{a:>12s}" for a in args.arms))
    for seed in sorted({r["seed"] for r in results}):
        row = {r["arm"]: r["val_loss"] for r in results if r["seed"] == seed}
        print(f"{seed:4d} " + " ".join(f"{row.get(a, float('nan')):12.4f}" for a in args.arms))
    for arm, s in summary.items():
        print(f"{arm:10s} val gap to high precision: mean {s['mean']:+.2f}%  std {s['std']:.2f}%  "
              f"({', '.join(f'{g:+.2f}' for g in s['gaps'])})")
    if {"compiled", "eager_twin"} <= summary.keys():
        c, e = summary["compiled"], summary["eager_twin"]
        bound = e["mean"] + (e["std"] if not math.isnan(e["std"]) else 0.0)
        print(f"compiled mean gap {c['mean']:+.2f}% vs eager twin's mean + one std {bound:+.2f}%: "
              f"{'within' if c['mean'] <= bound else 'ABOVE'}")


if __name__ == "__main__":
    main()
