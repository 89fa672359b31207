// Plain C++ interface of the CPU WKV kernels. No ATen here: the kernels build and are tested
// without torch (CMakeLists.txt), and csrc/wkv_adapter.cpp hands them the problem it filled from
// torch tensors (csrc/wkv_problem.h describes it and the layouts).
#pragma once

#include <stdint.h>

#include "../wkv_problem.h"

namespace arwkv::cpu {

enum class Isa { baseline, avx2, avx512 };

// How the recurrence is evaluated: step by step, or by chunks of 16 steps in matrix form
// (wkv_cpu_chunked.h). Both are exact for any decay; segments of at most 4 steps (decoding)
// always take the step path. automatic: whichever `make bench` measured faster for the call
// (see forward() / backward() in wkv_cpu.cpp).
enum class Algorithm { automatic, step, chunked };

// Runs fn(ctx, begin, end) over [0, n) on the caller's thread pool (at::parallel_for in the
// extension, a serial loop in the C++ test). Plain function pointers, not std::function, so
// the per-ISA kernel files instantiate no standard-library templates. num_threads is the size
// of that pool: it decides how finely the work is split.
using TaskFn = void (*)(void* ctx, int64_t begin, int64_t end);
struct ParallelFor {
  void* self = nullptr;
  void (*run)(void* self, int64_t n, void* ctx, TaskFn fn) = nullptr;
  int num_threads = 1;
  void operator()(int64_t n, void* ctx, TaskFn fn) const { run(self, n, ctx, fn); }
};

// The backward splits the value rows of a head across tasks when there are too few heads to
// keep every thread busy; the per-key-column gradients (dr, dw, dk and, for WKV-7, da, db) are
// sums over value rows, so each split accumulates its own partial copy (in the state dtype) and
// the backward adds them up into the problem's gradients. How many splits this problem uses:
int64_t row_splits(const WkvProblem& p, int num_threads);

// Writes p.y and p.final_state.
void forward(const WkvProblem& p, const ParallelFor& pf);
// Writes every gradient of p (grad_a, grad_b for WKV-7, grad_u for WKV-6).
void backward(const WkvBackwardProblem& p, const ParallelFor& pf);

// Instruction set used by the calls above: the best the CPU supports, or the one named by
// the environment variable ARWKV_CPU_ISA (baseline | avx2 | avx512) when it is set.
Isa active_isa();
const char* isa_name(Isa isa);
// Algorithm asked for: the one named by the environment variable ARWKV_CPU_ALGORITHM
// (auto | step | chunked), automatic when it is unset.
Algorithm active_algorithm();
const char* algorithm_name(Algorithm algorithm);
// The algorithm the calls above use for p: the one asked for, or the automatic choice.
Algorithm forward_algorithm(const WkvProblem& p);
Algorithm backward_algorithm(const WkvProblem& p);
bool isa_supported(Isa isa);
bool isa_compiled(Isa isa);

// One instantiation per instruction set (csrc/cpu/wkv_cpu_<isa>.cpp).
#define ARWKV_DECLARE_ISA(ns)                                     \
  namespace ns {                                                  \
  void forward(const WkvProblem& p, const ParallelFor& pf, Algorithm algorithm);         \
  void backward(const WkvBackwardProblem& p, const ParallelFor& pf, Algorithm algorithm); \
  }
ARWKV_DECLARE_ISA(baseline)
ARWKV_DECLARE_ISA(avx2)
ARWKV_DECLARE_ISA(avx512)
#undef ARWKV_DECLARE_ISA

}  // namespace arwkv::cpu
