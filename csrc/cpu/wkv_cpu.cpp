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

void forward(const WkvProblem& p, const ParallelFor& pf) {
  switch (active_isa()) {
    case Isa::avx512: return avx512::forward(p, pf);
    case Isa::avx2: return avx2::forward(p, pf);
    default: return baseline::forward(p, pf);
  }
}

void backward(const WkvBackwardProblem& p, const ParallelFor& pf) {
  switch (active_isa()) {
    case Isa::avx512: return avx512::backward(p, pf);
    case Isa::avx2: return avx2::backward(p, pf);
    default: return baseline::backward(p, pf);
  }
}

}  // namespace arwkv::cpu
