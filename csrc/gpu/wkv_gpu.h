// Plain C++ interface of the GPU kernels (no ATen, no CUDA headers), shared by the kernel files
// and the torch adapter wkv_gpu_ops.cpp.
#pragma once

#include <stdint.h>

namespace arwkv {
namespace gpu {

// 16-bit input types as raw bits (layout-compatible with at::BFloat16 / at::Half).
struct Bf16 { uint16_t bits; };
struct F16 { uint16_t bits; };

// Steps per chunk: the unit of shared-memory staging, and of the state snapshots the backward
// recomputes from (one [N, N] float32 snapshot per chunk and head).
constexpr int kChunk = 8;

// Everything a launch needs. Sequence tensors are contiguous [B, T, H, N] (token-major, so
// element (token, h, j) sits at (token * H + h) * N + j); states are float32 [S, H, N, N] with
// S[s, h, i, j], i = value row, j = key. Pointers that are not used may be null.
struct WkvParams {
  int version = 7;                 // 7: a, b; 6: u
  int64_t B = 0, T = 0, H = 0, N = 0;
  int64_t num_seqs = 0;            // S: B, or the number of sequences packed by cu_seqlens
  const void *r = nullptr, *w = nullptr, *k = nullptr, *v = nullptr;
  const void *a = nullptr, *b = nullptr, *u = nullptr;  // u: [H, N]
  const float* initial_state = nullptr;                 // null: zeros
  const int64_t* cu_seqlens = nullptr;                  // device [S + 1], or null
  // forward
  void* y = nullptr;
  float* final_state = nullptr;
  // backward: gradients in the inputs' dtype, except the float32 state gradient and grad_u,
  // which is float32 [S, H, N] (one partial sum per sequence; the caller adds them up).
  const void* grad_y = nullptr;        // null: zeros
  const float* grad_state = nullptr;   // null: zeros
  void *grad_r = nullptr, *grad_w = nullptr, *grad_k = nullptr, *grad_v = nullptr;
  void *grad_a = nullptr, *grad_b = nullptr;
  float* grad_u_partial = nullptr;
  float* grad_initial_state = nullptr;
  // backward scratch, see backward_scratch_floats()
  float* snapshots = nullptr;      // [num_chunk_slots, H, N, N], each snapshot stored transposed
  float* sa = nullptr;             // [B * T, H, N]: S a_t per step (WKV-7)
  float* dsa = nullptr;            // [B * T, H, N]: its gradient (WKV-7)
  int num_sms = 1;                 // multiprocessors of the device (chooses how rows are split)
  void* stream = nullptr;          // cudaStream_t / hipStream_t to launch on
};

// Snapshot slots: sequence s uses ceil(len_s / kChunk) slots from floor(start_s / kChunk) + s on.
inline int64_t num_chunk_slots(const WkvParams& p) { return (p.B * p.T) / kChunk + p.num_seqs + 1; }

// Each returns nullptr on success, or the launch error's text.
template <class T> const char* forward(const WkvParams& p);
template <class T> const char* backward(const WkvParams& p);

}  // namespace gpu
}  // namespace arwkv
