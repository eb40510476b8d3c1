"""Train the same model from the same seed on the same batches under several precision policies, and compare.

    python examples/convergence.py                              # the study of docs/convergence.md (GPU)
    python examples/convergence.py --tiny --steps 30            # a quick CPU check

Policies: high precision (through the same backend), the NV recipe and its ablations (no stochastic
rounding, no Hadamard transform, 1D weight blocks, every layer quantized), FATW, MXFP4, and the NV recipe
with the late switch to high-precision forward for the last 20% of steps. Reports final train and validation
loss and the relative gap to high precision; writes a PNG of all curves and a JSON of the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt import GPT, GPTConfig  # noqa: E402
from train_gpt import get_batch, load_bytes  # noqa: E402

import fp4compile  # noqa: E402
from fp4compile import GemmPrecision, OperandPrecision, recipes, schedules  # noqa: E402


def _no_stochastic(p: GemmPrecision) -> GemmPrecision:
    nearest = lambda o: dataclasses.replace(o, rounding="nearest")  # noqa: E731
    return p if p.is_high else GemmPrecision(nearest(p.lhs), nearest(p.rhs))


def _no_hadamard(p: GemmPrecision) -> GemmPrecision:
    plain = lambda o: dataclasses.replace(o, hadamard=False)  # noqa: E731
    return p if p.is_high else GemmPrecision(plain(p.lhs), plain(p.rhs))


def policies(steps: int) -> dict[str, tuple[object, object]]:
    """name -> (policy, step counter or None)."""
    nv = recipes.nvfp4()
    w1d = OperandPrecision("nvfp4", (1, 16))
    counter = fp4compile.StepCounter()
    return {
        "high_precision": (recipes.high_precision(), None),
        "nvfp4": (nv, None),
        "nvfp4_no_sr": (dataclasses.replace(nv, input_grad=_no_stochastic(nv.input_grad),
                                            weight_grad=_no_stochastic(nv.weight_grad)), None),
        "nvfp4_no_rht": (dataclasses.replace(nv, weight_grad=_no_hadamard(nv.weight_grad)), None),
        "nvfp4_1d_weights": (dataclasses.replace(nv, forward=GemmPrecision(nv.forward.lhs, w1d),
                                                 input_grad=GemmPrecision(nv.input_grad.lhs, w1d)), None),
        "nvfp4_all_layers": (recipes.nvfp4(high_precision_first_blocks=0, high_precision_last_blocks=0,
                                           quantize_output_head=True), None),
        "fp4_all_the_way": (recipes.fp4_all_the_way(), None),
        "mxfp4": (recipes.mxfp4(), None),
        "nvfp4_late_switch": (recipes.nvfp4(schedule=schedules.late_switch(int(0.8 * steps))), counter),
    }


def model_config(tiny: bool) -> GPTConfig:
    """The study's model (6 layers, width 384, T=256), or a CPU-sized one."""
    if tiny:
        return GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=64)
    return GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384)


