#!/usr/bin/env bash
# One call on the lent GPU machine (see README "Performance"): install this checkout without
# dependencies (the image has them), compile torch's bytecode (the image ships none), run the CUDA
# tests (GPU workers alone and with CPU helpers), then the ceiling bench. Results under $OUT.
set -u
unset PYTHONDONTWRITEBYTECODE
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
site=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')
python3 -m compileall -q -j 16 "$site" > /dev/null 2>&1
nproc; nvidia-smi --query-gpu=name --format=csv,noheader; python3 -c 'import torch; print(torch.__version__)'
if [ "${TESTS:-1}" = 1 ]; then
  timeout 200 python3 -m pytest -q -x -m cuda tests -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/cuda_tests.log"
  MXCONV_CPU_HELPERS=0 timeout 150 python3 -m pytest -q -x -m cuda tests -p no:cacheprovider 2>&1 | tail -4 | tee -a "$OUT/cuda_tests.log"
fi
if [ "${BENCH:-1}" = 1 ]; then
  # LAYERS=16: FP8 about 15 GB and BF16 about 30 GB, the sources (LAYERS=10 gives 9.7 / 18.7
  # GB; the sources sit on the 64 GB disk, in the page cache, and the outputs on tmpfs). Both
  # precisions with every variant take longer than one 10-minute call: PRECISIONS=fp8, then bf16.
  # Output shards of 2 GB: a 15-30 GB source then has 8-15 of them, like a real checkpoint's window.
  timeout "${BENCH_TIMEOUT:-560}" python3 scripts/bench.py --ceiling --layers "${LAYERS:-16}" \
    --precisions "${PRECISIONS:-fp8,bf16}" --workers "${WORKERS:-4,8,16}" --gpu-workers 1,2 \
    --repeats "${REPEATS:-1}" --max-shard-size "${SHARD:-2GB}" \
    --variants "${VARIANTS:-oneproc:MXCONV_PROCESSES=1;nohash:--no-source-hash;readcopy:MXCONV_MAPPED_READS=0;pinned@cuda:MXCONV_PINNED=1}" \
    ${BENCH_ARGS:-} --json "$OUT/ceiling.json" 2>&1 | tee "$OUT/ceiling.log" | tail -60
fi
