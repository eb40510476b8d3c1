"""Measure the convergence study's model with `fp4compile.sensitivity`, build a policy from the report at the
NV recipe's high-precision FLOP budget, and train it beside the NV recipe and two high-precision controls.

    python examples/sensitivity_study.py --out runs/sensitivity                # the study of docs/sensitivity.md (GPU)
    python examples/sensitivity_study.py --tiny --steps 20 --out /tmp/sens     # a quick CPU check
    python examples/sensitivity_study.py --gpt2 --steps 300 --out runs/sens_gpt2   # GPT-2 small (GPU)

The model, data and training loop are examples/convergence.py's: every run starts from the same seed and sees
the same batches. The report is measured on a copy of the model trained eagerly in high precision for the first
10% of the steps (``--measure-after``), on batches drawn apart from the training ones. Runs: high precision twice (the run-to-run spread of the control), the NV recipe (first and
last block and the output head in high precision) and ``recipes.from_sensitivity`` at the same share of
linear-layer FLOPs in high precision. Writes under ``--out``: ``sensitivity.json`` / ``sensitivity.html`` (the
report), ``sensitivity_study.json`` (budget, decisions, losses, curves) and ``sensitivity_study.png``.

    fp4compile sensitivity examples/sensitivity_study.py --tiny --out /tmp/sens   # the measurement alone
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
from convergence import data_splits, model_config, train  # noqa: E402
from gpt import GPT, GPTConfig  # noqa: E402
from train_gpt import get_batch  # noqa: E402

import fp4compile  # noqa: E402
from fp4compile import recipes  # noqa: E402

MEASURE_SEED = 4321  # the measurement's batches: drawn apart from the training batches (seed 0 by default)


def measurement_batches(cfg, train_data, count: int, batch_size: int, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(MEASURE_SEED)
    return [get_batch(train_data, batch_size, cfg.block_size, gen, device) for _ in range(count)]


def study_config(tiny: bool, gpt2: bool) -> tuple[GPTConfig, int, float]:
    """The model, its default batch size and learning rate: the convergence study's (examples/convergence.py),
    its CPU-sized one, or GPT-2 small as examples/train_gpt.py trains it (byte-level, T=1024)."""
    if gpt2:
        return GPTConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768), 8, 6e-4
    return model_config(tiny), 16 if tiny else 64, 2e-3


def build_model(cfg, seed: int, device: str) -> torch.nn.Module:
    """The model as examples/convergence.py's `train` builds it (bf16 parameters on the GPU)."""
    torch.manual_seed(seed)
    model = GPT(cfg).to(device)
    return model.to(torch.bfloat16) if device == "cuda" else model


def warm_up(model: torch.nn.Module, cfg, train_data, args, device: str, steps: int) -> None:
    """Train ``model`` eagerly in high precision for the first ``steps`` steps of the study's schedule
    (examples/convergence.py's optimizer, learning-rate schedule and batches): the model a user would measure
    a little way into training, when the output head has begun to matter."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps,
                                                pct_start=max(0.05, 2 / args.steps))
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(steps):
        model(*get_batch(train_data, args.batch_size, cfg.block_size, gen, device)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()


def sensitivity_inputs(argv: list[str]) -> tuple[torch.nn.Module, list]:
    """``fp4compile sensitivity examples/sensitivity_study.py [--tiny] [--batches N] ...``: the model at
    initialization and the measurement's batches."""
    p = argparse.ArgumentParser(prog="sensitivity_study.py:sensitivity_inputs")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--gpt2", action="store_true", help="GPT-2 small (12 layers, width 768, T=1024)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg, batch_size, _ = study_config(args.tiny, args.gpt2)
    train_data, _ = data_splits(args.data)
    return build_model(cfg, args.seed, device), measurement_batches(cfg, train_data, args.batches,
                                                                    args.batch_size or batch_size, device)