def data_splits(path: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The study's bytes: 90% for training, the last 10% held out for validation."""
    data = load_bytes(path, limit=20_000_000)
    split = int(0.9 * len(data))
    return data[:split], data[split:]


def train(name, policy, counter, cfg, data, args, device):
    train_data, val_data = data
    torch.manual_seed(args.seed)
    model = GPT(cfg).to(device)
    if device == "cuda":
        model = model.to(torch.bfloat16)
    backend = fp4compile.backend(policy=policy, inner=args.inner, step_counter=counter,
                                 cudagraphs=device == "cuda" and not args.no_cudagraphs)
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95),
                            fused=device == "cuda")
    # 5% warm-up, at least two steps: OneCycleLR divides by the warm-up length minus one (short CPU checks).
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps,
                                                pct_start=max(0.05, 2 / args.steps))
    gen = torch.Generator().manual_seed(args.seed)  # the same batches for every policy
    losses, memory_mib = [], []
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    start = time.time()
    for step in range(args.steps):
        if device == "cuda" and step % max(1, args.steps // 10) == 0:
            memory_mib.append(round(torch.cuda.memory_allocated() / 2**20, 1))
        x, y = get_batch(train_data, args.batch_size, cfg.block_size, gen, device)
        loss = compiled(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if counter is not None:
            counter.advance()
        losses.append(loss.detach().clone())  # a CUDA-graph output is overwritten by the next replay
    losses = [float(v) for v in losses]
    elapsed = time.time() - start
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    nonfinite = sum(not torch.isfinite(torch.tensor(v)) for v in losses)
    model.eval()
    vgen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        val = sum(float(model(*get_batch(val_data, args.batch_size, cfg.block_size, vgen, device)))
                  for _ in range(args.eval_batches)) / args.eval_batches
    train_loss = sum(losses[-50:]) / len(losses[-50:])
    quantized = sum(r.precision != "high" for r in backend.rows())
    print(f"{name:20s} train {train_loss:.4f}  val {val:.4f}  ({elapsed:.0f}s, {quantized} FP4 GEMM roles, "
          f"{len(backend.reports)} compiles, {graphs} Dynamo graphs, {nonfinite} non-finite losses, "
          f"allocated MiB {memory_mib})", flush=True)
    return dict(train_loss=train_loss, val_loss=val, curve=losses, seconds=elapsed, fp4_gemm_roles=quantized,
                compiles=len(backend.reports), dynamo_graphs=graphs, nonfinite_losses=nonfinite,
                allocated_mib=memory_mib)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None)
    p.add_argument("--inner", default=None, help="inner compiler (default: inductor on GPU, aot_eager on CPU)")
    p.add_argument("--no-cudagraphs", action="store_true")
    p.add_argument("--only", nargs="*", default=None, help="run only these policies")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/convergence"))
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.inner = args.inner or ("inductor" if device == "cuda" else "aot_eager")
    cfg = model_config(args.tiny)
    if args.tiny:
        args.batch_size = min(args.batch_size, 16)
    splits = data_splits(args.data)
    print(f"model {cfg}, {args.steps} steps of {args.batch_size}x{cfg.block_size} bytes, device {device}")
    results = {}
    for name, (policy, counter) in policies(args.steps).items():
        if args.only and name not in args.only:
            continue
        results[name] = train(name, policy, counter, cfg, splits, args, device)
        torch._dynamo.reset()
    high = results.get("high_precision")
    print(f"\n{'policy':20s} {'train':>8s} {'val':>8s} {'val gap vs high':>16s}")
    for name, r in results.items():
        gap = (r["val_loss"] / high["val_loss"] - 1) * 100 if high else float("nan")
        r["val_gap_pct"] = gap
        print(f"{name:20s} {r['train_loss']:8.4f} {r['val_loss']:8.4f} {gap:+15.2f}%")
    os.makedirs(args.out, exist_ok=True)
    tag = "_".join(args.only) if args.only else "all"
    with open(os.path.join(args.out, f"convergence_{tag}.json"), "w") as f:
        json.dump({"args": vars(args), "model": dataclasses.asdict(cfg), "results": results}, f)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plot_curves(results, args.steps, cfg, os.path.join(args.out, f"convergence_{tag}.png"), plt)
    except ImportError:
        pass


def plot_curves(results: dict, steps: int, cfg: GPTConfig, path: str, plt) -> None:
    """Every policy's train loss, averaged over 1% of the steps, zoomed on where the curves separate: from the
    lowest value to the highest one after the first 10% of steps (the initial drop would flatten the rest),
    whatever the loss level."""
    fig, ax = plt.subplots(figsize=(8, 5))
    shown, k = [], 1
    for name, r in results.items():
        curve = torch.tensor(r["curve"])
        k = max(1, len(curve) // 100)
        smooth = curve.unfold(0, k, k).mean(1) if len(curve) >= k else curve
        ax.plot(torch.arange(len(smooth)) * k, smooth, label=name, lw=1)
        shown.append(smooth[len(smooth) // 10:])
    late = torch.cat([v for v in shown if len(v)] or [torch.zeros(0)])
    finite = late[torch.isfinite(late)]
    if len(finite):
        low, high = float(finite.min()), float(finite.max())
        pad = 0.05 * (high - low) or 0.05
        ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel("step"), ax.set_ylabel("train loss (nats/byte)"), ax.legend(fontsize=8), ax.grid(alpha=0.3)
    ax.set_title(f"train loss, {steps} steps, GPT {cfg.n_layer} layers x {cfg.n_embd} (mean over {k} steps)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
