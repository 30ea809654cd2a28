#!/bin/bash
# One device call: kernel tests, the GEMV sweep and table, the AOTI investigation, the model bench (#27); the GPU
# tests of the whole suite, the serving figures of random-weight shapes and the decode attention's (#25); the
# compiled speculative pair (#28).
# Usage (on the GPU machine, from the repository root): bash benchmarks/gpu_session.sh STAGES OUT
# STAGES: comma-separated of tests,gputests,spectests,sweep,gemv,aoti,bench,serve,attn,spec
# (GPUTESTS_K: a pytest -k expression for gputests; SERVE_SHAPES, SERVE_COMPILE and *_END: see their stages)
set -u
STAGES=$1; OUT=$2
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT
has() { [[ ",$STAGES," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > $OUT/gpu.txt 2>&1
if has tests; then
  timeout 100 python3 -m pytest -q tests/test_kernels.py -x 2>&1 | tail -30 > $OUT/tests.log
  tail -5 $OUT/tests.log
fi
if has gputests; then  # the model, kernels and serving on the GPU (the prefill compiles six one-layer graphs)
  timeout $((${GPUTESTS_END:-500} - SECONDS)) python3 -m pytest -q -rs --durations=8 tests/test_gpu.py ${GPUTESTS_K:+-k "$GPUTESTS_K"} \
    2>&1 | tail -30 > $OUT/gputests.log
  tail -8 $OUT/gputests.log
fi
if has spectests; then  # speculative decoding on the GPU, eager and compiled (~200 s)
  timeout 400 python3 -m pytest -q -rs --durations=3 tests/test_speculative.py -k "gpu" 2>&1 | tail -20 \
    > $OUT/spectests.log
  tail -5 $OUT/spectests.log
fi
if has sweep; then
  timeout 200 python3 benchmarks/gemv_bench.py --shape llama-2-7b --sweep --out $OUT/sweep.jsonl \
    --write-tuned llmkit/kernel_configs.json > $OUT/sweep.log 2>&1
  grep -E "best|TUNED" $OUT/sweep.log; cp llmkit/kernel_configs.json $OUT/
fi
if has gemv; then
  timeout 150 python3 benchmarks/gemv_bench.py --shape llama-2-7b --out $OUT/gemv.jsonl > $OUT/gemv.log 2>&1
  grep -E "^\||FIT|copy" $OUT/gemv.log
fi
if has aoti; then
  {
  python3 benchmarks/aoti_cuda_repro.py compile /tmp/linear.pt2; echo "exit $?"
  python3 -X faulthandler benchmarks/aoti_cuda_repro.py load /tmp/linear.pt2; echo "exit $?"
  timeout 90 cuda-gdb -batch -ex run -ex bt -ex "x/4i \$pc" --args python3 benchmarks/aoti_cuda_repro.py load \
    /tmp/linear.pt2 2>&1 | grep -v "^\[New Thread\|^\[Thread\|^warning" | tail -45
  python3 benchmarks/aoti_cuda_repro.py cpp-only /tmp/linear_src.pt2; echo "exit $?"
  python3 -c "import zipfile; print(*zipfile.ZipFile('/tmp/linear_src.pt2').namelist()[:20], sep='\n')"
  } > $OUT/aoti.log 2>&1
  grep -E "^exit|load:|compile:|#[0-9]|File|SIGSEGV|Fatal" $OUT/aoti.log | head -40
fi
if has bench; then
  timeout $((${BENCH_END:-570} - SECONDS)) python3 -m llmkit bench --shape llama-2-7b --device cuda --dtype bfloat16 --quantize none int8wo \
    ${BENCH_SCHEMES:-int4wo-128} --path compile --repeats 3 \
    --out $OUT/bench.jsonl > $OUT/bench.log 2>&1
  grep "^|" $OUT/bench.log
fi
if has serve; then  # SERVE_SHAPES, SERVE_COMPILE="--compile" or empty
  for shape in ${SERVE_SHAPES:-llama-3.2-1b}; do
    timeout $((${SERVE_END:-570} - SECONDS)) python3 benchmarks/serve_shapes.py --shape $shape ${SERVE_COMPILE---compile} \
      --max-batch-size 16 --concurrency 1 2 4 8 16 --max-tokens 64 --out $OUT/serve-$shape.jsonl \
      --server-log $OUT/server-$shape.log \
      > $OUT/serve-$shape.log 2>&1
    tail -8 $OUT/serve-$shape.log; tail -3 $OUT/server-$shape.log
  done
fi
if has attn; then  # one layer's decode attention by batch and cache window (#25)
  for shape in llama-2-7b llama-3.2-1b; do
    timeout 150 python3 benchmarks/decode_attention.py --shape $shape --batch-sizes 1 4 16 --windows 256 1024 \
      --out $OUT/attention.jsonl 2>&1 | grep "^B="
  done
fi
if has spec; then  # the compiled speculative pair, k = 4 (#28): training the target takes ~100 s
  timeout $((${SPEC_END:-570} - SECONDS)) python3 benchmarks/speculative_gpu.py --dim 2048 --layers 24 --steps 300 \
    --path compile --speculate-k 4 --out $OUT/speculative.jsonl > $OUT/speculative.log 2>&1
  grep "^|\|target:" $OUT/speculative.log
fi
