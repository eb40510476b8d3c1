"""Train GPT-2 small with ``backend="fp4"`` on several GPUs: FSDP2 (``fully_shard`` per block) or DDP.

    torchrun --nproc-per-node 2 examples/train_gpt_fsdp.py --fsdp --mode fp4 --steps 200 --out runs/fsdp
    torchrun --nproc-per-node 2 examples/train_gpt_fsdp.py --fsdp --mode bf16 --steps 200 --out runs/fsdp
    python examples/train_gpt_fsdp.py --single --mode fp4 --steps 200 --out runs/fsdp    # one GPU, whole batch
    torchrun --nproc-per-node 2 examples/train_gpt_fsdp.py --tiny --device cpu --fsdp --steps 5   # CPU, gloo

Every run trains on the same global batch per step (``--global-batch`` sequences, split evenly over the
ranks; ``--single`` runs it in one process), from the same seed and the same data, so the loss curves of
``--single`` and ``--fsdp`` compare directly. Parameters are bfloat16 on GPU (float32 on CPU), AdamW fused on
GPU. ``--mode fp4`` compiles with the NV recipe, giving the backend the model (``options={"model": ...}``,
docs/distributed.md); ``--mode bf16`` compiles with Inductor. Writes ``<out>/<name>.json``: per-step loss
(the global batch's mean), step times, the median step time after ``--warmup`` steps and tokens/s per GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt import GPT, GPTConfig  # noqa: E402
from train_gpt import get_batch, load_bytes  # noqa: E402

import fp4compile  # noqa: E402

logger = logging.getLogger(__name__)


class Strategy(enum.Enum):
    FSDP = "fsdp"
    DDP = "ddp"
    SINGLE = "single"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    strategy: Strategy
    mode: str                 # "fp4" or "bf16"
    compile: str              # "blocks" (each block on its own) or "model"
    device: str
    rank: int
    world: int
    local_rank: int

    @property
    def name(self) -> str:
        return f"{self.strategy.value}-{self.mode}-{self.compile}-w{self.world}"


def init_distributed(strategy: Strategy, device: str) -> tuple[int, int, int]:
    """(rank, world size, local rank); initializes the process group for FSDP and DDP (NCCL on GPU, gloo on
    CPU) from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if strategy is Strategy.SINGLE:
        if world != 1:
            raise ValueError(f"--single runs in one process; got WORLD_SIZE={world} (launch it without torchrun)")
        return 0, 1, 0
    if "RANK" not in os.environ:
        raise ValueError(f"--{strategy.value} needs torchrun (RANK, WORLD_SIZE and MASTER_ADDR in the environment)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def build(cfg: GPTConfig, run: RunConfig, args) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model whose parameters the optimizer steps, the callable that runs a step's forward)."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank and in --single
    model = GPT(cfg).to(run.device)
    if run.device == "cuda":
        model = model.to(torch.bfloat16)
    if run.strategy is Strategy.FSDP:
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    elif run.strategy is Strategy.DDP:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[run.local_rank] if run.device == "cuda" else None)

    if run.mode == "fp4":
        inner = args.inner or ("inductor" if run.device == "cuda" else "aot_eager")
        # The backend is given the model: under FSDP2 Dynamo compiles each block on its own and DDP splits the
        # graph at its buckets; the model tells the backend which block it compiles (docs/distributed.md).
        compiler = fp4compile.backend(policy=fp4compile.recipes.nvfp4(), inner=inner, model=model)
    else:
        compiler = "inductor"
    if run.compile == "blocks":
        for block in (model.module if run.strategy is Strategy.DDP else model).transformer.h:
            block.compile(backend=compiler)
        return model, model
    return model, torch.compile(model, backend=compiler)


