"""fp4compile under FSDP2 and DDP: two CPU processes on the gloo backend against one process.

One spawn of two ranks runs every distributed scenario (`_worker`) and saves what each rank saw; the tests
compare that with single-process runs made here. The model is the test GPT (4 blocks, d=32; DDP: d=128, so
that 1 MB buckets split it), compiled with the ``aot_eager`` inner compiler.

Tolerances (test_fsdp_step_matches_one_process_on_the_concatenated_batch):
- high-precision recipe: the ranks' half batches give the full batch's loss and gradients up to float32
  summation order (FSDP2 averages the ranks' gradients): 1e-5 relative.
- NV recipe: not bit-exact, and cannot be. Each rank quantizes its own activations with their own per-tensor
  amax (the tensor scale of x, dy and dy^T differs from the full batch's), the weight-gradient GEMM reduces
  over each rank's tokens (its 16-token blocks and RHT are over half the batch, the partial products are then
  summed in high precision), and stochastic rounding draws other noise. The two-rank gradient is another draw
  of the FP4 error, so the bound is stated in that error's own units, per parameter: the distance to the
  one-process gradient must be at most twice the larger of (the one-process FP4 error: NV recipe vs high
  precision) and (the stochastic-rounding spread: two one-process runs that differ only in their seed). At
  this size (d=32) that error is 5-35% of a gradient's norm; measured, the distance is 0.2-1.5x the larger
  of the two. The loss (forward: round-to-nearest only, so only the activation amax differs) within 1e-3.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

import pytest
import torch

import fp4compile
from helpers import batch
from models import GPT

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

from fp4compile.distributed import find_block_stack, rank_key_salt  # noqa: E402
from fp4compile.ops.observe import set_process_observer  # noqa: E402

WORLD = 2
GLOBAL_BATCH = 4  # sequences of 32 tokens; each rank takes 2 (64 tokens: whole 16-token blocks)
STEP_SEED = 1
# The first stochastic rounding of the backward pass: dy entering the last quantized block (block 3 and the head
# are high precision), so with the same batch both ranks round the very same tensor.
SR_LABEL = "transformer.h.2.mlp.c_proj:input_grad:lhs"


def _model(d: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    return GPT(n_layer=4, d=d, n_head=2 if d == 32 else 4)


def _global_batch(d_vocab: int = 64):
    return batch(vocab=d_vocab, b=GLOBAL_BATCH, t=32, seed=3)


class _Recorder:
    """Process observer: the codes, block scales and tensor scale of every quantization whose label passes."""

    def __init__(self, keep) -> None:
        self.keep, self.seen = keep, {}

    def __call__(self, label, x, qt) -> None:
        if self.keep(label):
            self.seen[label] = (qt.qdata.clone(), qt.scale.view(torch.uint8).clone(), qt.per_tensor_scale.clone())


def _rows(be) -> dict:
    return {(r.module, r.role): (r.precision, r.layer) for r in be.rows()}


def _step(compiled, model, x, y, recorder=None):
    previous = set_process_observer(recorder)
    try:
        torch.manual_seed(STEP_SEED)
        loss = compiled(x, y)
        loss.backward()
    finally:
        set_process_observer(previous)
    return loss.detach()


def _full_grads(model) -> dict:
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).clone()
    return grads


def _fsdp_run(rank, policy, per_block: bool, recorder=None, same_batch=False) -> dict:
    from torch.distributed.fsdp import fully_shard

    torch._dynamo.reset()
    model = _model()
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    be = fp4compile.Fp4Backend(policy=policy, inner="aot_eager", verify=True, model=model)
    if per_block:
        for block in model.transformer.h:
            block.compile(backend=be)
        compiled = model
    else:
        compiled = torch.compile(model, backend=be)
    x, y = _global_batch()
    rows = slice(0, 2) if same_batch else slice(2 * rank, 2 * rank + 2)
    loss = _step(compiled, model, x[rows], y[rows], recorder)
    dist.all_reduce(loss)
    result = {"loss": loss / WORLD, "grads": _full_grads(model), "rows": _rows(be),
              "seen": dict(recorder.seen) if recorder else {}}
    # A second step finds every block's (unsharded, resharded since) weights without scanning the model again.
    scans = []
    rescan = be.layout._rescan
    be.layout._rescan = lambda: (scans.append(1), rescan())
    _step(compiled, model, x[rows], y[rows])
    result["rescans_in_second_step"] = len(scans)
    return result


def _ddp_run(model_option: bool, optimize_ddp: bool = True) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch._dynamo.reset()
    torch._dynamo.config.optimize_ddp = optimize_ddp
    ddp = DDP(_model(d=128), bucket_cap_mb=1)
    be = fp4compile.Fp4Backend(inner="aot_eager", verify=True, model=ddp if model_option else None)
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    log = logging.getLogger("fp4compile.capture.compiler")
    log.addHandler(handler)
    try:
        x, y = _global_batch()
        _step(torch.compile(ddp, backend=be), ddp, x[:2], y[:2])
    finally:
        log.removeHandler(handler)
        torch._dynamo.config.optimize_ddp = True
    return {"rows": _rows(be), "graphs": len({r.graph for r in be.reports}), "warnings": records}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        weights = _Recorder(lambda label: label.endswith(":forward:rhs"))
        result = {
            "fsdp_blocks": _fsdp_run(rank, None, per_block=True, recorder=weights),
            "fsdp_whole": _fsdp_run(rank, None, per_block=False),
            "fsdp_high": _fsdp_run(rank, fp4compile.recipes.high_precision(), per_block=True),
        }
        sr = [_fsdp_run(rank, None, True, _Recorder(lambda label: label == SR_LABEL), same_batch=True)["seen"][SR_LABEL]
              for _ in range(2)]
        result["sr"] = sr
        result["ddp_model"] = _ddp_run(model_option=True)
        result["ddp_plain"] = _ddp_run(model_option=False)
        result["ddp_unsplit"] = _ddp_run(model_option=False, optimize_ddp=False)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the two ranks saw (one spawn for every test of this module)."""
    import torch.multiprocessing as mp

    out = str(tmp_path_factory.mktemp("ranks"))
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _one_process(policy=None, recorder=None, seed=STEP_SEED, d=32):
    """The same model and step in this process, on the whole global batch."""
    global STEP_SEED
    torch._dynamo.reset()
    model = _model(d)
    be = fp4compile.Fp4Backend(policy=policy, inner="aot_eager", verify=True)
    x, y = _global_batch()
    saved, STEP_SEED = STEP_SEED, seed
    try:
        loss = _step(torch.compile(model, backend=be), model, x, y, recorder)
    finally:
        STEP_SEED = saved
    return {"loss": loss, "grads": _full_grads(model), "rows": _rows(be), "seen": dict(recorder.seen) if recorder else {}}


