"""The traceable ``fp4compile::*_triton`` ops (`fp4compile.ops.triton_ops`) and the GEMM-path pass.

The ops must give the bits of the ``custom_op`` versions (reference quantizer on CPU) when called eagerly and
when traced by AOTAutograd (their body is then recorded as ``triton_kernel_wrapper_functional`` nodes, which
Inductor turns into launches from its generated code). On a machine without CUDA the kernels run eagerly under
``TRITON_INTERPRET=1`` at small sizes (the interpreter's kernels cannot be traced); the ``gpu`` tests trace
them and check Inductor's generated code.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

import fp4compile  # noqa: E402
from fp4compile.codegen import quantize as cq  # noqa: E402
from fp4compile.ops import triton_ops  # noqa: E402,F401  (registers the ops)
from fp4compile.passes.choose_gemm_paths import GemmPaths, gemm_path  # noqa: E402
from fp4compile.policy.precision import HIGH, GemmPrecision, OperandPrecision, Role  # noqa: E402
from helpers import skip_module_unless_kernels_run  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

skip_module_unless_kernels_run(cq._quantize_kernel)

OPERANDS = ["nvfp4|1x16|nearest|-", "nvfp4|16x16|nearest|-", "nvfp4|1x16|stochastic|-", "nvfp4|1x16|stochastic|rht"]


def _reference_parts(x, operand, seed, with_dequantized, amax=None):
    """The ``custom_op``'s result computed by the reference quantizer on CPU."""
    seed_cpu = seed.cpu() if seed is not None else None
    amax_cpu = amax.cpu() if amax is not None else None
    return [t.cpu() for t in torch.ops.fp4compile.quantize(x.cpu(), operand, seed_cpu, "", with_dequantized, amax_cpu)]


def _assert_parts_equal(got, expected):
    for i, (g, e) in enumerate(zip(got, expected)):
        g = g.cpu()
        assert g.dtype == e.dtype and g.shape == e.shape, (i, g.dtype, e.dtype, g.shape, e.shape)
        assert torch.equal(g.view(torch.uint8) if g.dtype.itemsize == 1 else g, e.view(torch.uint8) if e.dtype.itemsize == 1 else e), i


@pytest.mark.parametrize("operand", OPERANDS)
def test_quantize_op_eager_and_traced_equal_reference(operand):
    x = torch.randn(32, 64, device=DEVICE, dtype=torch.float32) * 3
    seed = torch.tensor(1234, dtype=torch.int64, device=DEVICE) if "stochastic" in operand else None
    expected = _reference_parts(x, operand, seed, True)
    _assert_parts_equal(torch.ops.fp4compile.quantize_triton(x, operand, seed, True), expected)
    if DEVICE == "cpu":
        return  # traced: the gpu tests

    def f(x, seed):
        return torch.ops.fp4compile.quantize_triton(x, operand, seed, True)

    traced = torch.compile(f, backend="aot_eager", fullgraph=True)(x, seed)
    _assert_parts_equal(traced, expected)


