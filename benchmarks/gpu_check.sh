#!/usr/bin/env bash
# One GPU check of the plain-backend speed work, in priority order within a time budget:
#   1. versions, and whether the traced device-TMA GEMM path is available here;
#   2. the GPU tests of what changed (graph amaxes under Inductor on CUDA, the dense and traced TMA GEMMs, the
#      GEMM path rule, the quantize kernels, the compiled step against the reference);
#   3. the GEMM table at the d=2048 GPT block's shapes (benchmarks/bench_gemm_shapes.py);
#   4. training steps, the four like-for-like modes (fp4 vs inductor-bf16, fp4 with CUDA graphs vs bf16
#      reduce-overhead), device memory from mem_get_info: gpt-d2048 (16 layers), gpt2-small, small.
# Each stage runs under the time left (a stage cut short keeps what it wrote: the training benchmark writes its
# JSON after every mode); stages that no longer fit are reported as skipped. Logs and JSON go to $OUT; a compact
# summary is printed last (benchmarks/gpu_check_summary.py).
#
#   OUT=/tmp/out PYTHONPATH=. bash benchmarks/gpu_check.sh            # budget 420 s
#   BUDGET=560 STAGES="train_gpt2 train_small" bash benchmarks/gpu_check.sh   # a subset, another budget
set -u
export PYTHONPATH=${PYTHONPATH:-.}
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
BUDGET=${BUDGET:-420}
STAGES=${STAGES:-"info tests gemm train_d2048 train_gpt2 train_small"}
PY=${PYTHON:-$(command -v python || command -v python3)}
# Each pair whole before the next: the plain pair (the question of these changes) first, then CUDA graphs.
PAIRS="--modes inductor-bf16 fp4 inductor-bf16-cudagraphs fp4-cudagraphs"
START=$(date +%s)
: > "$OUT/stages.txt"

run_stage() {  # name, longest it may take (s), command...
  local name=$1 max=$2 left t rc began
  shift 2
  case " $STAGES " in *" $name "*) ;; *) return ;; esac
  left=$((BUDGET - ($(date +%s) - START)))
  t=$((left < max ? left : max))
  if [ "$t" -lt 30 ]; then
    echo "$name skipped: ${left}s of the budget left" | tee -a "$OUT/stages.txt"
    return
  fi
  began=$(date +%s)
  echo "== $name (up to ${t}s)"
  timeout -k 10 "$t" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - began ))s$([ $rc -eq 124 ] && echo ' (cut at its time limit)')" | tee -a "$OUT/stages.txt"
  tail -n 3 "$OUT/$name.log"
}

run_stage info 60 $PY -c "
import torch, triton
from fp4compile.codegen.gemm_device_tma import traced_gemm_available, _inductor_sets_allocator
print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())
print('inductor sets the Triton allocator per launch:', _inductor_sets_allocator())
print('traced device-TMA GEMM available:', traced_gemm_available('cuda'))
"
# Most telling first: the traced GEMM against the eager kernel's bits (forward and backward thread), the graph
# amaxes under Inductor on CUDA against the reference's bits, the compiled step against the reference, then the
# kernel tests of the quantize and op files.
run_stage tests 170 bash -c "
$PY -m pytest -q -x -m gpu tests/test_codegen_gemm.py -k 'dense or traced or device' ;
$PY -m pytest -q -x tests/test_graph_amax.py ;
$PY -m pytest -q -x -m gpu tests/test_backend_gpu.py -k statistically ;
$PY -m pytest -q -x -m gpu tests/test_triton_ops.py tests/test_codegen_quantize.py"
run_stage gemm 110 $PY benchmarks/bench_gemm_shapes.py --d 2048 --tokens 8192 --rep 60
run_stage train_d2048 200 $PY benchmarks/bench_train_step.py --models gpt-d2048 --steps 8 --warmup 3 $PAIRS \
  --json "$OUT/train_d2048.json"
run_stage train_gpt2 170 $PY benchmarks/bench_train_step.py --models gpt2-small --steps 10 --warmup 3 $PAIRS \
  --json "$OUT/train_gpt2.json"
run_stage train_small 90 $PY benchmarks/bench_train_step.py --models small --steps 10 --warmup 3 $PAIRS \
  --json "$OUT/train_small.json"

echo
$PY benchmarks/gpu_check_summary.py "$OUT"
echo "total $(( $(date +%s) - START ))s of a ${BUDGET}s budget; logs in $OUT"
