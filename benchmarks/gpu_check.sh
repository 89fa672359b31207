#!/usr/bin/env bash
# The GPU check in one call, for a bare GPU machine (CUDA torch, nvcc; no internet). Stages, in
# this order (the quick, most wanted numbers first, the slow end-to-end runs last):
#   machine   GPU, driver, torch, nvcc                              -> machine.txt (always runs)
#   build     arwkv in place for the GPU at hand; ptxas table       -> build.log, ptxas.txt
#   selftest  torch.ops.arwkv.gpu_tile_selftest(): the tensor-core fragment layouts on the device
#                                                                   -> selftest.txt
#   kernels   device time of each kernel of one forward and backward, step and chunked
#             algorithms (gpu_kernel_times.py)                      -> kernel-times.txt
#   bench     bench_wkv.py --device cuda, arwkv alone (step and chunked, ARWKV_GPU_ALGORITHM);
#             then, when flash-linear-attention is
#             importable (carry its wheel, fla-core, in .whl/), fla's kernels compiled and
#             autotuned in an untimed warm-up, and the headline shape timed against them
#                                                                   -> bench.*, fla-warmup.txt, bench-fla.*
#   tests     the GPU test grid and the device-parametrised tests, the chunked kernels' cases
#             first (never run on a GPU before), then the rest        -> tests.log
#   decode    launches and time per call of a T = 1 step            -> decode.txt
#   demo      `arwkv demo --device cuda` with its defaults          -> demo.log, demo/report.*
#   distill   2 steps each of `arwkv distill` stages 1 and 2 on a tiny teacher built here (bf16
#             autocast), stage 2 on a hybrid, then eval (gpu_distill_check.py) -> distill.log, distill/
# Every stage writes into $OUT (default benchmarks/results/gpu) as it runs, and appends its
# outcome (ok, FAILED, TIMED OUT, SKIPPED; seconds) to $OUT/summary.txt when it ends, so a run
# cut short keeps everything that finished and says where it stopped.
#
# Time: each stage has its own limit (seconds, an environment variable each); the defaults sum
# to 12 minutes on an H100, and GPU_CHECK_BUDGET (default 720) caps the whole run: a stage gets
# at most what is left of it, and none starts with less than 10 s left.
#   MACHINE_TIMEOUT 20 | BUILD_TIMEOUT 180 | SELFTEST_TIMEOUT 30 | KERNELS_TIMEOUT 60 |
#   BENCH_TIMEOUT 180 | TEST_TIMEOUT 100 | DECODE_TIMEOUT 30 | DEMO_TIMEOUT 80 | DISTILL_TIMEOUT 40
#   = 720 s
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl fla-core==0.6.0
#   bash benchmarks/gpu_check.sh                              # everything
#   STAGES="build selftest bench" bash benchmarks/gpu_check.sh
# Other settings: PYTHON, TORCH_CUDA_ARCH_LIST, MAX_JOBS, TEST_WORKERS, FLA_SHAPES (bench's shapes
# against fla, default "8,4096,64,64;1,32768,32,128": the two targets), DEMO_DEVICE / DEMO_ARGS, DISTILL_DEVICE / DISTILL_ARGS, WORK
# (the demo's and distillation's models and checkpoints, kept out of $OUT). A dry run of the
# last two stages on a CPU: STAGES="demo distill" DEMO_DEVICE=cpu DEMO_ARGS=--quick DISTILL_DEVICE=cpu.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-benchmarks/results/gpu}
STAGES=${STAGES:-"build selftest kernels bench tests decode demo distill"}
PY=${PYTHON:-python3}
WORK=${WORK:-${TMPDIR:-/tmp}/arwkv-gpu-check}
BUDGET=${GPU_CHECK_BUDGET:-720}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
DEADLINE=$((SECONDS + BUDGET))
SUMMARY="$OUT/summary.txt"
printf '%-9s %-32s %8s %6s\n' stage outcome seconds limit > "$SUMMARY"

