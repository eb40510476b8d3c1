"""Training-step time and memory of fp4compile against BF16 baselines, measured side by side in one run.

    python benchmarks/bench_train_step.py                       # GPT-2 small, the four like-for-like modes
    python benchmarks/bench_train_step.py --models small gpt2-medium llama --modes inductor-bf16 fp4
    python benchmarks/bench_train_step.py --models gpt-d2048 --steps 10 --warmup 3   # d=2048, 16 layers
    python benchmarks/bench_train_step.py --device cpu --models tiny --modes eager-bf16 fp4 --steps 2 --warmup 1
    python benchmarks/bench_train_step.py --models mixtral-small   # examples/train_moe.py's mixture of experts

Modes: ``eager-bf16``; ``inductor-bf16`` (torch.compile); ``fakequant-eager`` and ``fakequant-compiled`` (the
NV recipe as plain-PyTorch fake quantization: fp4compile.testing's module swap, eager and under
torch.compile); ``fp4`` (``backend="fp4"``, the NV recipe), ``fp4-cudagraphs`` (the same with CUDA graphs) and
``fp4-cudagraphs-gemm-op`` (the same with every FP4 GEMM on the ``fp4compile::gemm`` op, ``MODE_ENV``);
``fp4-graph-mm`` (``fp4`` with the traced TMA GEMM turned off, ``FP4COMPILE_TRACED_GEMM=0``: every FP4 GEMM on
cuBLAS as graph ops, the plain backend's GEMMs before that path existed). Every model has bf16 parameters and a fused AdamW.
Per mode: median step time over ``--steps`` steps after ``--warmup`` (CUDA events around each whole step),
tokens/s, the first (compiling) step's time, the warm-up's time, and the ratio to the like-for-like BF16 mode
(``inductor-bf16-cudagraphs`` for a mode with CUDA graphs, else ``inductor-bf16``). Memory twice: the
allocator's peak (``max_memory_allocated``, blind to CUDA-graph pools) and the device's used memory
(``mem_get_info``, after the timed steps, less what was used before the mode's model was built).
``--device cpu`` (a smoke test of the script: wall-clock times, no memory figures) takes the ``tiny`` model.
Each mode's result is appended to the JSON file as soon as it is measured, so a run cut short keeps them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from unittest import mock

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from gpt import GPT, GPTConfig  # noqa: E402
from llama import Llama, LlamaConfig  # noqa: E402
from train_moe import CausalLMLoss, mixtral  # noqa: E402

import fp4compile  # noqa: E402
from fp4compile.policy.precision import LinearPrecision  # noqa: E402
from fp4compile.testing import swap_in_reference  # noqa: E402

MODELS = {
    # name: (constructor, batch, sequence length)
    "gpt2-small": (lambda: GPT(GPTConfig(50304, 1024, 12, 12, 768)), 8, 1024),
    "gpt2-medium": (lambda: GPT(GPTConfig(50304, 1024, 24, 16, 1024)), 8, 1024),
    "llama": (lambda: Llama(LlamaConfig(32000, 1024, 16, 16, 2816)), 8, 1024),
    "small": (lambda: GPT(GPTConfig(256, 256, 6, 6, 384)), 64, 256),
    # d=2048, 16 layers, 16 heads (~0.9B parameters), 8192 tokens per step: the shapes of
    # benchmarks/bench_gemm_shapes.py's default table.
    "gpt-d2048": (lambda: GPT(GPTConfig(50304, 2048, 16, 16, 2048)), 4, 2048),
    "tiny": (lambda: GPT(GPTConfig(256, 64, 3, 2, 64)), 2, 64),  # for --device cpu
    # transformers' Mixtral, 6 layers x 384, 8 experts top-2, experts as grouped GEMMs (examples/train_moe.py)
    "mixtral-small": (lambda: CausalLMLoss(mixtral(tiny=False)), 32, 256),
}
MODES = ("eager-bf16", "inductor-bf16", "inductor-bf16-cudagraphs", "fakequant-eager", "fakequant-compiled", "fp4",
         "fp4-cudagraphs", "fp4-cudagraphs-gemm-op", "fp4-graph-mm")
#: What a run measures unless told otherwise: each fp4 mode beside its like-for-like BF16 mode.
DEFAULT_MODES = ("inductor-bf16", "inductor-bf16-cudagraphs", "fp4", "fp4-cudagraphs")
#: Settings a mode runs under (fp4compile.env), for A/B comparisons of the backend's choices in one run.
MODE_ENV = {"fp4-cudagraphs-gemm-op": {"FP4COMPILE_GEMM_IN_GRAPH": "0"}, "fp4-graph-mm": {"FP4COMPILE_TRACED_GEMM": "0"}}


def _fake_quant_precisions(model: torch.nn.Module, recipe) -> dict[str, LinearPrecision]:
    """The NV recipe's choices for module-swap fake quantization: block linears, first and last block kept."""
    blocks = model.transformer.h if hasattr(model, "transformer") else model.layers
    n = len(blocks)
    cfg = LinearPrecision(recipe.forward, recipe.input_grad, recipe.weight_grad)
    out = {}
    prefix = "transformer.h" if hasattr(model, "transformer") else "layers"
    for i in range(recipe.high_precision_first_blocks, n - recipe.high_precision_last_blocks):
        for name, mod in blocks[i].named_modules():
            if isinstance(mod, torch.nn.Linear):
                out[f"{prefix}.{i}.{name}"] = cfg
    return out


