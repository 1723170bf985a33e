#!/usr/bin/env bash
# Every GPU check and benchmark in one call (device time is scarce): bf16 kernel tests, then the benchmarks,
# results under ${OUT:-benchmarks/results}. Usage from the repository root on a CUDA machine:
#   bash benchmarks/run_gpu.sh [quick | step | kernels | rmsnorm | docpass | skews | fold | attention | probes | verify | strided | prefetch | stepsweep | rmstargets]
# On a copied checkout whose git metadata may be stale, set FAT5_COMMIT to the commit the reports should name.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
mkdir -p "$out"
if [ "${1:-}" = step ]; then
  # the training step alone: its GPU tests (no host sync, device-side skips, the fused optimizer), the step at
  # 512/114 for the pretrain step, the graph-replayed model and transformers, then the convergence check
  FAT5_ATTN_AUTOTUNE=0 python3 -m pytest -q -m gpu tests/test_train.py tests/test_optim.py -rf --tb=short 2>&1 |
    tee "$out/gpu_tests_step.log" | tail -5
  python3 benchmarks/bench_model.py --impls fat5-trainer,fat5-graph,hf --shapes 0 --steps 5 --out "$out" --tag=_step
  python3 benchmarks/convergence.py --out "$out"
elif [ "${1:-}" = skews ]; then
  # the dk/dv near tiles' table-gradient skews (CIRC_SKEW): the rotated one's GPU tests (bitwise-level agreement
  # of the default, 3, with 2 on every dk/dv config, then the table-gradient and dk/dv-config tests under 2), then the
  # skews against each other and SDPA at L = 1024 and 4096, causal and not (and the forward's TMA near steps)
  FAT5_ATTN_AUTOTUNE=0 python3 -m pytest -q -m gpu tests/ops/test_attention_triton.py -k "rotated" -rf \
    --tb=short 2>&1 | tee "$out/gpu_tests_skews.log" | tail -3
  FAT5_ATTN_CIRC_SKEW=2 FAT5_ATTN_AUTOTUNE=0 python3 -m pytest -q -m gpu tests/ops/test_attention_triton.py \
    -k "table_grad or every_dkv" -rf --tb=short 2>&1 | tee -a "$out/gpu_tests_skews.log" | tail -3
  python3 benchmarks/bench_attention.py --lengths 1024,4096 --d128-lengths "" --flex-lengths "" --no-packed \
    --methods sdpa,ours,ours_defer,ours_circ,ours_tma64 --rep 30 --out "$out" --tag=_skews
elif [ "${1:-}" = fold ]; then
  # the scale and constant bias folded into the exponent (FOLD_SCALE): the targets' cells with it and without,
  # then the GPU tests its code paths reach (every forward, dq and dk/dv config, the bf16 reference cases)
  python3 benchmarks/bench_attention.py --quick --methods sdpa,ours,ours_nofold --out "$out" --tag=_fold
  FAT5_ATTN_AUTOTUNE=0 timeout 330 python3 -m pytest -q -m gpu tests/ops/test_attention_triton.py \
    -k "every_fwd or matches_reference_gpu or (every_dkv and bidir)" -rf --tb=short 2>&1 |
    tee "$out/gpu_tests_fold.log" | tail -5
elif [ "${1:-}" = attention ]; then
  # the attention benchmark's whole setting (every length 512-16384, causal and not, the head-dim-128 rows, the packed
  # rows): SDPA without bias, SDPA with the materialised bias, FlexAttention (its table at every distance, and cut at
  # +-max distance as the reports before 2026-12-06 ran it) and ours in one process; the rows are logged as they
  # go, so a cut run keeps what it measured
  # (ROUNDS=3 times every cell three times, interleaved, and reports the medians: about three times as long)
  python3 benchmarks/bench_attention.py --methods sdpa,sdpa_bias,flex,flex_clamped,ours --flex-lengths 1024,4096 --out "$out" \
    --rounds "${ROUNDS:-1}" --tag=_full 2>&1 |
    tee "$out/attention_full.log" | tail -30
elif [ "${1:-}" = verify ]; then
  # what the open targets still need from an H200, in one call (about 6 minutes): the RMSNorm targets' report
  # against torch eager and torch.compile (with the prefetch, strided and reduce-release rows), RMSNorm's parts (the
  # autograd step, the direct pair, the pair with the forward's output kept alive), then the attention's
  # head-dim-64 rows at every length against SDPA
  python3 benchmarks/bench_kernels.py --ops rms_norm --out "$out"
  python3 benchmarks/rmsnorm_sweep.py --kinds parts --widths 512,1024 --out "$out" --tag _verify
  python3 benchmarks/bench_attention.py --lengths 1024,2048,4096,8192,16384 --d128-lengths "" --flex-lengths "" \
    --no-packed --methods sdpa,ours --out "$out" --tag=_verify 2>&1 | tail -14