def _smooth(curve: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.tensor(curve)
    k = max(1, len(values) // 100)
    smooth = values[: len(values) // k * k].unfold(0, k, k).mean(1)
    return torch.arange(len(smooth)) * k, smooth


def _plot(results: dict, path: str) -> None:
    """Train-loss curves, and each run's smoothed difference to the first high-precision control."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (curves, gaps) = plt.subplots(1, 2, figsize=(13, 5))
    control = results.get("high_precision")
    for name, r in results.items():
        steps, smooth = _smooth(r["curve"])
        curves.plot(steps, smooth, label=name, lw=1)
        if control is not None:
            gaps.plot(steps, smooth - _smooth(control["curve"])[1], label=name, lw=1)
    curves.set_xlabel("step"), curves.set_ylabel("train loss (nats/byte)"), curves.grid(alpha=0.3)
    if min(float(_smooth(r["curve"])[1].min()) for r in results.values()) < 3.0:
        curves.set_ylim(top=3.0)
    curves.legend(fontsize=8)
    gaps.set_xlabel("step"), gaps.set_ylabel("train loss minus high_precision"), gaps.grid(alpha=0.3)
    gaps.axhline(0.0, color="k", lw=0.5)
    gaps.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--gpt2", action="store_true", help="GPT-2 small (12 layers, width 768, T=1024, batch 8) instead "
                   "of the convergence study's model")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=None, help="default 64 (16 with --tiny, 8 with --gpt2)")
    p.add_argument("--lr", type=float, default=None, help="default 2e-3 (6e-4 with --gpt2)")
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None)
    p.add_argument("--inner", default=None, help="inner compiler (default: inductor on GPU, aot_eager on CPU)")
    p.add_argument("--no-cudagraphs", action="store_true")
    p.add_argument("--measure-batches", type=int, default=None, help="batches the report is measured on "
                   "(default 4; 1 with --tiny)")
    p.add_argument("--measure-after", type=int, default=None, help="train this many steps in high precision "
                   "(eagerly, the study's schedule) before measuring (default: 10%% of --steps)")
    p.add_argument("--granularity", default="role", choices=["role", "site"], help="from_sensitivity's unit")
    p.add_argument("--only", nargs="*", default=None, help="train only these runs (default: all four)")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/sensitivity"))
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.inner = args.inner or ("inductor" if device == "cuda" else "aot_eager")
    cfg, batch_size, lr = study_config(args.tiny, args.gpt2)
    args.batch_size, args.lr = args.batch_size or batch_size, args.lr or lr
    measure_batches = args.measure_batches or (1 if args.tiny else 4)
    splits = data_splits(args.data)
    os.makedirs(args.out, exist_ok=True)
    print(f"model {cfg}, {args.steps} steps of {args.batch_size}x{cfg.block_size} bytes, device {device}", flush=True)

    measure_after = int(0.1 * args.steps) if args.measure_after is None else args.measure_after
    start = time.time()
    model = build_model(cfg, args.seed, device)
    warm_up(model, cfg, splits[0], args, device, measure_after)
    report = fp4compile.sensitivity(model, batches=measurement_batches(cfg, splits[0], measure_batches,
                                                                      args.batch_size, device), out=args.out)
    measure_seconds = time.time() - start
    del model
    nv = recipes.nvfp4()
    budget = recipes.high_precision_flop_fraction(report, nv)
    policy = recipes.from_sensitivity(report, budget, granularity=args.granularity)
    spent = report.high_precision_fraction(policy)
    print(f"sensitivity measured after {measure_after} high-precision steps on {measure_batches} batch(es) "
          f"({measure_seconds:.0f}s with the warm-up) "
          f"(noise floor {report.noise_floor:.3g}); NV rule keeps {budget:.2%} of linear FLOPs high, "
          f"the sensitivity policy {spent:.2%}", flush=True)
    print("most sensitive site-roles:")
    for e in report.ranked("role")[:10]:
        print(f"  {e.rank:3d} {e.module:32s} {e.role:11s} grad error {e.grad_error:.3g}  loss {e.loss_delta_rel:+.3%}")
    kept = [(r.modules[0], r.roles[0].value) for r in policy.rules if r.precision.is_high]
    print(f"kept high by the sensitivity policy ({len(kept)} site-roles): "
          + ", ".join(f"{m} {role}" for m, role in kept), flush=True)

    runs = {
        "high_precision": recipes.high_precision(),
        # A recipe of its own name: fp4compile.backend keeps one backend per configuration, and the repeat's
        # compile count should not add up with the first control's.
        "high_precision_repeat": dataclasses.replace(recipes.high_precision(), name="high_precision_repeat"),
        "nvfp4": nv,
        "sensitivity": policy,
    }
    results = {}
    for name, run_policy in runs.items():
        if args.only and name not in args.only:
            continue
        results[name] = train(name, run_policy, None, cfg, splits, args, device)
        torch._dynamo.reset()

    control = results.get("high_precision")
    spread = None
    if control and "high_precision_repeat" in results:
        spread = abs(results["high_precision_repeat"]["val_loss"] / control["val_loss"] - 1) * 100
    print(f"\n{'run':22s} {'train':>8s} {'val':>8s} {'val gap vs high':>16s} {'high-precision FLOPs':>21s}")
    fractions = {"high_precision": 1.0, "high_precision_repeat": 1.0, "nvfp4": budget, "sensitivity": spent}
    for name, r in results.items():
        r["val_gap_pct"] = (r["val_loss"] / control["val_loss"] - 1) * 100 if control else float("nan")
        r["high_precision_flop_fraction"] = fractions[name]
        print(f"{name:22s} {r['train_loss']:8.4f} {r['val_loss']:8.4f} {r['val_gap_pct']:+15.2f}% "
              f"{fractions[name]:20.2%}")
    if spread is not None:
        print(f"control run-to-run spread (validation): {spread:.2f}%")
    print(f"total {time.time() - start:.0f}s", flush=True)

    summary = {
        "args": vars(args), "model": dataclasses.asdict(cfg), "measure_seconds": measure_seconds,
        "measure_batches": measure_batches, "measure_after": measure_after, "noise_floor": report.noise_floor, "budget": budget,
        "sensitivity_policy_fraction": spent, "control_spread_pct": spread,
        "decisions": [{"module": r.modules[0], "role": r.roles[0].value, "precision": r.precision.precision,
                       "reason": r.name} for r in policy.rules],
        "results": results,
    }
    with open(os.path.join(args.out, "sensitivity_study.json"), "w") as f:
        json.dump(summary, f)
    if results:
        _plot(results, os.path.join(args.out, "sensitivity_study.png"))


if __name__ == "__main__":
    main()