def build(model_name: str, mode: str, device: str):
    make, batch, seq = MODELS[model_name]
    torch.manual_seed(0)
    model = make().to(device=device, dtype=torch.bfloat16)
    if mode.startswith("fakequant"):
        swap_in_reference(model, _fake_quant_precisions(model, fp4compile.recipes.nvfp4()))
    if mode in ("inductor-bf16", "fakequant-compiled"):
        step_model = torch.compile(model)
    elif mode == "inductor-bf16-cudagraphs":
        step_model = torch.compile(model, mode="reduce-overhead")
    elif mode.startswith("fp4"):
        step_model = torch.compile(model, backend=fp4compile.backend(
            policy=fp4compile.recipes.nvfp4(), cudagraphs="cudagraphs" in mode))
    else:
        step_model = model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    return model, step_model, opt, batch, seq


def run_mode(model_name: str, mode: str, steps: int, warmup: int, device: str) -> dict:
    with mock.patch.dict(os.environ, MODE_ENV.get(mode, {})):  # restored afterwards, even on error
        return _run_mode(model_name, mode, steps, warmup, device)


def _vocab(model: torch.nn.Module) -> int:
    """The output head's width (the vocabulary): ``lm_head`` (GPT), ``output`` (Llama), ``model.lm_head``
    (a transformers model inside `CausalLMLoss`)."""
    for name in ("lm_head", "output", "model.lm_head"):
        try:
            return model.get_submodule(name).out_features
        except AttributeError:
            continue
    raise ValueError(f"{type(model).__name__} has no lm_head, output or model.lm_head to read the vocabulary from")


def _device_used_bytes() -> int:
    if not torch.cuda.is_available():
        return 0
    free, total = torch.cuda.mem_get_info()
    return total - free


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def like_for_like(mode: str) -> str:
    """The BF16 mode a mode is compared with: with CUDA graphs against BF16 with CUDA graphs."""
    return "inductor-bf16-cudagraphs" if "cudagraphs" in mode else "inductor-bf16"


def _run_mode(model_name: str, mode: str, steps: int, warmup: int, device: str) -> dict:
    # Peak memory over the whole run, warm-up included: CUDA-graph pools are allocated while recording.
    on_cuda = device == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    used_before = _device_used_bytes()
    model, step_model, opt, batch, seq = build(model_name, mode, device)
    vocab = _vocab(model)
    gen = torch.Generator(device=device).manual_seed(0)
    inputs = [(torch.randint(0, vocab, (batch, seq), device=device, generator=gen),
               torch.randint(0, vocab, (batch, seq), device=device, generator=gen)) for _ in range(4)]

    def step(i):
        loss = step_model(*inputs[i % len(inputs)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    _sync(device)
    t0 = time.perf_counter()
    loss = step(0)
    _sync(device)
    first_step_s = time.perf_counter() - t0
    for i in range(1, warmup):
        loss = step(i)
    _sync(device)
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(steps):
        if on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step(i)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t1 = time.perf_counter()
            loss = step(i)
            times.append((time.perf_counter() - t1) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_cuda else 0.0
    device_gib = (_device_used_bytes() - used_before) / 2**30
    ms = statistics.median(times)
    result = dict(model=model_name, mode=mode, step_ms=ms, step_ms_min=min(times), step_ms_max=max(times),
                  tokens_per_s=batch * seq / (ms / 1e3), peak_gib=peak, device_gib=device_gib,
                  first_step_s=first_step_s, compile_s=compile_s,
                  final_loss=float(loss), finite=bool(torch.isfinite(loss)))
    model = step_model = opt = inputs = None  # free them (step's cells too) before the caches are reset
    torch._dynamo.reset()
    from torch._inductor import cudagraph_trees

    if on_cuda:
        cudagraph_trees.reset_cudagraph_trees()
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gpt2-small"], choices=sorted(MODELS))
    p.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=MODES)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_train_step.json"))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_train_step needs a CUDA device (or --device cpu for a smoke test)")
    torch.backends.cuda.matmul.allow_tf32 = True
    results = []
    for model_name in args.models:
        for mode in args.modes:
            steps = max(3, args.steps // 4) if mode == "fakequant-eager" else args.steps
            try:
                r = run_mode(model_name, mode, steps, args.warmup, args.device)
            except Exception as exc:  # report and go on: one failing mode must not hide the others
                r = dict(model=model_name, mode=mode, error=f"{type(exc).__name__}: {exc}"[:300])
                torch._dynamo.reset()
            results.append(r)
            print(json.dumps(r), flush=True)
            with open(args.json, "w") as f:  # after every mode: a run cut short keeps what it measured
                json.dump(results, f, indent=1)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"\n{name} | torch {torch.__version__} | triton {__import__('triton').__version__}")
    print(f"{'model':12s} {'mode':24s} {'step ms':>9s} {'x bf16':>7s} {'vs':>24s} {'tok/s':>10s} {'peak GiB':>9s} "
          f"{'device GiB':>10s} {'1st step s':>10s} {'x bf16':>7s}")
    base = {(r["model"], r["mode"]): r for r in results if "step_ms" in r}
    for r in results:
        if "error" in r:
            print(f"{r['model']:12s} {r['mode']:24s} ERROR {r['error']}")
            continue
        ref = base.get((r["model"], like_for_like(r["mode"])))
        ratio = r["step_ms"] / ref["step_ms"] if ref else float("nan")
        first_ratio = r["first_step_s"] / ref["first_step_s"] if ref else float("nan")
        print(f"{r['model']:12s} {r['mode']:24s} {r['step_ms']:9.2f} {ratio:7.2f} {like_for_like(r['mode']):>24s} "
              f"{r['tokens_per_s']:10.0f} {r['peak_gib']:9.2f} {r['device_gib']:10.2f} {r['first_step_s']:10.1f} "
              f"{first_ratio:7.2f}")


if __name__ == "__main__":
    main()