elif [ "${1:-}" = rmstargets ]; then
  # the RMSNorm targets alone (the shipped kernels, eager, torch.compile, the copy + add bound; about 2 minutes)
  python3 benchmarks/bench_kernels.py --ops rms_norm --rms-options "triton no PDL;triton no reduce release;triton band" \
    --out "$out" 2>&1 | tail -40
elif [ "${1:-}" = stepsweep ]; then
  # the RMSNorm report (the shipped tiles against torch eager and torch.compile, with the option rows), then the
  # backward's tiles timed inside the autograd step (forward, backward, dweight sum) at d 512 and 1024: three
  # programs per SM (the backward capped at 168 registers, bands of whole tiles rather than powers of two), two
  # and four, and tiles read by tensor descriptors (TUNE["tma"]; no L2 prefetch on that path); every row in
  # stepsweep.log as it is timed
  python3 benchmarks/bench_kernels.py --ops rms_norm --out "$out" 2>&1 | tail -60
  sweep() { python3 benchmarks/rmsnorm_sweep.py --kinds step --widths 512,1024 --warps 4 --prefetch 2 \
    --out "$out" "$@" 2>&1 | tee -a "$out/stepsweep.log" | grep -v '"kind": "step"'; }
  sweep --base '{"even_bands": true, "maxnreg": 168}' --stages 2,3,4 --per-sm 3 --block-m 4,8 --tag _step_3sm
  FAT5_ATTN_AUTOTUNE=0 python3 -m pytest -q -m gpu tests/ops/test_rmsnorm_triton.py \
    -k "three_programs or l2_prefetch" -rf --tb=short 2>&1 | tee "$out/gpu_tests_stepsweep.log" | tail -3
  sweep --stages 2,3,4 --per-sm 2,4 --block-m 4,8,16 --tag _step
  sweep --tma --stages 3,4 --per-sm 2 --block-m 4,8 --tag _step_tma
elif [ "${1:-}" = prefetch ]; then
  # the RMSNorm backward's L2 prefetch before its PDL wait (TUNE["prefetch"], default 2 tiles) against none, 1 and 3,
  # and the dweight sum releasing the next kernel early (TUNE["reduce_release"]): the RMSNorm report with those rows,
  # then the RMSNorm GPU tests (the default changed: all of them)
  python3 benchmarks/bench_kernels.py --ops rms_norm --out "$out" 2>&1 | tail -48
  FAT5_ATTN_AUTOTUNE=0 python3 -m pytest -q -m gpu tests/ops/test_rmsnorm_triton.py -rf --tb=short 2>&1 |
    tee "$out/gpu_tests_prefetch.log" | tail -3
elif [ "${1:-}" = strided ]; then
  # the RMSNorm backward's programs on every nprog-th tile (TUNE["strided"]) against their bands of rows: its GPU
  # tests, each kernel and the autograd step in both layouts, a tile sweep of both layouts, then the targets'
  # report (with strided rows per width)
  FAT5_ATTN_AUTOTUNE=0 python3 -m pytest -q -m gpu tests/ops/test_rmsnorm_triton.py -k "strided or gpu" -rf \
    --tb=short 2>&1 | tee "$out/gpu_tests_strided.log" | tail -3
  python3 benchmarks/rmsnorm_sweep.py --kinds parts,bwd --layouts band,strided --widths 512,768,1024,4096 \
    --stages 3 --per-sm 2,4 --block-m 4,8 --warps 4 --out "$out" --tag _strided
  python3 benchmarks/bench_kernels.py --ops rms_norm --out "$out"
elif [ "${1:-}" = probes ]; then
  # short probes (a few minutes): RMSNorm's fwd+bwd pair against its autograd step, with and without programmatic
  # dependent launches, and the pair with the forward's output kept alive through the backward as autograd keeps it
  # (is the pair's lead an L2 artifact of dx reusing y's freed memory?), then forward configs around the
  # L = 1024 picks (pipeline depths of the 64-key near-step config; the capped 64x64 one), pinned, SDPA alongside
  python3 benchmarks/rmsnorm_sweep.py --kinds parts --widths 512,1024 --out "$out" --tag _pdlgap
  python3 benchmarks/attention_near_sweep.py --kernels fwd --lengths 1024 --causal-lengths 1024 --nears 32 \
    --only-extra --extra-fwd 128x64w8s3r128n64,128x64w8s4r128n64,128x64w8s2r128n64,64x64w4s3r128,64x64w4s4r128 \
    --out "$out" --tag _stages
