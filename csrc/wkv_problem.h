// One WKV problem, as every backend sees it: a plain description with no ATen, no CUDA and no
// standard-library headers, filled once from torch tensors by csrc/wkv_adapter.cpp (and by hand in
// the C++ tests). The CPU kernels (csrc/cpu) and the GPU kernels (csrc/gpu) take it as it is;
// what only one backend needs (the CPU's row-split partial sums, the GPU's scratch, stream and
// multiprocessor count) stays in that backend.
//
// Layout (the public contract of torch.ops.arwkv.wkv7 / wkv6):
//   r, w, k, v, a, b, y and their gradients: contiguous [B, T, H, N] in the inputs' dtype
//     (token-major: element (b, t, h, j) sits at ((b * T + t) * H + h) * N + j); w = log(decay) <= 0
//   u (WKV-6) and grad_u: [H, N] in the inputs' dtype
//   states (initial_state, final_state, grad_state, grad_initial_state): contiguous [S, H, N, N] in
//     the state dtype, float32 (float64 for float64 inputs), S[s, h, i, j] with i = value row and
//     j = key; S = B, or the number of sequences packed along T by cu_seqlens.
// Pointers that are not used are null; a null initial_state, grad_y or grad_state means zeros.
#pragma once

#include <stdint.h>

namespace arwkv {

// The head sizes N the kernels support: the one list. The argument checks, the GPU kernels'
// dispatch on N, the C++ tests and Python (arwkv_ext.HEAD_SIZES) all read it.
inline constexpr int kHeadSizes[] = {16, 32, 64, 128};
inline constexpr int kNumHeadSizes = int(sizeof(kHeadSizes) / sizeof(kHeadSizes[0]));

constexpr bool is_supported_head_size(int64_t n) {
  for (int h : kHeadSizes)
    if (h == n) return true;
  return false;
}

// Element type of the inputs (and of y and the input gradients).
enum class DType { f32, f64, bf16, f16 };

// The forward problem: shapes, inputs and the two outputs.
struct WkvProblem {
  int version = 7;  // 7: a, b; 6: u
  DType dtype = DType::f32;
  int64_t B = 0, T = 0, H = 0, N = 0;
  int64_t num_seqs = 0;  // S: B, or the number of sequences packed by cu_seqlens
  const void *r = nullptr, *w = nullptr, *k = nullptr, *v = nullptr;
  const void *a = nullptr, *b = nullptr;  // WKV-7 only
  const void* u = nullptr;                // WKV-6 only
  const void* initial_state = nullptr;    // null: zeros
  const int64_t* cu_seqlens = nullptr;    // [S + 1] offsets along T (B == 1), or null
  // outputs (forward only; null in a backward problem)
  void* y = nullptr;
  void* final_state = nullptr;
};

// The backward problem: the forward one (outputs unused) plus the incoming gradients and the
// gradients of every input, each in its input's dtype and layout (grad_initial_state in the
// state dtype, grad_u as [H, N]).
struct WkvBackwardProblem : WkvProblem {
  const void* grad_y = nullptr;      // null: zeros
  const void* grad_state = nullptr;  // null: zeros
  void *grad_r = nullptr, *grad_w = nullptr, *grad_k = nullptr, *grad_v = nullptr;
  void *grad_a = nullptr, *grad_b = nullptr;  // WKV-7
  void* grad_u = nullptr;                     // WKV-6
  void* grad_initial_state = nullptr;
};

}  // namespace arwkv
