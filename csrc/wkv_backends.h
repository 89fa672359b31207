// The torch side of each backend, as the adapter (wkv_adapter.cpp) calls it: with a problem
// (wkv_problem.h) whose inputs and outputs the adapter has filled and allocated on the inputs'
// device. What a backend needs besides (threads; the GPU's scratch, stream and multiprocessor
// count) it finds itself.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "wkv_problem.h"

namespace arwkv {

inline at::ScalarType scalar_type(DType t) {
  switch (t) {
    case DType::f64: return at::kDouble;
    case DType::bf16: return at::kBFloat16;
    case DType::f16: return at::kHalf;
    default: return at::kFloat;
  }
}

// csrc/cpu/wkv_cpu_backend.cpp: the CPU kernels on torch's thread pool.
void cpu_forward(const WkvProblem& p);
void cpu_backward(const WkvBackwardProblem& p);

// The GPU kernels' algorithm, from ARWKV_GPU_ALGORITHM (read at every call): "step", or
// "chunked" (the tensor-core kernels). Unset or "auto" is "step": the chunked kernels are opt-in
// until a saved GPU measurement shows them faster. Any other value: std::invalid_argument.
inline const char* gpu_algorithm() {
  const char* forced = std::getenv("ARWKV_GPU_ALGORITHM");
  if (!forced || !*forced || std::strcmp(forced, "auto") == 0 || std::strcmp(forced, "step") == 0) return "step";
  if (std::strcmp(forced, "chunked") == 0) return "chunked";
  throw std::invalid_argument(std::string("ARWKV_GPU_ALGORITHM=") + forced + " is not one of auto, step, chunked");
}

#ifdef ARWKV_WITH_GPU
// csrc/gpu/wkv_gpu_backend.cpp: the GPU kernels on the current stream of the current device
// (the adapter sets it to the inputs'); a failed launch raises an error that starts with `op`
// and names the kernel.
void gpu_forward(const char* op, const WkvProblem& p, at::Device device);
void gpu_backward(const char* op, const WkvBackwardProblem& p, at::Device device);
#endif

}  // namespace arwkv
