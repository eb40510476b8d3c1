"""FSDP2 with ``backend="fp4"`` against one GPU and against FSDP2 with Inductor BF16, in one command.

    PYTHONPATH=. python3 benchmarks/bench_fsdp.py                   # 2 GPUs, GPT-2 small, 200 steps (~5-6 min)
    PYTHONPATH=. python3 benchmarks/bench_fsdp.py --tiny --device cpu --steps 6    # smoke test on CPU

Runs examples/train_gpt_fsdp.py three times on the same global batch (16 sequences of 1024 tokens per step,
the same seed and data): FSDP2 fp4 and FSDP2 bf16 (Inductor) on ``--nproc`` GPUs through torchrun, and fp4
in one process on the whole global batch. Then prints, and writes to ``<out>/summary.md`` and ``.json``:
the loss of each run at steps 50/100/150/200, the largest absolute difference between the FSDP2 fp4 and the
one-GPU fp4 curves (raw, and after a 10-step moving average: stochastic rounding makes single steps differ),
the median step time after warm-up, tokens/s per GPU, and FSDP2 fp4's step time as a multiple of FSDP2 bf16's.

NVLink multicast (NVLS) stays off: ``NCCL_NVLS_ENABLE=0`` is set for every run. Each run has its own time
limit (200, 120 and 190 s: 8.5 minutes in all), so one that hangs cannot take the others with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "train_gpt_fsdp.py")


@dataclasses.dataclass(frozen=True)
class Run:
    name: str            # the JSON file the example writes: <strategy>-<mode>-<compile>-w<world>
    label: str
    argv: tuple[str, ...]
    nproc: int
    timeout_s: float     # its share of the whole command's limit (9 minutes on the GPU machine)


def runs(nproc: int) -> list[Run]:
    return [
        # Expected on H100/H200-class GPUs: ~2-2.5 min (12 block variants compiled, host-bound FP4 steps),
        # ~1 min, ~2 min. The limits add up to 8.5 min, so the command ends within 9 minutes whatever happens.
        Run(f"fsdp-fp4-blocks-w{nproc}", f"FSDP2 fp4 ({nproc} GPUs)", ("--fsdp", "--mode", "fp4"), nproc, 200),
        Run(f"fsdp-bf16-blocks-w{nproc}", f"FSDP2 bf16 ({nproc} GPUs)", ("--fsdp", "--mode", "bf16"), nproc, 120),
        Run("single-fp4-model-w1", "fp4, one GPU", ("--single", "--mode", "fp4"), 1, 190),
    ]


def launch(run: Run, common: list[str], timeout: float, env: dict) -> tuple[int, float]:
    if run.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={run.nproc}", EXAMPLE]
    else:
        cmd = [sys.executable, EXAMPLE]
    cmd += list(run.argv) + common
    print(f"\n=== {run.label}: {' '.join(cmd)}", flush=True)
    start = time.time()
    # A process group of its own (start_new_session): on timeout the whole group (torchrun and its workers) is
    # stopped, so no worker is left holding a GPU for the next run.
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"=== {run.label}: over the {timeout:.0f} s limit, stopped", flush=True)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = 124
    return rc, time.time() - start


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def summarize(results: dict[str, Optional[dict]], order: list[Run], steps: int) -> tuple[str, dict]:
    marks = [s for s in (50, 100, 150, 200) if s <= steps] or [steps]
    lines = ["| run | " + " | ".join(f"loss @{s}" for s in marks)
             + " | median step ms | tokens/s per GPU | first step s | peak GiB |",
             "|---|" + "---|" * len(marks) + "---|---|---|---|"]
    for run in order:
        r = results.get(run.name)
        if r is None:
            status = "failed" if run.name in results else "not run"
            lines.append(f"| {run.label} | " + " | ".join(status for _ in marks) + " | | | | |")
            continue
        loss = [f"{r['losses'][s - 1]:.4f}" for s in marks]
        peak = f"{r['peak_mem_gib']:.2f}" if r.get("peak_mem_gib") is not None else "-"
        lines.append(f"| {run.label} | " + " | ".join(loss) + f" | {1e3 * r['median_step_s']:.1f} | "
                     f"{r['tokens_per_s_per_gpu']:,.0f} | {r['first_step_s']:.1f} | {peak} |")
    summary: dict = {"steps": steps, "marks": marks}
    fsdp_fp4, fsdp_bf16, single = (results.get(run.name) for run in order)
    if fsdp_fp4 and single:
        a, b = fsdp_fp4["losses"], single["losses"]
        raw = max(abs(x - y) for x, y in zip(a, b))
        smooth = max(abs(x - y) for x, y in zip(moving_average(a, 10), moving_average(b, 10)))
        at = {s: a[s - 1] - b[s - 1] for s in marks}
        summary.update(max_abs_loss_diff=raw, max_abs_loss_diff_ma10=smooth, loss_diff_at=at)
        lines.append("")
        lines.append("FSDP2 fp4 minus one-GPU fp4, same global batch: "
                     + ", ".join(f"step {s}: {d:+.4f}" for s, d in at.items())
                     + f"; max |diff| over the curve {raw:.4f} (10-step moving average: {smooth:.4f})")
    if fsdp_fp4 and fsdp_bf16:
        ratio = fsdp_fp4["median_step_s"] / fsdp_bf16["median_step_s"]
        gap = {s: fsdp_fp4["losses"][s - 1] - fsdp_bf16["losses"][s - 1] for s in marks}
        summary.update(step_time_ratio_fp4_over_bf16=ratio,
                       tokens_per_s_ratio_fp4_over_bf16=fsdp_fp4["tokens_per_s_per_gpu"] / fsdp_bf16["tokens_per_s_per_gpu"],
                       loss_gap_fp4_minus_bf16_at=gap)
        lines.append(f"FSDP2 fp4 step time / FSDP2 bf16 step time: {ratio:.2f}x "
                     f"(tokens/s per GPU ratio {1 / ratio:.2f}); fp4 minus bf16 loss: "
                     + ", ".join(f"step {s}: {d:+.4f}" for s, d in gap.items()))
    return "\n".join(lines), summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--nproc", type=int, default=2, help="GPUs (processes) for the FSDP2 runs")
    p.add_argument("--out", default="runs/bench_fsdp")
    p.add_argument("--timeout-scale", type=float, default=1.0, help="multiplies each run's time limit")
    p.add_argument("--tiny", action="store_true", help="the example's small model (smoke test)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--only", nargs="+", default=None, help="run names to run (default: all three)")
    args = p.parse_args()

    env = dict(os.environ)
    env["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off on these machines
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    common = ["--steps", str(args.steps), "--out", args.out, "--log-every", "25"]
    if args.tiny:
        common.append("--tiny")
    if args.device:
        common += ["--device", args.device]
    if args.steps <= 10:
        common += ["--warmup", "1"]

    order = runs(args.nproc)
    results: dict[str, Optional[dict]] = {}
    started = time.time()
    for run in order:
        if args.only and run.name not in args.only:
            continue
        path = os.path.join(args.out, f"{run.name}.json")
        if os.path.exists(path):
            os.remove(path)  # a stale file from an earlier run must not stand in for a failed one
        rc, seconds = launch(run, common, run.timeout_s * args.timeout_scale, env)
        results[run.name] = json.load(open(path)) if rc == 0 and os.path.exists(path) else None
        print(f"=== {run.label}: exit {rc} after {seconds:.0f} s", flush=True)

    table, summary = summarize(results, order, args.steps)
    summary["wall_s"] = time.time() - started
    summary["runs"] = {name: (None if r is None else {k: r[k] for k in (
        "median_step_s", "tokens_per_s_per_gpu", "first_step_s", "peak_mem_gib", "gpu", "torch", "world")})
        for name, r in results.items()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print("\n" + table)
    print(f"\n{summary['wall_s']:.0f} s in all; {args.out}/summary.md and summary.json written")
    if any(r is None for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
