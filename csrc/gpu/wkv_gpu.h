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

// The two algorithms (wkv_gpu_kernels.cuh: step; wkv_gpu_chunked.cuh: chunked).
enum class Algorithm { step, chunked };

// Step kernels: steps per chunk, the unit of shared-memory staging, and of the state snapshots
// the backward recomputes from (one [N, N] float32 snapshot per chunk and head).
constexpr int kChunk = 8;
// Chunked kernels: steps per chunk, the size of one tensor-core tile (16 x 16 x 16).
constexpr int kChunkSteps = 16;

// Where and how to launch.
struct Device {
  int num_sms = 1;         // multiprocessors of the device (chooses how rows are split)
  void* stream = nullptr;  // cudaStream_t / hipStream_t to launch on
  Algorithm algorithm = Algorithm::step;
};

// Device memory the kernels need besides the problem's own (float32; see scratch_sizes). The
// step forward needs none.
struct Scratch {
  float* snapshots = nullptr;       // [chunk slots, H, N, N]: the state at each chunk's start
                                    // (step kernels: transposed, [key][row])
  float* sa = nullptr;              // WKV-7: [B * T, H, N], S a_t per step
  float* dsa = nullptr;             // WKV-7: its gradient (chunked: the gradient of the solve's right side)
  float* grad_u_partial = nullptr;  // WKV-6: grad_u per sequence (step) or chunk slot (chunked), [., H, N];
                                    // the caller adds them up
  float* state_grads = nullptr;     // chunked backward: [chunk slots, H, N, N], dLoss/d(state after the chunk)
  float* chunk_operands = nullptr;  // chunked: [chunk slots, H, chunk_operand_floats]: each chunk's decayed
                                    // operands and intra-chunk matrices (wkv_gpu_chunked.cuh)
};

// Chunk slots of `steps` steps: sequence s uses ceil(len_s / steps) slots from
// floor(start_s / steps) + s on (disjoint for consecutive sequences).
inline int64_t num_chunk_slots(const WkvProblem& p, int steps) { return (p.B * p.T) / steps + p.num_seqs + 1; }
inline int64_t num_chunk_slots(const WkvProblem& p) { return num_chunk_slots(p, kChunk); }

// Floats of one chunk's operands per head (chunked kernels; layout in wkv_gpu_chunked.cuh):
// WKV-7: 4 [L, N] operands, the decay over the chunk [N], a flag (4 floats, to keep 16-byte
// alignment), 5 [L, L] matrices (one unused); WKV-6: 2, 1, 1, 1.
constexpr int64_t chunk_operand_floats(int version, int64_t N) {
  const int64_t L = kChunkSteps;
  return version == 7 ? 4 * L * N + N + 4 + 5 * L * L : 2 * L * N + N + 4 + L * L;
}

// Sizes in floats of the scratch buffers of a problem (backward: true for the backward).
struct ScratchSizes {
  int64_t snapshots, sa, dsa, grad_u_partial, state_grads, chunk_operands;
};
inline ScratchSizes scratch_sizes(const WkvProblem& p, Algorithm a, bool backward) {
  const int64_t steps = p.B * p.T * p.H * p.N;
  if (a == Algorithm::step) {
    if (!backward) return {0, 0, 0, 0, 0, 0};
    return {num_chunk_slots(p) * p.H * p.N * p.N, p.version == 7 ? steps : 0, p.version == 7 ? steps : 0,
            p.version == 6 ? p.num_seqs * p.H * p.N : 0, 0, 0};
  }
  const int64_t slots = num_chunk_slots(p, kChunkSteps), states = slots * p.H * p.N * p.N;
  const int64_t operands = slots * p.H * chunk_operand_floats(p.version, p.N);
  if (!backward) return {0, 0, 0, 0, 0, 0};  // the fused forward keeps its operands in shared memory
  return {states, p.version == 7 ? steps : 0, p.version == 7 ? steps : 0, p.version == 6 ? slots * p.H * p.N : 0,
          states, operands};
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
// d.algorithm chooses the kernels; the scratch is sized by scratch_sizes(p, d.algorithm, .).
template <class T> LaunchStatus forward(const WkvProblem& p, const Scratch& s, const Device& d);
template <class T> LaunchStatus backward(const WkvBackwardProblem& p, const Scratch& s, const Device& d);

}  // namespace gpu
}  // namespace arwkv
