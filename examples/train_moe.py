"""Train a byte-level mixture of experts (Mixtral's layout: 8 experts, top-2) with its expert GEMMs in NVFP4.

    python examples/train_moe.py --tiny --steps 20        # a CPU, a few minutes
    python examples/train_moe.py                          # a GPU: 6 layers x 384, bf16 parameters, 300 steps

The model is transformers' ``MixtralForCausalLM`` from a small random configuration; its experts are stacked
3-D weights run as grouped GEMMs (``experts_implementation="grouped_mm"``, or ``--experts batched_mm``), which
the backend runs as one NVFP4 GEMM per expert. Two runs from the same seed on the same batches: the backend
with ``recipes.high_precision()`` (the control) and with the NV recipe; the script prints both validation
losses and the relative gap, and writes them to ``--out``/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_gpt import get_batch, load_bytes  # noqa: E402

import fp4compile  # noqa: E402


def mixtral(tiny: bool, experts_implementation: str = "grouped_mm", vocab: int = 256) -> torch.nn.Module:
    """A small Mixtral: 8 experts, top-2; 6 layers x 384 (``tiny``: 4 layers x 64)."""
    import transformers

    width, layers, heads = (64, 4, 4) if tiny else (384, 6, 6)
    config = transformers.MixtralConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                                        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                                        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.MixtralForCausalLM(config)
    model.set_experts_implementation(experts_implementation)
    return model


class CausalLMLoss(torch.nn.Module):
    """``model(x, y) -> loss`` for a transformers causal LM (whose labels are the inputs: it shifts them)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x, labels=x).loss


def make_run(args, device: str, policy):
    torch.manual_seed(args.seed)
    model = CausalLMLoss(mixtral(args.tiny, args.experts)).to(device)
    if device == "cuda":
        model = model.to(torch.bfloat16)
    inner = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(model, backend=fp4compile.backend(policy=policy, inner=inner))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    return model, compiled, opt


@torch.no_grad()
def evaluate(compiled, data, args, device) -> float:
    gen = torch.Generator().manual_seed(1234)
    return sum(compiled(*get_batch(data, args.batch_size, args.block_size, gen, device)).item()
               for _ in range(args.eval_batches)) / args.eval_batches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="4 layers x 64, for a CPU")
    p.add_argument("--experts", choices=["grouped_mm", "batched_mm"], default="grouped_mm")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("runs", "train_moe"))
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = dict(steps=20, batch_size=4, block_size=64, lr=3e-3) if args.tiny else dict(
        steps=300, batch_size=32, block_size=256, lr=1e-3)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    data = load_bytes(None, limit=1_000_000 if args.tiny else 20_000_000)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    runs = {"high": make_run(args, device, fp4compile.recipes.high_precision()),
            "fp4": make_run(args, device, fp4compile.recipes.nvfp4())}
    sched = {k: torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.1)
             for k, (_, _, opt) in runs.items()}
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for step in range(args.steps):
        x, y = get_batch(train, args.batch_size, args.block_size, gen, device)  # the same batch for both runs
        losses = {}
        for k, (model, compiled, opt) in runs.items():
            loss = compiled(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched[k].step()
            losses[k] = loss.item()
        if step % max(1, args.steps // 10) == 0 or step + 1 == args.steps:
            print(f"step {step:4d}  " + "  ".join(f"{k} {v:.4f}" for k, v in losses.items()), flush=True)

    results = {k: evaluate(compiled, val, args, device) for k, (_, compiled, _) in runs.items()}
    gap = results["fp4"] / results["high"] - 1
    print(f"\n{args.steps} steps in {time.time() - start:.0f}s on {device}")
    print(f"val loss: high precision {results['high']:.4f}, nvfp4 {results['fp4']:.4f}, gap {100 * gap:+.2f}%")
    fp4_rows = [r for r in fp4compile.backend(policy=fp4compile.recipes.nvfp4(),
                                              inner="inductor" if device == "cuda" else "aot_eager").rows()
                if r.training and r.role == "forward" and r.weight.endswith(("gate_up_proj", "down_proj"))]
    print(f"expert GEMMs in NVFP4: {sum(r.precision == 'nvfp4' for r in fp4_rows)} of {len(fp4_rows)} "
          "(first and last block high precision)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "val_loss": results, "gap": gap}, f, indent=1)


if __name__ == "__main__":
    main()
