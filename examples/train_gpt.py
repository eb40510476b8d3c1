"""Train a byte-level GPT with its linear layers in NVFP4: ``torch.compile(model, backend="fp4")``.

    python examples/train_gpt.py --tiny --compare          # a laptop CPU, about a minute
    python examples/train_gpt.py --compare                 # a GPU: GPT-2 small (124M), bf16 parameters

Data: the Python standard library's own source files (always present), or any text file via ``--data``.
``--compare`` trains a high-precision twin from the same seed on the same batches and prints both losses.
Writes ``results.json`` and ``loss.png`` (validation loss of each run, measured every ``--eval-every`` steps,
and the FP4 run's gap to the twin) to ``--out``: ``runs/train_gpt``, or, under ``fp4compile dump run``, a
``train_gpt`` folder inside the dump, so a dump run does not overwrite the results of an ordinary run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import sysconfig
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt import GPT, GPTConfig  # noqa: E402

import fp4compile  # noqa: E402
from fp4compile import env as fp4compile_env  # noqa: E402


def load_bytes(path: str | None, limit: int) -> torch.Tensor:
    """Byte-level data: a text file, or the standard library's .py files concatenated in a fixed order."""
    if path:
        data = pathlib.Path(path).read_bytes()[:limit]
    else:
        stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
        chunks, size = [], 0
        for f in sorted(stdlib.rglob("*.py")):
            if "site-packages" in f.parts:
                continue
            chunks.append(f.read_bytes())
            size += len(chunks[-1])
            if size >= limit:
                break
        data = b"\n".join(chunks)[:limit]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def get_batch(data: torch.Tensor, batch: int, block: int, gen: torch.Generator, device: str):
    ix = torch.randint(len(data) - block - 1, (batch,), generator=gen)
    x = torch.stack([data[i : i + block] for i in ix])
    y = torch.stack([data[i + 1 : i + 1 + block] for i in ix])
    return x.to(device), y.to(device)


def make_model(cfg: GPTConfig, args, device: str, policy) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(args.seed)
    model = GPT(cfg).to(device)
    if device == "cuda":
        model = model.to(torch.bfloat16)
    if args.backend == "eager":
        return model, model
    if args.backend == "inductor":
        return model, torch.compile(model)
    inner = args.inner or ("inductor" if device == "cuda" else "aot_eager")
    return model, torch.compile(model, backend=fp4compile.backend(policy=policy, inner=inner))


@torch.no_grad()
def evaluate(model, data, args, device) -> float:
    gen = torch.Generator().manual_seed(1234)
    losses = [model(*get_batch(data, args.batch_size, args.block_size, gen, device)).item() for _ in range(args.eval_batches)]
    return sum(losses) / len(losses)