if ls .whl/*.whl >/dev/null 2>&1; then  # wheels carried to a machine without internet
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/arwkv-site .whl/*.whl
  export PYTHONPATH=/tmp/arwkv-site
fi
export PYTHONPATH=$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}

has() { [[ " $STAGES " == *" $1 "* ]]; }
status=0

# limit_for DEFAULT: the stage's limit, cut to what is left of GPU_CHECK_BUDGET
limit_for() {
  local left=$((DEADLINE - SECONDS))
  echo $(($1 < left ? $1 : left))
}

# record STAGE RC START LIMIT [OUTCOME]: one line in summary.txt; a failure or timeout makes the
# script's exit status 1
record() {
  local stage=$1 rc=$2 start=$3 limit=$4 outcome=${5:-}
  if [[ -z $outcome ]]; then
    case $rc in
      0) outcome=ok ;;
      124 | 137) outcome="TIMED OUT (limit)"; status=1 ;;
      *) outcome="FAILED (exit $rc)"; status=1 ;;
    esac
  fi
  printf '%-9s %-32s %8d %6s\n' "$stage" "$outcome" $((SECONDS - start)) "$limit" >> "$SUMMARY"
  echo "== $stage: $outcome after $((SECONDS - start)) s"
}

# limited LIMIT LOG CMD...: CMD under `timeout` (its whole process group; KILL 10 s after TERM),
# its output appended to LOG as it comes and shown; returns CMD's exit status (124: timed out)
limited() {
  local limit=$1 log=$2
  shift 2
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
  return "${PIPESTATUS[0]}"
}

# begin STAGE DEFAULT_LIMIT: sets LIMIT and START; returns 1 (stage skipped, recorded) when the
# budget is spent
begin() {
  START=$SECONDS
  LIMIT=$(limit_for "$2")
  if ((DEADLINE - SECONDS < 10)); then
    record "$1" 0 "$START" "$2" "SKIPPED (budget spent)"
    status=1  # the check is incomplete
    return 1
  fi
  echo "== $1 (limit $LIMIT s)"
}

# ---- machine: what ran where (always; each probe bounded, a missing tool is noted, not fatal)
START=$SECONDS
LIMIT=$(limit_for "${MACHINE_TIMEOUT:-20}")
probe=$((LIMIT / 3 > 1 ? LIMIT / 3 : 1))  # each of the three probes
{
  date -u +%FT%TZ
  timeout "$probe" nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
    || echo "nvidia-smi: not available"
  timeout "$probe" "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'hip', torch.version.hip, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  timeout "$probe" nvcc --version | tail -2
  echo "stages: $STAGES; budget ${BUDGET} s"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
record machine 0 "$START" "$LIMIT" ok

# ---- build: the architecture of the GPU at hand only (the release default builds 8.0 and 9.0)
if has build && begin build "${BUILD_TIMEOUT:-180}"; then
  arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  echo "building for $arch (build.log)"
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} ARWKV_PTXAS_VERBOSE=1 MAX_JOBS=${MAX_JOBS:-16} \
    timeout -k 10 "$LIMIT" "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  rc=$?
  record build $rc "$START" "$LIMIT"
  if ((rc != 0)); then  # every later stage needs the extension
    tail -60 "$OUT/build.log"
    echo "build failed: no later stage can run" | tee -a "$SUMMARY"
    exit 1
  fi
  "$PY" tools/ptxas_table.py "$OUT/build.log" --out "$OUT/ptxas.txt" | tail -3
fi

# ---- selftest: the tensor-core fragment layouts, checked on the device by the extension itself;
# it reports "bf16 ok, f16 ok", or for a type the first wrong element (then: FAILED).
# Exit status 3: this build has no gpu_tile_selftest (older kernels); recorded, not a failure.
if has selftest && begin selftest "${SELFTEST_TIMEOUT:-30}"; then
  : > "$OUT/selftest.txt"
  limited "$LIMIT" "$OUT/selftest.txt" "$PY" -c '
import re, sys
import torch
import arwkv_ext
selftest = getattr(torch.ops.arwkv, "gpu_tile_selftest", None)
if selftest is None:
    print("selftest: this build has no torch.ops.arwkv.gpu_tile_selftest (older kernels): not run")
    sys.exit(3)
try:
    report = selftest()
except RuntimeError as err:  # e.g. a build without GPU kernels, or a launch error
    print(f"selftest: {err}")
    sys.exit(1)
print(f"selftest: {report}")
sys.exit(0 if re.fullmatch(r"\w+ ok(, \w+ ok)*", report) else 1)
'
  rc=$?
  if ((rc == 3)); then record selftest 0 "$START" "$LIMIT" "MISSING (no gpu_tile_selftest)"
  else record selftest $rc "$START" "$LIMIT"; fi
fi

# ---- kernels: device time per kernel of one forward and one backward
if has kernels && begin kernels "${KERNELS_TIMEOUT:-60}"; then
  : > "$OUT/kernel-times.txt"
  limited "$LIMIT" "$OUT/kernel-times.txt" "$PY" benchmarks/gpu_kernel_times.py | grep -v USDT
  record kernels "${PIPESTATUS[0]}" "$START" "$LIMIT"
fi

# ---- bench: arwkv's rows first and on their own (so a slow fla cannot cost them), then fla.
# bench_wkv.py makes one untimed call of every implementation before timing it, so fla's first
# call (Triton compilation and autotuning, tens of seconds) is already outside the timed
# region; but it is inside this stage's limit, and in one process it used to cost the rows after
# it. So fla's kernels are compiled in a warm-up process of their own (fla-warmup.txt says how
# long each first call took); Triton keeps the compiled kernels on disk, and the autotuning
# choices too where its version supports that (FLA_CACHE_RESULTS, TRITON_CACHE_AUTOTUNING), so
# the timed process that follows finds them ready.
if has bench && begin bench "${BENCH_TIMEOUT:-180}"; then
  : > "$OUT/bench.txt"
  limited "$LIMIT" "$OUT/bench.txt" "$PY" benchmarks/bench_wkv.py --device cuda --no-peers --json "$OUT/bench.json"
  rc=$?
  fla_shapes=${FLA_SHAPES:-"8,4096,64,64;1,32768,32,128"}
  left=$((START + LIMIT - SECONDS))
  if ! "$PY" -c "import fla" >/dev/null 2>&1; then
    echo "flash-linear-attention is not importable (carry fla-core in .whl/): no comparison" | tee -a "$OUT/bench.txt"
  elif ((left < 20)); then
    echo "no time left in this stage for flash-linear-attention (BENCH_TIMEOUT)" | tee -a "$OUT/bench.txt"
    rc=$((rc ? rc : 124))
  else
    export FLA_CACHE_RESULTS=1 TRITON_CACHE_AUTOTUNING=1
    : > "$OUT/fla-warmup.txt"
    export FLA_SHAPES=$fla_shapes
    limited "$left" "$OUT/fla-warmup.txt" "$PY" - <<'PYEOF'
import os, sys, time
import torch
sys.path.insert(0, "benchmarks")
from bench_wkv import fla_peers, fwd_bwd, parse_shapes  # the wrappers the benchmark times
from arwkv_ext.testing import make_inputs
print("fla", __import__("fla").__version__)
for B, T, H, N in parse_shapes(os.environ["FLA_SHAPES"]):
    inputs = make_inputs("wkv7", B, T, H, N, dtype=torch.bfloat16, device="cuda")
    # the benchmark's inputs, then the 32-step prefix its error check runs on (another length)
    for steps in (T, min(T, 32)):
        xs = [x[:, :steps] if x.dim() == 4 else x for x in inputs]
        for name, fn in fla_peers("wkv7").items():
            t0 = time.perf_counter()
            with torch.no_grad():
                fn(*xs)
            fwd_bwd(fn, xs)()
            torch.cuda.synchronize()
            print(f"{name} B={B} T={steps} H={H} N={N}: first forward + backward "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
PYEOF
    wrc=$?
    left=$((START + LIMIT - SECONDS))
    if ((wrc != 0)); then
      echo "fla warm-up did not finish (exit $wrc): no comparison" | tee -a "$OUT/bench.txt"
      rc=$((rc ? rc : wrc))
    elif ((left < 10)); then
      echo "no time left in this stage to time fla (BENCH_TIMEOUT)" | tee -a "$OUT/bench.txt"
      rc=$((rc ? rc : 124))
    else
      : > "$OUT/bench-fla.txt"
      limited "$left" "$OUT/bench-fla.txt" "$PY" benchmarks/bench_wkv.py --device cuda --ops wkv7 \
        --shapes "$fla_shapes" --json "$OUT/bench-fla.json"
      frc=$?
      rc=$((rc ? rc : frc))
    fi
  fi
  record bench $rc "$START" "$LIMIT"
fi

# ---- tests: the GPU grid, and the device-parametrised long-sequence and decode tests of test_ops.py
if has tests && begin tests "${TEST_TIMEOUT:-100}"; then
  : > "$OUT/tests.log"
  for subset in "chunked" "not chunked"; do  # (test ids name the algorithm: [...-chunked])
    left=$((START + LIMIT - SECONDS))
    if ((left < 10)); then echo "no time left for the '$subset' tests" | tee -a "$OUT/tests.log"; rc=124; break; fi
    echo "== tests: $subset" >> "$OUT/tests.log"
    timeout -k 10 "$left" "$PY" -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-8}" \
      tests/test_gpu.py tests/test_ops.py -k "(test_gpu or cuda) and $subset" >> "$OUT/tests.log" 2>&1
    rc=$?
    ((rc == 0 || rc == 5)) || break  # (5: no test selected)
  done
  ((rc == 5)) && rc=0
  tail -25 "$OUT/tests.log"
  record tests $rc "$START" "$LIMIT"
fi

# ---- decode: one kernel launch per T = 1 call with a state, and the time per call
if has decode && begin decode "${DECODE_TIMEOUT:-30}"; then
  : > "$OUT/decode.txt"
  limited "$LIMIT" "$OUT/decode.txt" "$PY" - <<'PYEOF'
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
  record decode $? "$START" "$LIMIT"
fi

# ---- demo: the whole pipeline (convert, stages 1-2 under bf16 autocast, eval, decoding, samples)
# with the demo's defaults on the GPU; its models stay in $WORK, its report comes to $OUT/demo
if has demo && begin demo "${DEMO_TIMEOUT:-80}"; then
  : > "$OUT/demo.log"
  # shellcheck disable=SC2086  # DEMO_ARGS is a list of flags
  limited "$LIMIT" "$OUT/demo.log" "$PY" -m arwkv.cli demo --device "${DEMO_DEVICE:-cuda}" \
    --out "$WORK/demo" ${DEMO_ARGS:-}
  rc=$?
  mkdir -p "$OUT/demo"
  for f in report.md report.json stage1_loss.png stage2_loss.png; do
    [[ -f $WORK/demo/$f ]] && cp "$WORK/demo/$f" "$OUT/demo/"
  done
  for s in 1 2; do
    [[ -f $WORK/demo/stage$s/metrics.jsonl ]] && cp "$WORK/demo/stage$s/metrics.jsonl" "$OUT/demo/stage$s-metrics.jsonl"
  done
  record demo $rc "$START" "$LIMIT"
fi

# ---- distill: `arwkv distill` stages 1 and 2 (2 steps each) and eval on a tiny local teacher
if has distill && begin distill "${DISTILL_TIMEOUT:-40}"; then
  : > "$OUT/distill.log"
  # shellcheck disable=SC2086  # DISTILL_ARGS is a list of flags
  limited "$LIMIT" "$OUT/distill.log" "$PY" benchmarks/gpu_distill_check.py --device "${DISTILL_DEVICE:-cuda}" \
    --out "$OUT/distill" --work "$WORK/distill" ${DISTILL_ARGS:-}
  record distill $? "$START" "$LIMIT"
fi

echo "== summary ($SUMMARY)"
cat "$SUMMARY"
exit $status