def train(run: RunConfig, args) -> dict:
    if args.tiny:
        cfg = GPTConfig(vocab_size=256, block_size=64, n_layer=4, n_head=2, n_embd=64)
    else:  # GPT-2 small as in benchmarks/bench_train_step.py; the data are bytes, so tokens stay below 256
        cfg = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    block = args.block_size or cfg.block_size
    cfg = dataclasses.replace(cfg, block_size=block)
    if args.global_batch % run.world:
        raise ValueError(f"--global-batch {args.global_batch} does not split over {run.world} ranks")
    local = args.global_batch // run.world

    data = load_bytes(args.data, limit=2_000_000 if args.tiny else 50_000_000)
    model, step_model = build(cfg, run, args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95),
                            fused=run.device == "cuda")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(args.seed)  # every rank draws the same global batch, then takes its rows

    def sync() -> None:
        if run.device == "cuda":
            torch.cuda.synchronize()

    losses, times = [], []
    for step in range(args.steps):
        x, y = get_batch(data, args.global_batch, block, gen, "cpu")
        rows = slice(run.rank * local, (run.rank + 1) * local)
        x, y = x[rows].to(run.device), y[rows].to(run.device)
        sync()
        start = time.perf_counter()
        loss = step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        loss = loss.detach().float()
        if run.world > 1:
            dist.all_reduce(loss)  # the ranks' means over equal token counts: the global batch's mean
            loss /= run.world
        sync()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if run.rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
            print(f"[{run.name}] step {step:4d}  loss {losses[-1]:.4f}  {1e3 * times[-1]:.1f} ms", flush=True)

    steady = times[args.warmup:] or times
    median = statistics.median(steady)
    result = {
        "name": run.name, "strategy": run.strategy.value, "mode": run.mode, "compile": run.compile,
        "world": run.world, "device": run.device,
        "gpu": torch.cuda.get_device_name() if run.device == "cuda" else None,
        "torch": torch.__version__, "config": dataclasses.asdict(cfg),
        "global_batch": args.global_batch, "tokens_per_step_per_gpu": local * block,
        "losses": losses, "step_s": times, "first_step_s": times[0],
        "median_step_s": median, "tokens_per_s_per_gpu": local * block / median,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if run.device == "cuda" else None,
        "args": {k: v for k, v in vars(args).items()},
    }
    if run.rank == 0:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"{run.name}.json")
        with open(path, "w") as f:
            json.dump(result, f)
        print(f"[{run.name}] median step {1e3 * median:.1f} ms, {result['tokens_per_s_per_gpu']:,.0f} tokens/s per "
              f"GPU, first step {times[0]:.1f} s; wrote {path}", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--fsdp", action="store_true", help="FSDP2: fully_shard each block, then the model")
    how.add_argument("--ddp", action="store_true", help="DistributedDataParallel")
    how.add_argument("--single", action="store_true", help="one process on the whole global batch")
    p.add_argument("--mode", choices=["fp4", "bf16"], default="fp4", help="backend='fp4' (NV recipe) or Inductor")
    p.add_argument("--compile", choices=["blocks", "model"], default=None,
                   help="compile each block (default for --fsdp) or the whole model (default otherwise)")
    p.add_argument("--inner", choices=["inductor", "aot_eager", "eager"], default=None,
                   help="fp4's compiler for the rest (default: inductor on GPU, aot_eager on CPU)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--tiny", action="store_true", help="a small model for CPU runs and tests")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the median step time")
    p.add_argument("--global-batch", type=int, default=None, help="sequences per step (default: 16, tiny: 8)")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="default: 6e-4, tiny: 3e-3")
    p.add_argument("--data", default=None, help="a text file (default: the Python standard library source)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--out", default="runs/train_gpt_fsdp")
    args = p.parse_args()
    args.global_batch = args.global_batch or (8 if args.tiny else 16)
    args.lr = args.lr or (3e-3 if args.tiny else 6e-4)

    strategy = Strategy.FSDP if args.fsdp else Strategy.DDP if args.ddp else Strategy.SINGLE
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    compile_how = args.compile or ("blocks" if strategy is Strategy.FSDP else "model")
    rank, world, local_rank = init_distributed(strategy, device)
    # Each rank draws its own stochastic-rounding keys (fp4compile.distributed.rank_key_salt): same seed.
    run = RunConfig(strategy, args.mode, compile_how, device, rank, world, local_rank)
    try:
        train(run, args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
