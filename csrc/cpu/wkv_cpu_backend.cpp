// The torch side of the CPU backend: the CPU kernels (wkv_cpu.h) on torch's thread pool.
#include <ATen/Parallel.h>

#include "../wkv_backends.h"
#include "wkv_cpu.h"

namespace arwkv {
namespace {

void run_parallel(void*, int64_t n, void* ctx, cpu::TaskFn fn) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) { fn(ctx, begin, end); });
}

cpu::ParallelFor thread_pool() { return {nullptr, &run_parallel, at::get_num_threads()}; }

}  // namespace

void cpu_forward(const WkvProblem& p) { cpu::forward(p, thread_pool()); }
void cpu_backward(const WkvBackwardProblem& p) { cpu::backward(p, thread_pool()); }

}  // namespace arwkv
