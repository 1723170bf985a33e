#!/usr/bin/env bash
# Every GPU check and benchmark in one call (device time is scarce): bf16 kernel tests, then the benchmarks,
# results under ${OUT:-benchmarks/results}. Usage from the repository root on a CUDA machine:
#   bash benchmarks/run_gpu.sh [quick]
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
mkdir -p "$out"
python3 -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu_tests.log" | tail -3
if [ "${1:-}" = quick ]; then
  python3 benchmarks/attention_profile.py --cells table --out "$out"   # default variant, kernels and host time
  python3 benchmarks/rmsnorm_sweep.py --mixed --widths 768 --kinds fwd,bwd,reduce --out "$out"  # the model's case
  python3 benchmarks/bench_model.py --impls fat5-trainer,fat5-graph,hf --shapes 0,3 --steps 5 --profile \
    --out "$out" --tag=_quick
else
  python3 benchmarks/attention_profile.py --out "$out"   # per-kernel device time and host time per call
  python3 benchmarks/bench_attention.py --out "$out"
  python3 benchmarks/bench_kernels.py --out "$out"
  python3 benchmarks/bench_model.py --out "$out"
  python3 benchmarks/bench_generate.py --out "$out"
  python3 benchmarks/convergence.py --out "$out"
fi
