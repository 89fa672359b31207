#!/usr/bin/env bash
# The GPU check in one call, for a bare GPU machine (CUDA torch, nvcc; no internet):
#   builds arwkv in place for the GPU at hand, times each kernel of one forward and backward
#   (gpu_kernel_times.py), runs `bench_wkv.py --device cuda` (with flash-linear-attention when
#   importable: carry its wheel, fla-core, in .whl/), the GPU tests and the decode-launch check,
#   and writes every log and table to $OUT (default benchmarks/results/gpu). The order puts the
#   numbers first: a 15-minute device budget may end during the (long) test grid.
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl fla-core==0.6.0
#   bash benchmarks/gpu_check.sh            # everything
#   STAGES="build bench" bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
STAGES=${STAGES:-"build kernels bench tests decode"}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then  # wheels carried to a machine without internet
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/arwkv-site .whl/*.whl
  export PYTHONPATH=/tmp/arwkv-site
fi
export PYTHONPATH=$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'hip', torch.version.hip)"
  nvcc --version | tail -2
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

has() { [[ " $STAGES " == *" $1 "* ]]; }
status=0

if has build; then
  # The architecture of the GPU at hand only (the release default builds 8.0 and 9.0).
  arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  echo "== build for $arch"
  if ! TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} ARWKV_PTXAS_VERBOSE=1 MAX_JOBS=${MAX_JOBS:-16} \
      $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
    tail -60 "$OUT/build.log"; exit 1
  fi
  $PY tools/ptxas_table.py "$OUT/build.log" --out "$OUT/ptxas.txt" | tail -3
fi

if has kernels; then
  echo "== time per kernel (forward, backward)"
  timeout ${KERNELS_TIMEOUT:-120} $PY benchmarks/gpu_kernel_times.py > "$OUT/kernel-times.txt" 2>&1 || status=1
  grep -v USDT "$OUT/kernel-times.txt"
fi

if has bench; then
  echo "== benchmark"
  timeout ${BENCH_TIMEOUT:-300} $PY benchmarks/bench_wkv.py --device cuda --json "$OUT/bench.json" \
    > "$OUT/bench.txt" 2>&1 || status=1
  cat "$OUT/bench.txt"
fi

if has tests; then
  echo "== GPU tests"
  # the GPU grid, and the device-parametrised long-sequence and decode tests of test_ops.py
  timeout ${TEST_TIMEOUT:-240} $PY -m pytest -q -p no:cacheprovider -n ${TEST_WORKERS:-8} tests/test_gpu.py tests/test_ops.py -k "test_gpu or cuda" \
    > "$OUT/tests.log" 2>&1 || status=1
  tail -25 "$OUT/tests.log"
fi

if has decode; then
  echo "== decoding: launches and time per call"
  timeout 120 $PY - > "$OUT/decode.txt" 2>&1 <<'PYEOF' || status=1
import time, torch, arwkv_ext
from arwkv_ext.testing import make_inputs
for op, fn in (("wkv7", arwkv_ext.wkv7), ("wkv6", arwkv_ext.wkv6)):
    for B, H, N in ((1, 32, 64), (8, 64, 64), (1, 32, 128)):
        xs = make_inputs(op, B, 1, H, N, dtype=torch.bfloat16, device="cuda")
        state = torch.zeros(B, H, N, N, device="cuda")
        for _ in range(10):
            fn(*xs, state)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn(*xs, state)
            torch.cuda.synchronize()
        kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        n = 2000
        t0 = time.perf_counter()
        for _ in range(n):
            y, state = fn(*xs, state)
        torch.cuda.synchronize()
        us = (time.perf_counter() - t0) / n * 1e6
        print(f"{op} T=1 B={B} H={H} N={N}: {len(kernels)} kernel launch(es) {kernels}; {us:.1f} us per call")
PYEOF
  cat "$OUT/decode.txt"
fi
exit $status