def test_rank_salt_keeps_rank_zero_and_separates_ranks():
    assert rank_key_salt(0) == 0 and rank_key_salt() == 0  # no process group here: today's keys
    salts = [rank_key_salt(r) for r in range(1, 4097)]
    assert len(set(salts)) == len(salts) and all(0 < s < 2**62 for s in salts)
    with pytest.raises(ValueError, match="rank must be an int"):
        rank_key_salt(-1)


def test_find_block_stack_sees_through_wrappers():
    model = _model()
    assert find_block_stack(model).prefix == "transformer.h" and find_block_stack(model).count == 4
    model.transformer.h[2] = torch.compile(model.transformer.h[2])  # torchtitan-style: adds "_orig_mod"
    assert find_block_stack(model) == find_block_stack(_model())


def test_fsdp_precision_table_equals_one_process(ranks):
    """Per-block and whole-model compile under FSDP2 decide what one process decides for the whole model:
    first and last block high, blocks 1-2 NVFP4, with the same module paths and layer indices (the head is
    not compiled under FSDP2, where the root forward runs eagerly; it stays high precision either way)."""
    single = _one_process()["rows"]
    expected = {k: v for k, v in single.items() if k[0] != "lm_head"}
    assert {v[0] for k, v in expected.items() if ".h.1." in k[0]} == {"nvfp4"}
    assert {v[0] for k, v in expected.items() if ".h.0." in k[0] or ".h.3." in k[0]} == {"high"}
    for r in ranks:
        assert r["fsdp_blocks"]["rows"] == expected
        assert r["fsdp_whole"]["rows"] == expected


def test_fsdp_whole_model_and_per_block_compile_agree_bitwise(ranks):
    for r in ranks:
        assert r["fsdp_blocks"]["rescans_in_second_step"] == r["fsdp_whole"]["rescans_in_second_step"] == 0
        a, b = r["fsdp_blocks"], r["fsdp_whole"]
        assert torch.equal(a["loss"], b["loss"])
        assert all(torch.equal(a["grads"][n], b["grads"][n]) for n in a["grads"])


def test_fsdp_weight_codes_identical_across_ranks_and_to_one_process(ranks):
    """FSDP2 gives the compiled graph the gathered full weight, so each rank quantizes it with the full
    weight's amax: codes, scales and tensor scale equal bit for bit, and equal one process's."""
    single = _one_process(recorder=_Recorder(lambda label: label.endswith(":forward:rhs")))["seen"]
    seen = [r["fsdp_blocks"]["seen"] for r in ranks]
    assert set(seen[0]) == set(seen[1]) == set(single) and len(single) == 8  # blocks 1-2, 4 linears each
    for label, parts in single.items():
        for r in seen:
            assert all(torch.equal(a, b) for a, b in zip(parts, r[label])), label


def test_stochastic_rounding_noise_differs_across_ranks_and_repeats_from_the_seed(ranks):
    """Both ranks ran the same batch from the same seed: without the rank salt their stochastic rounding
    would be identical. It differs across ranks, and each rank repeats itself exactly on a rerun."""
    for r in ranks:
        first, second = r["sr"]
        assert all(torch.equal(a, b) for a, b in zip(first, second))
    codes0, codes1 = ranks[0]["sr"][0][0], ranks[1]["sr"][0][0]
    assert torch.equal(ranks[0]["sr"][0][2], ranks[1]["sr"][0][2])  # the same dy: the same tensor scale
    differ = (codes0 != codes1).float().mean().item()
    assert differ > 0.05, f"only {differ:.1%} of the code bytes differ between ranks"


