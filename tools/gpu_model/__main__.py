"""``python -m gpu_model`` (``make gpu-model``): the GPU kernels' estimated times on an H100, from
their machine code, checked against the times measured on one.

Compiles csrc/gpu/wkv_gpu_bf16.cu for sm_90a with nvcc (line info kept), disassembles it with
nvdisasm and reads each kernel's registers and shared memory with cuobjdump (both from PyPI's
nvidia-cuda-nvdisasm / nvidia-cuda-cuobjdump), then estimates every kernel a WKV call launches
(see model.py) for the shapes measured on an H100 and prints the estimate beside the measurement.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from . import amdgpu
from .hardware import H100, MI300X
from .kernels import FACTORED, chunked_kernels, step_kernels
from .model import ASSUMPTIONS, estimate
from .sass import parse

ROOT = Path(__file__).resolve().parents[2]
# The step kernels' times measured on an H100 SXM (benchmarks/results/gpu-h100-2026-11-27/,
# bf16, WKV-7): (B, T, H, N) -> (forward ms, backward ms)
MEASURED = {(8, 4096, 64, 64): (6.97, 43.3), (1, 32768, 32, 128): (31.2, 133.0)}
MEASURED_COMMIT = "a803514"  # the kernels those times are of
TOLERANCE = 0.35


def tool(name: str) -> str:
    """nvdisasm / cuobjdump: on PATH, or from the nvidia-cuda-* wheels of this Python."""
    found = shutil.which(name)
    if found:
        return found
    import nvidia  # the namespace package the wheels install into

    for base in nvidia.__path__:
        for candidate in Path(base).glob(f"cu*/bin/{name}"):
            return str(candidate)
    raise SystemExit(f"gpu-model: {name} not found (pip install nvidia-cuda-nvdisasm nvidia-cuda-cuobjdump)")


def kernel_source(root: Path) -> tuple[Path, str]:
    """The bf16 kernel file under root, and a digest of it and every header it may include (the
    compiled listings are cached under it)."""
    source = root / "csrc" / "gpu" / "wkv_gpu_bf16.cu"
    headers = sorted((root / "csrc").rglob("*.h")) + sorted((root / "csrc").rglob("*.cuh"))
    return source, hashlib.sha256(b"".join(p.read_bytes() for p in [source, *headers])).hexdigest()[:16]


def build(out: Path, nvcc: str, commit: str | None = None) -> tuple[str, dict[str, tuple[int, int]]]:
    """(the SASS listing, {kernel: (registers, shared bytes)}) of the bf16 kernels for sm_90a, of
    the working tree or of ``commit``'s csrc/ (extracted with git archive); rebuilt when a
    source changes."""
    root = ROOT
    if commit:
        root = out / f"src-{commit}"
        if not (root / "csrc").is_dir():
            root.mkdir(parents=True, exist_ok=True)
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", commit, "csrc"], check=True, capture_output=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    source, digest = kernel_source(root)
    out.mkdir(parents=True, exist_ok=True)
    cubin, sass, res = out / f"bf16-{digest}.cubin", out / f"bf16-{digest}.sass", out / f"bf16-{digest}.res"
    if not sass.exists():
        flags = json.loads((ROOT / "csrc" / "build.json").read_text())
        cmd = [
            nvcc,
            "-cubin",
            "-arch=sm_90a",
            "-lineinfo",
            f"-std=c++{flags['cxx_standard']}",
            *flags["gpu_flags"],
            *flags["nvcc_flags"],
            f"-I{root / 'csrc'}",
            str(source),
            "-o",
            str(cubin),
        ]
        print("gpu-model:", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
        env = dict(os.environ, PATH=f"{Path(tool('nvdisasm')).parent}:{os.environ.get('PATH', '')}")
        text = subprocess.run(
            [tool("nvdisasm"), "-g", "-c", str(cubin)], check=True, capture_output=True, text=True
        ).stdout
        usage = subprocess.run(
            [tool("cuobjdump"), "-res-usage", str(cubin)], check=True, capture_output=True, text=True, env=env
        ).stdout
        sass.write_text(text)
        res.write_text(usage)
    resources = {}
    name = None
    for line in res.read_text().splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+).*SHARED:(\d+)", line)
        if m and name:
            resources[name] = (int(m.group(1)), int(m.group(2)))
    return sass.read_text(), resources


def build_gfx942(out: Path) -> str | None:
    """The gfx942 assembly of the bf16 kernels with line tables, or None without clang-19 and the
    ROCm device libraries (``make check-hip`` installs them and derives gfx942's ISA-version
    bitcode into build/check-hip/device-libs, which this reuses)."""
    libs = ROOT / "build" / "check-hip" / "device-libs"
    clang = shutil.which("clang++-19")
    if not clang or not (libs / "oclc_isa_version_942.bc").exists():
        return None
    source, digest = kernel_source(ROOT)
    asm = out / f"bf16-gfx942-{digest}.s"
    if not asm.exists():
        flags = json.loads((ROOT / "csrc" / "build.json").read_text())
        cmd = [
            clang,
            "-x",
            "hip",
            *flags["gpu_flags"],
            f"-std=c++{flags['cxx_standard']}",
            "--offload-arch=gfx942",
            "--cuda-device-only",
            "--rocm-path=/usr",
            f"--rocm-device-lib-path={libs}",
            "-gline-tables-only",
            "-Wno-unused-command-line-argument",
            "-S",
            str(source),
            "-o",
            str(asm),
        ]
        print("gpu-model:", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    return asm.read_text()


def sources_of(kernels) -> dict[str, list[str]]:
    files = {i.line[0] for k in kernels.values() for i in k.insns if i.line}
    return {f: Path(f).read_text().splitlines() for f in files if Path(f).is_file()}


KERNEL_HEADER = [
    "| GPU | op | B, T, H, N | algorithm | pass | kernel | blocks | resident / unit | instructions / warp | "
    "shared wavefronts / warp | serial chain (clocks / warp) | bound | DRAM GB | DRAM alone ms | "
    "estimate ms |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]


def bank_conflicts(emulator: Path, out: Path) -> dict:
    """{(version, N, kernel): {(file name, line): conflict factor}} from the CPU emulator's
    ``--banks`` report (tests/cpp/test_wkv_gpu_emulated.cpp) of the chunked kernels: at each of the
    tile layer's shared-memory access lines, the wavefronts its warp accesses took over the
    wavefronts they would take conflict-free. Cached beside the listings, under the emulator binary's
    digest (the binary holds the kernels' source too)."""
    if not emulator.is_file():
        raise SystemExit(f"gpu-model: {emulator} not found (make cpp-build builds it)")
    digest = hashlib.sha256(emulator.read_bytes()).hexdigest()[:16]
    cached = out / f"banks-{emulator.name}-{digest}.jsonl"
    if not cached.exists():
        report = subprocess.run([str(emulator), "--banks"], check=True, capture_output=True, text=True).stdout
        out.mkdir(parents=True, exist_ok=True)
        cached.write_text(report)
    factors: dict = {}
    for row in map(json.loads, cached.read_text().splitlines()):
        key = (row["version"], row["N"], row["kernel"])
        factors.setdefault(key, {})[(row["file"], row["line"])] = row["wavefronts"] / row["ideal"]
    return factors


def estimate_passes(
    kernels, resources, sources, gpu, version: int, algorithm: str, shape4, lines, per_kernel, conflicts=None
):
    """{pass: ms} of one op call at shape4 = (B, T, H, N), bf16; a row per kernel into lines,
    each kernel's estimate into per_kernel (keyed as benchmarks/gpu_kernel_times.py names it).
    conflicts: bank_conflicts() of the platform (the chunked kernels' shared-memory conflicts)."""
    B, T, H, N = shape4
    shape = {"B": B, "T": T, "H": H, "N": N, "V": version, "bytes": 2, "hip": gpu.warp == 64}
    launches = step_kernels(shape, gpu.units) if algorithm == "step" else chunked_kernels(shape)
    totals = {}
    for pass_name, specs in launches.items():
        total = 0.0
        for spec in specs:
            if spec.emulated_as:
                if (version, N, spec.emulated_as) not in (conflicts or {}):
                    raise SystemExit(
                        f"gpu-model: no bank-conflict counts for {spec.label} (wkv{version}, N={N})"
                    )
                spec.conflicts = conflicts[(version, N, spec.emulated_as)]
            matches = [k for k in kernels if re.search(spec.name, k)]
            if len(matches) != 1:
                raise SystemExit(f"gpu-model: {len(matches)} kernels match {spec.name}")
            # a conflict the emulator counted at a line where the machine code has no shared access
            # would be lost (the compiler may put a load on the line of its use instead)
            shared_lines = {
                (Path(i.line[0]).name, i.line[1])
                for i in kernels[matches[0]].insns
                if i.line and i.unit == "shared"
            }
            if lost := sorted(k for k, f in spec.conflicts.items() if f > 1 and k not in shared_lines):
                raise SystemExit(
                    f"gpu-model: {spec.label}: bank conflicts counted at {lost}, no access there"
                )
            e = estimate(kernels[matches[0]], resources[matches[0]], spec, shape, gpu, sources)
            total += e.ms
            key = f"wkv{version} {B},{T},{H},{N} bfloat16 {algorithm}"
            per_kernel.setdefault(key, {}).setdefault(pass_name, {})[spec.short] = round(e.ms, 3)
            lines.append(
                f"| {gpu.name} | wkv{version} | {B}, {T}, {H}, {N} | {algorithm} | {pass_name} | {e.label} | "
                f"{e.blocks} | {e.resident} | {e.per_warp['issue']:,.0f} | "
                f"{e.per_warp['shared_wavefronts']:,.0f} | {e.chain_clocks:,.0f} | {e.bound} | "
                f"{spec.dram_bytes(shape) / 1e9:.2f} | {e.parts_ms['dram']:.2f} | {e.ms:.2f} |"
            )
        totals[pass_name] = total
    return totals


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nvcc", default=os.environ.get("NVCC", "/usr/local/cuda/bin/nvcc"))
    ap.add_argument("--build", type=Path, default=ROOT / "build" / "gpu-model")
    ap.add_argument("--out", type=Path, help="also write the report here (markdown)")
    emulators = ROOT / "build" / "cmake"
    ap.add_argument("--emulator-cuda", type=Path, default=emulators / "test_wkv_gpu_emulated_cuda")
    ap.add_argument("--emulator-hip", type=Path, default=emulators / "test_wkv_gpu_emulated_hip")
    args = ap.parse_args()

    gpu = H100
    lines = (
        [
            "# GPU model: estimated kernel times (H100 SXM and MI300X, bf16)",
            "",
            "Estimates from the kernels' sm_90a machine code (`make gpu-model`), not measurements.",
            "",
            f"Hardware: {gpu.describe()}.",
            "",
            "Assumptions:",
        ]
        + [f"- {a}" for a in (*ASSUMPTIONS, FACTORED)]
        + [""]
    )

    # 1. the kernels that were measured, against the measurement
    text, resources = build(args.build, args.nvcc, MEASURED_COMMIT)
    kernels = parse(text)
    old_rows, measured_est = [], {}
    for shape4 in MEASURED:
        measured_est[shape4] = estimate_passes(
            kernels, resources, sources_of(kernels), gpu, 7, "step", shape4, old_rows, {}
        )

    # 2. this tree's kernels: both ops, both algorithms
    text, resources = build(args.build, args.nvcc)
    kernels = parse(text)
    sources = sources_of(kernels)
    rows, per_kernel, now = [], {}, {}
    cuda_conflicts = bank_conflicts(args.emulator_cuda, args.build)
    for version in (7, 6):
        for shape4 in MEASURED:
            for algorithm in ("step", "chunked"):
                now[(gpu.name, version, shape4, algorithm)] = estimate_passes(
                    kernels,
                    resources,
                    sources,
                    gpu,
                    version,
                    algorithm,
                    shape4,
                    rows,
                    per_kernel,
                    cuda_conflicts,
                )

    # 3. the same kernels compiled for gfx942, on an MI300X (no measurement to check against)
    amd = build_gfx942(args.build)
    amd_rows = []
    if amd is None:
        print(
            "gpu-model: MI300X skipped: no clang-19 / ROCm device libraries (make check-hip installs them)",
            file=sys.stderr,
        )
    else:
        amd_kernels, amd_resources = amdgpu.parse(amd)
        amd_sources = sources_of(amd_kernels)
        hip_conflicts = bank_conflicts(args.emulator_hip, args.build)
        for version in (7, 6):
            for shape4 in MEASURED:
                for algorithm in ("step", "chunked"):
                    now[(MI300X.name, version, shape4, algorithm)] = estimate_passes(
                        amd_kernels,
                        amd_resources,
                        amd_sources,
                        MI300X,
                        version,
                        algorithm,
                        shape4,
                        amd_rows,
                        {},
                        hip_conflicts,
                    )
    lines += [f"MI300X: {MI300X.describe()}.", ""]

    lines += [
        f"## Calibration: the measured kernels (commit {MEASURED_COMMIT}) against their H100 times",
        "",
        "(benchmarks/results/gpu-h100-2026-11-27/, bf16 WKV-7, step kernels. Since that commit the "
        "columns kernel reads rows without bank conflicts and sums columns in one reduce-scatter, and "
        "HIP alone stages fewer steps: this tree's estimate is beside it.)",
        "",
        "| B, T, H, N | pass | estimate ms | measured ms | error | this tree's step kernels, estimate ms |",
        "|---|---|---|---|---|---|",
    ]
    worst = 0.0
    for shape4, (fwd, bwd) in MEASURED.items():
        for pass_name, m in (("forward", fwd), ("backward", bwd)):
            e = measured_est[shape4][pass_name]
            err = e / m - 1
            worst = max(worst, abs(err))
            lines.append(
                f"| {', '.join(map(str, shape4))} | {pass_name} | {e:.2f} | {m:.2f} | {err:+.0%} | "
                f"{now[(gpu.name, 7, shape4, 'step')][pass_name]:.2f} |"
            )
    ok = worst <= TOLERANCE
    lines += [
        "",
        f"Largest error {worst:.0%} (goal: within {TOLERANCE:.0%} each): "
        f"{'calibrated' if ok else 'NOT calibrated: the model must improve before it steers design'}.",
        "",
    ]
    lines += [
        "## This tree's kernels, per call (bf16)",
        "",
        "| GPU | op | B, T, H, N | algorithm | forward ms | backward ms | fwd+bwd ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for (name, version, shape4, algorithm), t in now.items():
        lines.append(
            f"| {name} | wkv{version} | {', '.join(map(str, shape4))} | {algorithm} | {t['forward']:.2f} | "
            f"{t['backward']:.2f} | {t['forward'] + t['backward']:.2f} |"
        )
    lines += ["", "## Per kernel: this tree", ""] + KERNEL_HEADER + rows + amd_rows
    lines += ["", f"## Per kernel: commit {MEASURED_COMMIT}", ""] + KERNEL_HEADER + old_rows
    headline = (8, 4096, 64, 64)
    chunked, step = now[(gpu.name, 7, headline, "chunked")], measured_est[headline]
    final = (
        f"gpu-model: h100 wkv7 bf16 8,4096,64,64: chunked fwd {chunked['forward']:.2f} ms bwd "
        f"{chunked['backward']:.2f} ms; step fwd {step['forward']:.2f} ms bwd {step['backward']:.2f} ms "
        f"(measured 6.97 / 43.30)"
    )
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n\n" + final + "\n")
        # per kernel of this tree, for benchmarks/gpu_kernel_times.py to print beside its timings
        args.out.with_suffix(".json").write_text(
            json.dumps(
                {
                    "gpu": gpu.name,
                    "note": "estimates from the machine code (make gpu-model), not measurements",
                    "ms": per_kernel,
                },
                indent=1,
            )
            + "\n"
        )
    print(final)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
