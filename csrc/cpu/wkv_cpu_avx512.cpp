// The CPU kernels compiled for the avx512 instruction set (see wkv_cpu_kernels.h).
#include <cstdint>
#include <cstdlib>
#include <new>
#include <utility>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

#include "wkv_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi2"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi2")
#endif
#define ARWKV_ISA avx512
#define ARWKV_VEC_BYTES 64
#include "wkv_cpu_kernels.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#else
// Not an x86-64 build: the dispatcher never selects this instruction set.
namespace arwkv::cpu::avx512 {
void forward(const WkvProblem& p, const ParallelFor& pf, Algorithm a) { baseline::forward(p, pf, a); }
void backward(const WkvBackwardProblem& p, const ParallelFor& pf, Algorithm a) { baseline::backward(p, pf, a); }
}  // namespace arwkv::cpu::avx512
#endif