@pytest.mark.gpu
def test_traced_quantize_records_the_kernels_as_graph_nodes():
    """AOTAutograd's graph holds the kernels themselves (what Inductor launches from its code), not an opaque
    op that would run Python per call."""
    from torch._functorch.aot_autograd import aot_function
    from functorch.compile import make_boxed_func

    graphs = []

    def compiler(gm, _inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    x = torch.randn(16, 32, device=DEVICE)
    out = aot_function(lambda x: torch.ops.fp4compile.quantize_triton(x, OPERANDS[0], None, False)[0],
                       fw_compiler=compiler)(x)
    assert torch.equal(out.cpu(), _reference_parts(x, OPERANDS[0], None, False)[0])
    assert "triton_kernel_wrapper_functional" in graphs[0] and "fp4compile.quantize_triton" not in graphs[0]
    assert graphs[0].count("= torch.ops.higher_order.triton_kernel_wrapper_functional(") == 2  # amax, quantize


@pytest.mark.parametrize("hadamard", [False, True])
def test_amax_op_and_quantize_with_given_amax(hadamard):
    x_t = (torch.randn(48, 32, device=DEVICE) * 5).t()  # a (features, tokens) view, as fp4_linear passes it
    amax_fn = lambda t: torch.ops.fp4compile.amax_triton(t, hadamard)  # noqa: E731
    amaxes = (amax_fn if DEVICE == "cpu" else torch.compile(amax_fn, backend="aot_eager"))(x_t)
    assert torch.equal(amaxes.cpu(), torch.ops.fp4compile.amax(x_t.cpu(), hadamard))
    operand = "nvfp4|1x16|nearest|rht" if hadamard else "nvfp4|1x16|nearest|-"
    got = torch.ops.fp4compile.quantize_triton(x_t, operand, None, False, amaxes[0])
    _assert_parts_equal(got, _reference_parts(x_t, operand, None, False))


def test_dequantize_op_equals_reference_operand():
    x = torch.randn(32, 64, device=DEVICE)
    operand = OPERANDS[0]
    parts = torch.ops.fp4compile.quantize_triton(x, operand, None, True)
    deq_fn = lambda q, s, d: torch.ops.fp4compile.dequantize_triton(q, s, d, operand)  # noqa: E731
    deq = (deq_fn if DEVICE == "cpu" else torch.compile(deq_fn, backend="aot_eager"))(*parts[:3])
    assert torch.equal(deq.cpu(), parts[3].cpu())


NV = GemmPrecision(OperandPrecision("nvfp4", (1, 16)), OperandPrecision("nvfp4", (16, 16)))
MX = GemmPrecision(OperandPrecision("mxfp4", (1, 32)), OperandPrecision("mxfp4", (1, 32)))


def test_gemm_path_rule(monkeypatch):
    import fp4compile.codegen as codegen
    import fp4compile.codegen.gemm as cg

    monkeypatch.delenv("FP4COMPILE_GEMM_IN_GRAPH", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert gemm_path(HIGH, Role.FORWARD, (8192, 768, 768), cuda, False) == "high"
    assert gemm_path(NV, Role.FORWARD, (8192, 768, 768), cpu, False) == "reference"
    monkeypatch.setattr(codegen, "triton_available", lambda: True)
    monkeypatch.setattr(cg, "_sm90_or_newer", lambda index: True)
    monkeypatch.setattr(cg, "native_fp4_available", lambda index=0: False)
    assert gemm_path(MX, Role.FORWARD, (8192, 768, 768), cuda, False) == "reference"  # UE8M0 scales
    # Without CUDA graphs the forward and input-gradient shapes take the traced device-TMA GEMM where it can run,
    # else graph ops (no Python per call either way); with CUDA graphs the host-TMA GEMM on the op. The weight
    # gradient (K = tokens) stays on cuBLAS.
    monkeypatch.setenv("FP4COMPILE_TRACED_GEMM", "1")
    assert gemm_path(NV, Role.FORWARD, (8192, 2304, 768), cuda, False) == "triton_traced"
    assert gemm_path(NV, Role.INPUT_GRAD, (8192, 768, 2304), cuda, False) == "triton_traced"
    assert gemm_path(NV, Role.WEIGHT_GRAD, (2304, 768, 8192), cuda, False) == "graph_mm"
    assert gemm_path(NV, Role.FORWARD, (8192, 2300, 768), cuda, False) == "graph_mm"  # rows not 16-byte units
    monkeypatch.setenv("FP4COMPILE_TRACED_GEMM", "0")
    for shape in ((8192, 2304, 768), (8192, 768, 2304), (2304, 768, 8192)):
        assert gemm_path(NV, Role.FORWARD, shape, cuda, False) == "graph_mm"
    monkeypatch.delenv("FP4COMPILE_TRACED_GEMM")
    assert gemm_path(NV, Role.FORWARD, (8192, 2304, 768), cuda, True) == "triton_dequant"
    assert gemm_path(NV, Role.INPUT_GRAD, (8192, 768, 2304), cuda, True) == "triton_dequant"
    assert gemm_path(NV, Role.WEIGHT_GRAD, (2304, 768, 8192), cuda, True) == "graph_mm"
    assert gemm_path(NV, Role.FORWARD, (None, 2304, 768), cuda, True) == "graph_mm"  # symbolic tokens
    monkeypatch.setenv("FP4COMPILE_GEMM_IN_GRAPH", "0")
    assert gemm_path(NV, Role.WEIGHT_GRAD, (2304, 768, 8192), cuda, False) == "cublas_dequant"
    monkeypatch.setattr(cg, "native_fp4_available", lambda index=0: True)
    assert gemm_path(NV, Role.FORWARD, (8192, 2304, 768), cuda, False) == "native_fp4"


def test_gemm_paths_encode_decode():
    paths = GemmPaths("graph_mm", "triton_dequant", "high")
    assert GemmPaths.decode(paths.encode()) == paths
    with pytest.raises(ValueError, match="unknown GEMM path"):
        GemmPaths.decode("forward=fast;input_grad=high;weight_grad=high")


def test_table_and_fp4_linear_carry_the_paths():
    from tests.helpers import compiled_step, batch
    from tests.models import GPT

    _, _, be = compiled_step(GPT(n_layer=3), batch(), inner="aot_eager")
    rows = be.rows()
    quantized = [r for r in rows if r.precision != "high"]
    on_cuda = ("graph_mm", "triton_traced")  # the traced TMA GEMM where it can run (forward, input gradient)
    assert quantized and all(r.gemm_path in (("reference",) if DEVICE == "cpu" else on_cuda) for r in quantized)
    assert all(r.gemm_path == "high" for r in rows if r.precision == "high")
    code = dict(be.reports[0].pass_code)["rewrite_gemms"]
    assert "forward=reference;input_grad=reference;weight_grad=reference" in code or DEVICE != "cpu"
    from fp4compile.inspect.table import rows_to_markdown

    assert "| gemm path |" in rows_to_markdown(rows)


@pytest.mark.gpu
def test_inductor_launches_the_kernels_from_its_code():
    """Under Inductor the quantize and amax kernels appear in the generated code (forward and backward) and no
    ``fp4compile::quantize`` custom op is called."""
    from torch._inductor.utils import run_and_get_code
    from tests.helpers import batch
    from tests.models import GPT

    torch.manual_seed(0)
    model = GPT(vocab=256, d=256, n_layer=3, n_head=4, block_size=128).cuda()  # block 1 is quantized
    idx, tgt = (t.cuda() for t in batch(vocab=256, b=4, t=128))
    compiled = torch.compile(model, backend=fp4compile.Fp4Backend(inner="inductor"))
    loss, codes = run_and_get_code(lambda: compiled(idx, tgt).backward())
    joined = "\n".join(codes)
    assert "_quantize_kernel" in joined and "_amax_kernel" in joined and "_dequantize_kernel" in joined
    assert "torch.ops.fp4compile.quantize.default" not in joined

def test_access_analysis_is_memoized_for_own_kernels_only():
    """torch's per-launch analysis (which tensors a kernel writes) runs once per kernel configuration for
    fp4compile's kernels: same constexprs, scalars and tensor dtypes, same answer."""
    calls = []

    def analysis(kernel, kwargs, tma):
        calls.append(kernel)
        return {"writes": ["q_ptr"]}

    memoized = triton_ops._memoized(analysis)
    x16, x16b, x32 = (torch.empty(2, dtype=torch.bfloat16), torch.empty(3, dtype=torch.bfloat16),
                      torch.empty(2, dtype=torch.float32))
    own = cq._quantize_kernel
    assert memoized(own, {"x_ptr": x16, "R": 8, "HADAMARD": False}, {}) == {"writes": ["q_ptr"]}
    memoized(own, {"x_ptr": x16b, "R": 8, "HADAMARD": False}, {})  # another tensor, same dtype: cached
    assert len(calls) == 1
    # torch wraps a kernel launched with num_warps in a fresh one-config Autotuner per launch: same entry.
    for _ in range(2):
        wrapped = triton.autotune(configs=[triton.Config({}, num_warps=4)], key=[])(own)
        memoized(wrapped, {"x_ptr": x16, "R": 8, "HADAMARD": False}, {})
    assert len(calls) == 2
    memoized(own, {"x_ptr": x32, "R": 8, "HADAMARD": False}, {})
    memoized(own, {"x_ptr": x16, "R": 8, "HADAMARD": True}, {})
    memoized(own, {"x_ptr": x16, "R": 16, "HADAMARD": False}, {})
    assert len(calls) == 5

    def foreign(x):  # a kernel defined elsewhere goes through every time
        return x

    memoized(foreign, {"x_ptr": x16}, {})
    memoized(foreign, {"x_ptr": x16}, {})
    assert len(calls) == 7
