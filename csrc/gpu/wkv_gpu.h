// Plain C++ interface of the GPU kernels (no ATen, no CUDA headers), shared by the kernel files,
// the torch side of the GPU backend (wkv_gpu_backend.cpp) and the C++ emulator tests. The
// problem itself is the shared description in csrc/wkv_problem.h; what is here belongs to the
// GPU backend alone: where to launch, the backward's scratch, and how a launch failed.
#pragma once

#include <stdint.h>

#include <string>

#include "../wkv_problem.h"

namespace arwkv {
namespace gpu {

// 16-bit input types as raw bits (layout-compatible with at::BFloat16 / at::Half).
struct Bf16 { uint16_t bits; };
struct F16 { uint16_t bits; };

// Steps per chunk: the unit of shared-memory staging, and of the state snapshots the backward
// recomputes from (one [N, N] float32 snapshot per chunk and head).
constexpr int kChunk = 8;

// Where and how to launch.
struct Device {
  int num_sms = 1;         // multiprocessors of the device (chooses how rows are split)
  void* stream = nullptr;  // cudaStream_t / hipStream_t to launch on
};

// Device memory the backward needs besides the problem's own (float32; see backward_scratch).
struct BackwardScratch {
  float* snapshots = nullptr;       // [num_chunk_slots, H, N, N], each snapshot stored transposed
  float* sa = nullptr;              // WKV-7: [B * T, H, N], S a_t per step
  float* dsa = nullptr;             // WKV-7: its gradient
  float* grad_u_partial = nullptr;  // WKV-6: [S, H, N], grad_u per sequence (the caller adds them up)
};

// Snapshot slots: sequence s uses ceil(len_s / kChunk) slots from floor(start_s / kChunk) + s on.
inline int64_t num_chunk_slots(const WkvProblem& p) { return (p.B * p.T) / kChunk + p.num_seqs + 1; }

// Sizes in floats of the scratch buffers of a backward problem.
struct BackwardScratchSizes {
  int64_t snapshots, sa, dsa, grad_u_partial;
};
inline BackwardScratchSizes backward_scratch(const WkvProblem& p) {
  const int64_t steps = p.B * p.T * p.H * p.N;
  return {num_chunk_slots(p) * p.H * p.N * p.N, p.version == 7 ? steps : 0, p.version == 7 ? steps : 0,
          p.version == 6 ? p.num_seqs * p.H * p.N : 0};
}

// The outcome of forward() / backward(): which kernel failed to launch, and why.
struct LaunchStatus {
  const char* error = nullptr;   // null: every launch succeeded
  const char* kernel = nullptr;  // e.g. "wkv7_backward_columns"
  const char* dtype = nullptr;   // "f32", "bf16" or "f16"
  int N = 0;
  bool ok() const { return error == nullptr; }
};

// "GPU kernel wkv7_backward_columns<bf16, N=64> launch failed: <error>"
inline std::string describe(const LaunchStatus& s) {
  return std::string("GPU kernel ") + (s.kernel ? s.kernel : "?") + "<" + (s.dtype ? s.dtype : "?") +
         ", N=" + std::to_string(s.N) + "> launch failed: " + (s.error ? s.error : "no error");
}

// T: float, Bf16 or F16, the problem's dtype (float64 has no GPU kernels).
template <class T> LaunchStatus forward(const WkvProblem& p, const Device& d);
template <class T> LaunchStatus backward(const WkvBackwardProblem& p, const BackwardScratch& s, const Device& d);

}  // namespace gpu
}  // namespace arwkv