def _relative(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_fsdp_step_matches_one_process_on_the_concatenated_batch(ranks):
    high = _one_process(fp4compile.recipes.high_precision())
    for r in ranks:
        fsdp = r["fsdp_high"]
        assert abs(fsdp["loss"].item() - high["loss"].item()) <= 1e-5 * abs(high["loss"].item())
        for name, g in high["grads"].items():
            assert _relative(fsdp["grads"][name], g) <= 1e-5, name

    single, reseeded = _one_process(), _one_process(seed=STEP_SEED + 1)
    fsdp = ranks[0]["fsdp_blocks"]
    assert abs(fsdp["loss"].item() - single["loss"].item()) <= 1e-3 * abs(single["loss"].item())
    worst = []
    for name, g in single["grads"].items():
        fp4_error = (g - high["grads"][name]).norm().item()
        sr_spread = (reseeded["grads"][name] - g).norm().item()
        diff = (ranks[1]["fsdp_blocks"]["grads"][name] - g).norm().item()
        assert torch.equal(ranks[1]["fsdp_blocks"]["grads"][name], fsdp["grads"][name])  # one gradient, gathered
        worst.append((diff / (2 * max(fp4_error, sr_spread)), name, diff, fp4_error, sr_spread))
    worst.sort(reverse=True)
    assert worst[0][0] <= 1.0, f"worst (ratio to bound, name, |diff|, FP4 error, SR spread): {worst[:3]}"


def test_ddp_with_the_model_counts_blocks_in_the_model(ranks):
    """DDP's graph splitting (1 MB buckets) hands the backend several graphs; given the model, the backend
    decides per site what one process decides for the whole model."""
    single = _one_process(d=128)["rows"]
    for r in ranks:
        assert r["ddp_model"]["graphs"] > 1
        assert r["ddp_model"]["rows"] == single
        assert not any("DDP's graph splitting" in w for w in r["ddp_model"]["warnings"])


def test_ddp_without_the_model_finds_it_and_optimize_ddp_off_needs_nothing(ranks):
    """Not given the model, the backend finds the module torch.compile wrapped: DDP's splits are placed in it
    as with options={'model': ...}."""
    single = _one_process(d=128)["rows"]
    for r in ranks:
        plain = r["ddp_plain"]
        assert plain["graphs"] > 1 and not any("DDP's graph splitting" in w for w in plain["warnings"])
        assert plain["rows"] == single
        unsplit = r["ddp_unsplit"]
        assert unsplit["graphs"] == 1 and unsplit["rows"] == single and not unsplit["warnings"]


def test_fsdp_example_trains_on_cpu_like_one_process(tmp_path):
    """examples/train_gpt_fsdp.py as a user runs it (torchrun, two gloo ranks, the tiny model) and with
    --single on the same global batch; benchmarks/bench_fsdp.py's table reads what they wrote. Step 0's
    forward is round-to-nearest only, so the two losses differ only through the ranks' activation amax."""
    import json
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    example = os.path.join(root, "examples", "train_gpt_fsdp.py")
    common = ["--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)]
    # As a user runs it: without the interpreter setting tests/conftest.py makes for the kernel tests.
    # Inductor compiles in-process: in one of five runs of the suite a rank aborted at exit ("terminate
    # called without an active exception") after training; Inductor's compile workers torn down at exit
    # are suspected, not confirmed.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=root, OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1")
    launches = [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", example,
                 "--fsdp", *common], [sys.executable, example, "--single", *common]]
    for cmd in launches:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
    fsdp = json.load(open(tmp_path / "fsdp-fp4-blocks-w2.json"))
    single = json.load(open(tmp_path / "single-fp4-model-w1.json"))
    assert fsdp["world"] == 2 and fsdp["tokens_per_step_per_gpu"] * 2 == single["tokens_per_step_per_gpu"]
    assert len(fsdp["losses"]) == 2 and all(l == l and l > 0 for l in fsdp["losses"])  # finite, not NaN
    assert abs(fsdp["losses"][0] - single["losses"][0]) <= 1e-3 * single["losses"][0]
    assert fsdp["tokens_per_s_per_gpu"] > 0 and fsdp["median_step_s"] > 0

    sys.path.insert(0, os.path.join(root, "benchmarks"))
    try:
        import bench_fsdp
    finally:
        sys.path.pop(0)
    order = bench_fsdp.runs(2)
    table, summary = bench_fsdp.summarize({order[0].name: fsdp, order[2].name: single}, order, steps=2)
    assert "not run" in table and "failed" not in table  # the bf16 run was not made here
    assert summary["max_abs_loss_diff"] == max(abs(a - b) for a, b in zip(fsdp["losses"], single["losses"]))
