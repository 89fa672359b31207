// Instruction-set selection and work splitting for the CPU kernels.
#include "wkv_cpu.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace arwkv::cpu {

int64_t row_splits(const WkvProblem& p, int num_threads) {
  // Split the value rows of a head across tasks only when there are too few heads to keep
  // every thread busy; each split keeps at least 16 rows.
  int64_t splits = 1;
  const int64_t heads = p.num_seqs * p.H;
  while (heads * splits < 2 * int64_t(num_threads) && p.N / (2 * splits) >= 16) splits *= 2;
  return splits;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "baseline";
  }
}

bool isa_compiled(Isa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  (void)isa;
  return true;
#else
  return isa == Isa::baseline;
#endif
}

bool isa_supported(Isa isa) {
  if (!isa_compiled(isa)) return false;
#if defined(__x86_64__) || defined(_M_X64)
  switch (isa) {
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    default:
      return true;
  }
#else
  return true;
#endif
}

Isa active_isa() {
  const char* forced = std::getenv("ARWKV_CPU_ISA");
  if (forced && *forced) {
    for (Isa isa : {Isa::baseline, Isa::avx2, Isa::avx512}) {
      if (std::strcmp(forced, isa_name(isa)) != 0) continue;
      if (!isa_supported(isa))
        throw std::runtime_error(std::string("ARWKV_CPU_ISA=") + forced +
                                 ": this CPU (or this build) does not support it");
      return isa;
    }
    throw std::invalid_argument(std::string("ARWKV_CPU_ISA=") + forced +
                                " is not one of baseline, avx2, avx512");
  }
  if (isa_supported(Isa::avx512)) return Isa::avx512;
  if (isa_supported(Isa::avx2)) return Isa::avx2;
  return Isa::baseline;
}

const char* algorithm_name(Algorithm algorithm) {
  switch (algorithm) {
    case Algorithm::step: return "step";
    case Algorithm::chunked: return "chunked";
    default: return "auto";
  }
}

Algorithm active_algorithm() {
  const char* forced = std::getenv("ARWKV_CPU_ALGORITHM");
  if (!forced || !*forced) return Algorithm::automatic;
  for (Algorithm a : {Algorithm::automatic, Algorithm::step, Algorithm::chunked})
    if (std::strcmp(forced, algorithm_name(a)) == 0) return a;
  throw std::invalid_argument(std::string("ARWKV_CPU_ALGORITHM=") + forced +
                              " is not one of auto, step, chunked");
}

// The automatic choice, from `make bench` (benchmarks/results/cpu-avx512-2core.txt, 2 threads,
// float32, N = 64): the chunked backward is faster for both ops, and so is WKV-6's chunked
// forward; WKV-7's step forward is faster than its chunked one (its key-side work per chunk,
// the 16 x 16 matrices and the triangular solve, costs more than the step form loses).
Algorithm forward_algorithm(const WkvProblem& p) {
  const Algorithm a = active_algorithm();
  if (a != Algorithm::automatic) return a;
  return p.version == 7 ? Algorithm::step : Algorithm::chunked;
}

Algorithm backward_algorithm(const WkvProblem&) {
  const Algorithm a = active_algorithm();
  return a == Algorithm::automatic ? Algorithm::chunked : a;
}

void forward(const WkvProblem& p, const ParallelFor& pf) {
  const Algorithm algorithm = forward_algorithm(p);
  switch (active_isa()) {
    case Isa::avx512: return avx512::forward(p, pf, algorithm);
    case Isa::avx2: return avx2::forward(p, pf, algorithm);
    default: return baseline::forward(p, pf, algorithm);
  }
}

void backward(const WkvBackwardProblem& p, const ParallelFor& pf) {
  const Algorithm algorithm = backward_algorithm(p);
  switch (active_isa()) {
    case Isa::avx512: return avx512::backward(p, pf, algorithm);
    case Isa::avx2: return avx2::backward(p, pf, algorithm);
    default: return baseline::backward(p, pf, algorithm);
  }
}

}  // namespace arwkv::cpu
