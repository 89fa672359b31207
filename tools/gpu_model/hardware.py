"""The machines the GPU performance model estimates for, as published figures (every one is
printed with the estimates: they are assumptions, not measurements made here)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .sass import LATENCY


@dataclass(frozen=True)
class Gpu:
    name: str
    units: int  # SMs (NVIDIA) or CUs (AMD)
    clock_ghz: float  # sustained clock under load
    schedulers: int  # warp schedulers (SMSPs / SIMDs) per unit, each issuing one instruction a clock
    warp: int  # lanes per warp / wavefront
    registers: int  # 32-bit registers per unit
    shared_bytes: int  # shared memory (LDS) per unit a block can use
    max_threads: int  # resident threads per unit
    max_blocks: int  # resident blocks per unit
    hbm_tb_s: float  # DRAM bandwidth
    # warp instructions per clock per scheduler, by unit (sass.UNITS); shared memory in 128-byte
    # wavefronts per clock per unit; shuffles in warp instructions per clock per unit
    rates: dict
    latency: dict = field(default_factory=lambda: dict(LATENCY))  # clocks to a dependent instruction
    # units that are one pipe here (AMD: every VALU instruction, float or integer, on one SIMD)
    merged: dict = field(default_factory=dict)
    vgprs_per_simd: int = 0  # AMD: registers per lane of a SIMD (unified VGPRs + AGPRs); 0: NVIDIA's rule
    max_waves_per_simd: int = 0

    def describe(self) -> str:
        r = ", ".join(f"{k} {v:g}" for k, v in self.rates.items())
        return (
            f"{self.name}: {self.units} units x {self.schedulers} schedulers at {self.clock_ghz} GHz, "
            f"{self.registers} registers and {self.shared_bytes // 1024} KiB shared per unit, "
            f"<= {self.max_threads} threads / {self.max_blocks} blocks per unit, "
            f"HBM {self.hbm_tb_s} TB/s; "
            f"rates (warp instructions / clock / scheduler; shared: wavefronts / clock / unit; shuffle: "
            f"per unit): {r}"
        )


# H100 SXM5 (Hopper): 132 SMs, 4 SMSPs each; 128 FP32 lanes per SM (one warp FFMA a clock per
# SMSP), 64 integer lanes (half rate), 16 special-function and conversion lanes per SM; shared
# memory 128 bytes a clock per SM; 32 shuffle lanes a clock per SM; 989 dense bf16 tensor TFLOP/s
# = 0.5 m16n8k16 HMMA a clock per SM at 1.755 GHz, i.e. 0.125 per SMSP.
H100 = Gpu(
    "H100 SXM",
    units=132,
    clock_ghz=1.755,
    schedulers=4,
    warp=32,
    registers=65536,
    shared_bytes=228 * 1024,
    max_threads=2048,
    max_blocks=32,
    hbm_tb_s=3.35,
    rates={
        "issue": 1.0,
        "fp32": 1.0,
        "alu": 0.5,
        "imad": 0.5,
        "conv": 0.125,
        "mufu": 0.125,
        "tensor": 0.125,
        "shared": 1.0,
        "shuffle": 1.0,
        "uniform": 1.0,
    },
)


# MI300X (CDNA3, gfx942): 304 CUs at 2.1 GHz, 4 SIMDs each; a SIMD runs a 64-lane wave's VALU
# instruction in 4 clocks (16 lanes), float and integer alike (one pipe), transcendentals at a
# quarter of that; 1307 dense bf16 tensor TFLOP/s = one 16x16x16 MFMA every 16 clocks per SIMD;
# one scalar ALU per CU; LDS 64 KiB and 128 bytes a clock per CU; 512 VGPRs + AGPRs per SIMD lane,
# at most 8 waves per SIMD; HBM3 5.3 TB/s. Latencies: VALU ~8, LDS ~64, MFMA 16x16x16 ~32,
# L2 / Infinity Cache ~500 clocks.
MI300X = Gpu(
    "MI300X",
    units=304,
    clock_ghz=2.1,
    schedulers=4,
    warp=64,
    registers=0,
    shared_bytes=64 * 1024,
    max_threads=2048,
    max_blocks=32,
    hbm_tb_s=5.3,
    rates={
        "issue": 1.0,
        "fp32": 0.25,
        "alu": 0.25,
        "imad": 0.25,
        "conv": 0.25,
        "mufu": 0.0625,
        "tensor": 0.0625,
        "shared": 1.0,
        "shuffle": 1.0,
        "uniform": 0.25,
        "valu": 0.25,
    },
    latency={
        "fp32": 8,
        "alu": 8,
        "imad": 8,
        "conv": 8,
        "mufu": 20,
        "tensor": 32,
        "shared": 64,
        "shuffle": 64,
        "global": 500,
        "barrier": 20,
        "uniform": 4,
        "branch": 4,
        "other": 8,
    },
    merged={"valu": ("fp32", "alu", "imad", "conv")},
    vgprs_per_simd=512,
    max_waves_per_simd=8,
)
