// Argument checks shared by every backend (CPU, CUDA / ROCm and Meta), run by the adapter
// (wkv_adapter.cpp) before it fills a problem: one place that says what torch.ops.arwkv.wkv7 /
// wkv6 accept. Messages name the argument.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace arwkv {

struct WkvShape {
  int64_t B, T, H, N;
  int64_t S;                     // number of states: B, or the number of packed sequences
  at::ScalarType state_dtype;    // float32, or float64 for float64 inputs
};

// Checks shapes, dtypes and devices (never tensor values, so it also runs on meta tensors).
// version 7 takes a and b, version 6 takes u.
WkvShape check_wkv_inputs(const char* op, int version, const at::Tensor& r, const at::Tensor& w,
                          const at::Tensor& k, const at::Tensor& v, const at::Tensor* a,
                          const at::Tensor* b, const at::Tensor* u,
                          const std::optional<at::Tensor>& initial_state,
                          const std::optional<at::Tensor>& cu_seqlens);

// Checks the gradients handed to a backward op.
void check_wkv_grads(const char* op, const WkvShape& g, const at::Tensor& r,
                     const std::optional<at::Tensor>& grad_y,
                     const std::optional<at::Tensor>& grad_state);

// Checks the values of cu_seqlens: 0 = c_0 < c_1 < ... < c_S = T. Takes a CPU int64 tensor.
void check_cu_seqlens_values(const char* op, const at::Tensor& cu_seqlens, int64_t T);

}  // namespace arwkv