def plot_losses(curves: dict, val_curves: dict, args, cfg: GPTConfig, path: str, plt) -> None:
    """Validation loss of each run (train loss faint behind it) and, with a twin, the FP4 run's relative gap.

    The two runs' losses differ by about 1%, less than a line's width at the scale of the whole curve, so the
    gap gets its own panel; the y range starts after the first tenth of training (the initial drop)."""
    names = {"fp4": f"fp4 ({args.recipe})", "high": "high precision", "inductor": "inductor", "eager": "eager"}
    styles = {"high": dict(color="black", ls="--"), "fp4": dict(color="tab:green")}
    panels = 2 if "high" in val_curves and len(val_curves) > 1 else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    skip = len(next(iter(curves.values()))) // 10
    for k, v in curves.items():
        style = styles.get(k, {})
        ax.plot(range(skip, len(v)), v[skip:], lw=0.6, alpha=0.3, color=style.get("color"))
        steps, losses = zip(*val_curves[k])
        ax.plot(steps, losses, marker="o", ms=3, label=f"{names.get(k, k)}: val {losses[-1]:.4f}", **style)
    ax.set_xlabel("step"), ax.set_ylabel("loss (nats/byte)"), ax.grid(alpha=0.3), ax.legend()
    ax.set_title("validation loss (lines) and train loss (faint)")
    if panels == 2:
        other = next(k for k in val_curves if k != "high")
        steps = [s for s, _ in val_curves[other]]
        gap = [100 * (a / b - 1) for (_, a), (_, b) in zip(val_curves[other], val_curves["high"])]
        ax = axes[0][1]
        ax.axhline(0, color="black", lw=0.8, ls="--")
        ax.plot(steps, gap, marker="o", ms=3, color=styles["fp4"]["color"])
        ax.set_xlabel("step"), ax.set_ylabel("validation loss gap (%)"), ax.grid(alpha=0.3)
        ax.set_title(f"{names.get(other, other)} vs high precision: {gap[-1]:+.2f}% at the end")
    size = f"{cfg.n_layer} layers x {cfg.n_embd}"
    fig.suptitle(f"train_gpt: byte-level GPT ({size}), {args.steps} steps, "
                 f"batch {args.batch_size} x {args.block_size} bytes")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a small model that trains on a laptop CPU in about a minute")
    p.add_argument("--backend", choices=["fp4", "inductor", "eager"], default="fp4")
    p.add_argument("--recipe", choices=["nvfp4", "fp4_all_the_way", "mxfp4"], default="nvfp4")
    p.add_argument("--inner", choices=["inductor", "aot_eager", "eager"], default=None,
                   help="compiler for the non-FP4 rest (default: inductor on GPU, aot_eager on CPU)")
    p.add_argument("--compare", action="store_true", help="also train a high-precision twin and print both losses")
    p.add_argument("--data", default=None, help="a text file (default: the Python standard library source)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=None, help="validation loss every N steps (default: steps/10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for the loss curves (PNG) and the numbers (JSON); default "
                   "runs/train_gpt, or <dump>/train_gpt under fp4compile dump run")
    args = p.parse_args()
    dump_dir = fp4compile_env.dump_dir()
    args.out = args.out or (os.path.join(dump_dir, "train_gpt") if dump_dir else os.path.join("runs", "train_gpt"))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        cfg = GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=64)
        defaults = dict(steps=150, batch_size=16, lr=3e-3)
    else:  # GPT-2 small, byte-level
        cfg = GPTConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768)
        defaults = dict(steps=2000, batch_size=8, lr=6e-4)
    args.steps = args.steps or defaults["steps"]
    args.batch_size = args.batch_size or defaults["batch_size"]
    args.lr = args.lr or defaults["lr"]
    args.eval_every = args.eval_every or max(1, args.steps // 10)
    args.block_size = args.block_size or cfg.block_size
    cfg.block_size = args.block_size

    data = load_bytes(args.data, limit=2_000_000 if args.tiny else 50_000_000)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    print(f"data: {len(data):,} bytes ({'stdlib source' if not args.data else args.data}); device {device}")

    policy = getattr(fp4compile.recipes, args.recipe)()
    runs = {"fp4" if args.backend == "fp4" else args.backend: make_model(cfg, args, device, policy)}
    if args.compare:
        runs["high"] = make_model(cfg, args, device, fp4compile.recipes.high_precision())
    opts = {k: torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95)) for k, (m, _) in runs.items()}
    sched = {k: torch.optim.lr_scheduler.OneCycleLR(o, args.lr, total_steps=args.steps, pct_start=0.1) for k, o in opts.items()}
    curves = {k: [] for k in runs}
    val_curves = {k: [] for k in runs}  # (step, validation loss)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()
    bar = tqdm(range(args.steps), desc="train", dynamic_ncols=True, mininterval=2.0)
    for step in bar:
        x, y = get_batch(train, args.batch_size, args.block_size, gen, device)
        for k, (model, compiled) in runs.items():
            loss = compiled(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            sched[k].step()
            curves[k].append(loss.item())
        bar.set_postfix({k: f"{v[-1]:.3f}" for k, v in curves.items()})
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            for k, (_, compiled) in runs.items():
                val_curves[k].append((step + 1, evaluate(compiled, val, args, device)))

    results = {k: {"final_train_loss": sum(v[-20:]) / len(v[-20:]), "val_loss": val_curves[k][-1][1]}
               for k, v in curves.items()}
    print(f"\n{args.steps} steps in {time.time() - start:.0f}s")
    for k, r in results.items():
        print(f"{k:>8s}: train loss {r['final_train_loss']:.4f}  val loss {r['val_loss']:.4f}")
    if "high" in results and len(results) > 1:
        other = next(k for k in results if k != "high")
        gap = results[other]["val_loss"] / results["high"]["val_loss"] - 1
        print(f"relative val-loss gap {other} vs high precision: {100 * gap:+.2f}%")

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "results": results, "curves": curves, "val_curves": val_curves}, f)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plot_losses(curves, val_curves, args, cfg, os.path.join(args.out, "loss.png"), plt)
        print(f"loss curve: {os.path.join(args.out, 'loss.png')}")
    except ImportError:
        print("matplotlib not installed: no loss curve PNG")


if __name__ == "__main__":
    main()
