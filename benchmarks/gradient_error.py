"""How far each implementation's FP4 gradients are from the exact gradient, at the same weights and batch.

    python benchmarks/gradient_error.py                       # GPU: the model of examples/eager_twin_study.py
    python benchmarks/gradient_error.py --tiny --draws 4      # CPU

The model is first trained a little in high precision (so the gradients have their realistic shape), then, on one
fixed batch, each implementation's gradient is drawn ``--draws`` times with different seeds:

- ``compiled``: the NV recipe through ``backend="fp4"`` (CUDA graphs on the GPU; ``compiled_no_cg`` without);
- ``eager_twin``: the same recipe written by hand (`fp4compile.testing.eager_nvfp4`);
- ``reference``: fp4compile's own eager reference (`fp4compile.testing.swap_in_reference`);
- ``bf16``: high precision under the same autocast (the floor that bfloat16 alone sets).

For every FP4 layer's weight it prints the mean relative error of one draw, ``|g - g*| / |g*|``, and the relative
bias of the mean of the draws, ``|mean(g) - g*| / |g*|``, against ``g*``, the float32 eager gradient. An
implementation whose error or bias stands above the others' at some layer is the one to look at.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from eager_twin_study import LINEARS, build, fp4_layers, model_config  # noqa: E402
from gpt import GPT  # noqa: E402
from train_gpt import get_batch, load_bytes  # noqa: E402

from fp4compile.recipes import nv_recipe_precisions  # noqa: E402
from fp4compile.policy.precision import LinearPrecision  # noqa: E402
from fp4compile.testing import swap_in_reference  # noqa: E402


def gradients(run, model, batch, autocast) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with autocast:
        loss = run(*batch)
    loss.backward()
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--warm-steps", type=int, default=300)
    p.add_argument("--draws", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = model_config(args.tiny)
    if args.tiny:
        args.batch_size = min(args.batch_size, 16)
    data = load_bytes(None, limit=20_000_000)
    gen = torch.Generator().manual_seed(args.seed)

    # Realistic weights: a short high-precision run.
    torch.manual_seed(args.seed)
    base = GPT(cfg).to(device)
    opt = torch.optim.AdamW(base.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    for _ in range(args.warm_steps):
        with autocast:
            loss = base(*get_batch(data, args.batch_size, cfg.block_size, gen, device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    state = copy.deepcopy(base.state_dict())
    batch = get_batch(data, args.batch_size, cfg.block_size, gen, device)
    exact = gradients(base, base, batch, torch.autocast(device, enabled=False))

    runs = {}
    arms = {"compiled": ("compiled", True), "compiled_no_cg": ("compiled", False), "eager_twin": ("eager_twin", False),
            "bf16": ("high", True)}
    for arm, (kind, cudagraphs) in arms.items():
        if arm == "compiled_no_cg" and device != "cuda":
            continue
        model, run, _ = build(kind, cfg, args.seed, device, cudagraphs=cudagraphs and device == "cuda")
        model.load_state_dict(state)
        runs[arm] = (model, run)
    nv = LinearPrecision(*nv_recipe_precisions())
    reference = swap_in_reference(GPT(cfg).to(device), {name: nv for name in fp4_layers(cfg)})
    reference.load_state_dict(state)
    runs["reference"] = (reference, reference)

    stats: dict[str, dict[str, tuple[float, float]]] = {}
    for arm, (model, run) in runs.items():
        draws = []
        for d in range(args.draws):
            torch.manual_seed(10_000 + d)
            draws.append(gradients(run, model, batch, autocast))
        stats[arm] = {}
        for layer in fp4_layers(cfg):
            name = f"{layer}.weight"
            ref = exact[name]
            errors = [float((g[name] - ref).norm() / ref.norm()) for g in draws]
            mean = torch.stack([g[name] for g in draws]).mean(0)
            stats[arm][layer] = (sum(errors) / len(errors), float((mean - ref).norm() / ref.norm()))

    arms = list(stats)
    print(f"\nrelative error of one draw / relative bias of the mean of {args.draws} draws, against float32 eager")
    print(f"{'layer':32s} " + " ".join(f"{a:>21s}" for a in arms))
    for layer in fp4_layers(cfg):
        print(f"{layer:32s} " + " ".join(f"{stats[a][layer][0]:10.4f}/{stats[a][layer][1]:10.4f}" for a in arms))
    for kind in LINEARS:
        rows = [layer for layer in fp4_layers(cfg) if layer.endswith(kind)]
        print(f"{'mean ' + kind:32s} " + " ".join(
            f"{sum(stats[a][r][0] for r in rows) / len(rows):10.4f}/{sum(stats[a][r][1] for r in rows) / len(rows):10.4f}"
            for a in arms))


if __name__ == "__main__":
    main()
