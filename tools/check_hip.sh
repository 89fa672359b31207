#!/usr/bin/env bash
# Compile check of the GPU kernels for AMD MI300X (gfx942) on a machine without ROCm or a GPU:
# clang-19 compiles every kernel file device-side against Debian's HIP headers and ROCm device
# libraries (and its host side for syntax), then tools/hip_resource_table.py prints one row per
# kernel and checks the goals. The kernel files, C++ standard and flags come from csrc/build.json,
# as setup.py and CMakeLists.txt take them.
#
#   tools/check_hip.sh [table-output-file]
# Needs (installed here when missing, as root or through sudo): clang-19 lld-19 llvm-19
# libamdhip64-dev rocm-device-libs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_TABLE=${1:-benchmarks/results/check-hip.txt}
ARCH=gfx942
WORK=build/check-hip
mkdir -p "$WORK"
# The value of csrc/build.json at a key path; a list one item a line.
build_json() {
  python3 -c 'import json, sys
v = json.load(open("csrc/build.json"))
for key in sys.argv[1:]: v = v[key]
print("\n".join(map(str, v)) if isinstance(v, list) else v)' "$@"
}
mapfile -t KERNEL_FILES < <(build_json sources gpu_kernels)
mapfile -t GPU_FLAGS < <(build_json gpu_flags)
GPU_FLAGS+=("-std=c++$(build_json cxx_standard)")

need=()
command -v clang++-19 >/dev/null || need+=(clang-19 lld-19)
command -v llvm-dis-19 >/dev/null || need+=(llvm-19)
[ -f /usr/include/hip/hip_runtime.h ] || need+=(libamdhip64-dev)
BITCODE=/usr/lib/x86_64-linux-gnu/amdgcn/bitcode
[ -f $BITCODE/ocml.bc ] || need+=(rocm-device-libs)
if [ ${#need[@]} -gt 0 ]; then
  echo "check-hip: installing ${need[*]}"
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need[@]}" >/dev/null
fi

# Debian's device libraries stop at gfx940: derive gfx942's ISA-version bitcode from gfx940's
# (the only difference is the version constant 9400 -> 9402), in a private folder of links.
LIBS=$WORK/device-libs
mkdir -p "$LIBS"
for f in $BITCODE/*.bc; do ln -sf "$f" "$LIBS/"; done
rm -f "$LIBS/oclc_isa_version_942.bc"
llvm-dis-19 $BITCODE/oclc_isa_version_940.bc -o - | sed 's/9400/9402/' | llvm-as-19 -o "$LIBS/oclc_isa_version_942.bc"

: > "$WORK/remarks.log"
for src in "${KERNEL_FILES[@]}"; do
  echo "check-hip: $src -> $ARCH"
  clang++-19 -x hip "${GPU_FLAGS[@]}" --offload-arch=$ARCH --cuda-device-only --rocm-path=/usr \
    --rocm-device-lib-path="$LIBS" -Werror -Wno-unused-command-line-argument \
    -S "$src" -o "$WORK/$(basename "$src" .cu).s" -Rpass-analysis=kernel-resource-usage \
    2>> "$WORK/remarks.log"
done
# The host side of the same files (the launchers) is compiled too, for syntax and types only:
# linking it needs the ROCm runtime library, which this machine does not have.
for src in "${KERNEL_FILES[@]}"; do
  clang++-19 -x hip "${GPU_FLAGS[@]}" --offload-arch=$ARCH --cuda-host-only --rocm-path=/usr -Werror \
    -Wno-unused-command-line-argument -fsyntax-only "$src"
done
echo "check-hip: host side of the kernel files compiles"
python3 tools/hip_resource_table.py "$WORK/remarks.log" --out "$OUT_TABLE"