elif [ "${1:-}" = docpass ]; then
  # packed documents alone: the segment cases' GPU tests (the document pass with mixed blocks, every dk/dv
  # config), then the packed rows with the document pass against the single masked launch (ours_nodoc)
  FAT5_ATTN_AUTOTUNE=0 python3 -m pytest -q -m gpu tests/ops/test_attention_triton.py \
    -k "seg or document or every_dkv" -rf --tb=short 2>&1 | tee "$out/gpu_tests_docpass.log" | tail -5
  python3 benchmarks/bench_attention.py --lengths 1024,4096 --d128-lengths "" --flex-lengths "" \
    --methods sdpa,ours,ours_nodoc --rep 20 --warmup 5 --out "$out" --tag=_docpass
elif [ "${1:-}" = kernels ]; then
  # the attention and RMSNorm targets alone (a few minutes): attention against SDPA, with the fp32 bias table and
  # without any bias for comparison (the autotuner's picks go into the JSON), the kernels at the model's shapes,
  # RMSNorm with its copy + add bound row
  FAT5_ATTN_AUTOTUNE=0 python3 -m pytest -q -m gpu tests/ops/test_rmsnorm_triton.py tests/ops/test_launch.py \
    -rf --tb=short 2>&1 | tee "$out/gpu_tests_kernels.log" | tail -3
  python3 benchmarks/bench_attention.py --quick --methods sdpa,ours,ours_fp32table,ours_nobias --out "$out" \
    --tag=_kernels
  python3 benchmarks/attention_profile.py --cells model --out "$out"
  python3 benchmarks/bench_kernels.py --ops rms_norm,model --out "$out"
elif [ "${1:-}" = rmsnorm ]; then
  # RMSNorm alone: its GPU tests, the CUDA graph of a fwd+bwd through autograd against the direct op pair, the
  # row-chunk layouts swept against the default one, then the targets' report
  FAT5_ATTN_AUTOTUNE=0 python3 -m pytest -q -m gpu tests/ops/test_rmsnorm_triton.py -rf --tb=short 2>&1 |
    tee "$out/gpu_tests_rmsnorm.log" | tail -3
  python3 benchmarks/rmsnorm_graph.py --out "$out"
  python3 benchmarks/rmsnorm_sweep.py --kinds default,parts,fwd,bwd,reduce --chunks 0,128,256 --stages 3 --per-sm 2,3 \
    --block-m 4,8 --warps 4 --out "$out" --tag _chunks
  python3 benchmarks/bench_kernels.py --ops rms_norm --out "$out"
elif [ "${1:-}" = quick ]; then
  # shorter: GPU tests with the first config of each attention kernel (autotuning compiles every config per
  # case, ~11 s a test on the H200), the default variant's decode cases autotuned, then the model's shapes
  FAT5_ATTN_AUTOTUNE=0 python3 -m pytest -q -m gpu tests -rf --tb=short 2>&1 | tee "$out/gpu_tests.log" | tail -5
  python3 -m pytest -q -m gpu tests/ops/test_attention_triton.py -k "table and decode" -rf 2>&1 | tail -3
  python3 benchmarks/attention_profile.py --cells model --out "$out"   # the three attentions of 512/114, per kernel
  python3 benchmarks/bench_model.py --impls fat5-trainer,fat5-graph,hf --shapes 0 --steps 5 --profile \
    --out "$out" --tag=_quick
else
  python3 -m pytest -q -m gpu tests -rf 2>&1 | tee "$out/gpu_tests.log" | tail -5
  python3 benchmarks/attention_profile.py --out "$out"   # per-kernel device time and host time per call
  python3 benchmarks/host_time_gpu.py --out "$out"       # host time per call, memoised launches on and off
  python3 benchmarks/bench_attention.py --out "$out"
  python3 benchmarks/bench_kernels.py --out "$out"
  python3 benchmarks/bench_model.py --out "$out"
  python3 benchmarks/bench_generate.py --out "$out"
  python3 benchmarks/convergence.py --out "$out"
fi
