// Plain C++ interface of the CPU WKV kernels. No ATen here: the kernels build and are
// tested without torch (CMakeLists.txt), and csrc/wkv_ops.cpp adapts torch tensors to it.
//
// Layout conventions (the public contract of torch.ops.arwkv.wkv7 / wkv6):
//   inputs r, w, k, v, a, b: contiguous [B, T, H, N]; w = log(decay) <= 0
//   u (WKV-6): [H, N]
//   state: [S, H, N, N] with S[s, h, i, j], i = value index, j = key index, float32
//   (float64 for float64 inputs). S = B, or the number of packed sequences (cu_seqlens).
#pragma once

#include <cstdint>

namespace arwkv::cpu {

enum class DType { f32, f64, bf16, f16 };
enum class Isa { baseline, avx2, avx512 };

// Runs fn(ctx, begin, end) over [0, n) on the caller's thread pool (at::parallel_for in the
// extension, a serial loop in the C++ test). Plain function pointers, not std::function, so
// the per-ISA kernel files instantiate no standard-library templates.
using TaskFn = void (*)(void* ctx, int64_t begin, int64_t end);
struct ParallelFor {
  void* self = nullptr;
  void (*run)(void* self, int64_t n, void* ctx, TaskFn fn) = nullptr;
  void operator()(int64_t n, void* ctx, TaskFn fn) const { run(self, n, ctx, fn); }
};

struct WkvArgs {
  int version = 7;  // 7 or 6
  DType dtype = DType::f32;
  int64_t B = 0, T = 0, H = 0, N = 0;
  const int64_t* cu_seqlens = nullptr;  // [num_seqs + 1] offsets along T (B == 1), or null
  int64_t num_seqs = 0;                 // B without cu_seqlens
  const void *r = nullptr, *w = nullptr, *k = nullptr, *v = nullptr;
  const void *a = nullptr, *b = nullptr;  // WKV-7 only
  const void* u = nullptr;                // WKV-6 only, [H, N]
  const void* initial_state = nullptr;    // state dtype [S, H, N, N], null = zeros
  int num_threads = 1;                    // used to decide how finely to split work
};

struct WkvForwardOut {
  void* y = nullptr;            // input dtype [B, T, H, N]
  void* final_state = nullptr;  // state dtype [S, H, N, N]
};

// Gradients come out in the state dtype (float32 / float64). The per-key-column gradients
// (dr, dw, dk and, for WKV-7, da, db) are sums over value rows; when the rows of one head are
// split across threads, each split writes its own partial copy and the caller adds them up.
struct WkvBackwardIO {
  const void* grad_y = nullptr;       // input dtype [B, T, H, N], null = zeros
  const void* grad_state = nullptr;   // state dtype [S, H, N, N], null = zeros
  void* grad_columns[5] = {};         // r, w, k and (WKV-7) a, b: each [splits, B, T, H, N]
  void* grad_v = nullptr;             // [B, T, H, N]
  void* grad_initial_state = nullptr; // [S, H, N, N]
  void* grad_u = nullptr;             // WKV-6: [splits, S, H, N] partial sums
};

// How many row splits the backward of this problem uses (the leading size of grad_columns).
int64_t row_splits(const WkvArgs& args);

void forward(const WkvArgs& args, const WkvForwardOut& out, const ParallelFor& pf);
void backward(const WkvArgs& args, const WkvBackwardIO& io, const ParallelFor& pf);

// Instruction set used by the calls above: the best the CPU supports, or the one named by
// the environment variable ARWKV_CPU_ISA (baseline | avx2 | avx512) when it is set.
Isa active_isa();
const char* isa_name(Isa isa);
bool isa_supported(Isa isa);
bool isa_compiled(Isa isa);

// One instantiation per instruction set (csrc/cpu/wkv_cpu_<isa>.cpp).
#define ARWKV_DECLARE_ISA(ns)                                                      \
  namespace ns {                                                                   \
  void forward(const WkvArgs& args, const WkvForwardOut& out, const ParallelFor& pf); \
  void backward(const WkvArgs& args, const WkvBackwardIO& io, const ParallelFor& pf); \
  }
ARWKV_DECLARE_ISA(baseline)
ARWKV_DECLARE_ISA(avx2)
ARWKV_DECLARE_ISA(avx512)
#undef ARWKV_DECLARE_ISA

}  // namespace arwkv::cpu
