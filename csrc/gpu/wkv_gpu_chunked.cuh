// Chunked WKV-7 and WKV-6 GPU kernels: the matrix form of arwkv_ext/chunked_reference.py (its
// docstring derives every formula used here), with the products on tensor cores (the tile layer
// of wkv_gpu_compat.h; split bf16 operands, so products are good to ~2^-16 of fp32) and the
// state in fp32. Included by wkv_gpu_kernels.cuh, which dispatches to it.
//
// A chunk is L = 16 steps (one tile); the last one of a sequence is padded with identity steps
// (decay 1, zero operands). Sequence s's chunk c has the scratch slot floor(bos_s / L) + s + c.
// Every decay factor is exp2(G_t - G_s) for t >= s, G_t = log2(e) (w_0 + ... + w_t) inside the chunk
// (base 2: one hardware 2^x per factor): a decay over a sub-interval of the chunk (<= 1), never a
// quotient of cumulative decays. Where every key's decay over the chunk is >= 2^-kFactorLimit the
// factor is taken as exp2(G_t) * exp2(-G_s), both normal floats, so the L x L matrices and the
// per-chunk gradients are tile products; stronger decays take the pairwise form: any decay is exact.
// The forward is one kernel:
//  - fused forward (one block per (sequence, head), a warp / wave per 16 value rows; serial over
//    chunks): each chunk's operands and L x L matrices built in shared memory, then each warp
//    advances its rows of the state, held in registers: outputs and the final state.
// The backward, by what each kernel depends on:
//  1. saves: the fused forward again (SAVES), which instead of outputs stores each chunk's decayed
//     operands, decay over the chunk, L x L matrices and (WKV-7) the inverse of the unit
//     lower-triangular I - A_ab (split, SplitBits) in the chunk's scratch slot, the state at each
//     chunk start and (WKV-7) S a_t per step.
//  2. state-grad (one warp / wave per 16 value rows of a (sequence, head); chunks in reverse):
//     value rows are independent given the chunk operands, so each block carries a 16 x N band of
//     dLoss/dstate back through the chunks with tensor-core products only: the state gradient
//     after each chunk, grad_v, and (WKV-7) the gradient of the solve's right side per step;
//     grad_initial_state at the end.
//  3. grads (one block per chunk slot and head; parallel over the whole sequence): the gradients of
//     r, w, k, a, b (u) of one chunk from its start state, the state gradient after it and the
//     per-step vectors of 1 and 2, as tile products with the decays, then dw as a reverse
//     cumulative sum inside the chunk.
// Every output element is written by one thread, and sums have a fixed order: deterministic.
#pragma once

#include "wkv_gpu_compat.h"

namespace arwkv {
namespace gpu {
namespace chunked {

constexpr int L = kChunkSteps;
constexpr float kLog2e = 1.4426950408889634f;  // log2(e): the cumulative log decays are kept in base 2
static_assert(L == 16, "a chunk is one 16 x 16 tile");
// A decay factor exp2(G_t - G_s) (s <= t) may be taken as the product exp2(G_t) * exp2(-G_s) of
// two per-step factors when neither over- nor underflows: when the decay over the whole chunk,
// exp2(G_{L-1}), is at least 2^-kFactorLimit for every key. Then the L x L matrices and
// the per-chunk gradients are tensor-core products of per-step scaled operands (O(L N) factors
// instead of O(L^2 N)); each term is the same product as the pairwise form's, to rounding (the
// factors and the split operands stay normal floats: 2^-96 * 2^-17 > 2^-126). Real models' decays
// (>= e^-0.61 per step: >= 2^-14 per chunk) always factor; stronger ones take the exact pairwise
// form. Entries above the diagonal (s > t) have factors up to 2^96 and are discarded by a select.
constexpr float kFactorLimit = 96.f;
// Shared-memory arrays that the tile layer reads have their rows padded. With a leading dimension
// a multiple of 32 words every row starts in the same bank, and a gather (CUDA: 8 rows x 4 column
// pairs per register; gfx942: 16 rows x 4 columns) hits 4 banks up to 8 ways deep. Padded, the
// rows' starts spread over the banks (the emulator counts the conflicts: test_wkv_gpu_emulated
// --banks, which the GPU model reads). On gfx942 4 words make every tile access conflict-free; on
// CUDA 8 suit the 8-byte loads along rows and accumulator pairs, 4 the 4-byte loads down columns
// (2 rows a lane), each 2 ways deep for the other kind.
// CUDA gives a block at most 48 KB of static shared memory: at N = 128 the fused forward's row
// operands and matrices take 4 words and the grads kernel's per-warp rows none, to fit.
constexpr int kPad = kWarpSize == 64 ? 4 : 8;
template <int N>
constexpr bool kTight = kWarpSize == 32 && N >= 128;
template <int N>
constexpr int kAccLd = N + kPad;  // [.][N] arrays read as accumulators and along rows
template <int N>
constexpr int kRowLd = N + (kTight<N> ? 4 : kPad);  // the chunk's row operands r~, a~ (read along rows)
template <int N>
constexpr int kColLd = N + 4;  // its column operands k, b (read down, by every warp, and along)
template <int N>
constexpr int kMatLd = L + (kTight<N> ? 4 : kPad);  // L x L matrices
// [L][16] per-step rows of a band, read as accumulators (gfx942: unpadded, so that the grads kernel
// fits 3 blocks per CU at N <= 64, its tile accesses of these 2 ways deep; with 2, its serial
// chain had too few waves to hide behind)
template <int N>
constexpr int kBandLd = 16 + (kTight<N> || kWarpSize == 64 ? 0 : kPad);
constexpr int kDownLd = 16 + 4;  // [L][16] rows that products read only down their columns
constexpr size_t kStaticSharedLimit = kWarpSize == 32 ? 48 * 1024 : 64 * 1024;

// grads: one warp / wave per L x L matrix (4), and one per 16-key tile, so the kernel has no loop
// over key tiles (with one, at N = 128 gfx942 kept too many values across it and spilled
// scalar registers)
template <int N>
constexpr int grad_warps() { return N / 16 > 4 ? N / 16 : 4; }

// Where one chunk's operands lie in its chunk_operands slot (4-byte elements from the slot's
// start, per head; each stored split, SplitBits, but gam and flag, floats; every array 16-byte
// aligned). The arrays are FusedShared's, in its order (there with rows padded: copy_operands):
//   rt  [L][N]  WKV-7: r~_t = r_t E[t, -1];  WKV-6: r'_t = r_t E[t-1, -1]
//   at  [L][N]  a~_t = a_t E[t-1, -1]                                          (WKV-7)
//   ck  [L][N]  k_s exp2(-G_s) if the chunk factors (flag 1), else k^_s = k_s E[L-1, s]
//   cb  [L][N]  b_s as ck has k_s                                              (WKV-7)
//   arb, ark, (A_ab: unused), aak [L][L]  WKV-7: A_rb, A_rk, A_ak;  WKV-6: ark, A with the bonus
//                                          r_t . (u * k_t) on its diagonal
//   inv [L][L]  (I - A_ab)^-1                                                  (WKV-7)
//   gam [N]     the decay over the chunk, E[L-1, -1];  flag: 1 if the chunk factors (then 3 unused)
template <int V, int N>
struct Operands {
  static constexpr int rt = 0, at = L * N;  // (at: WKV-7)
  static constexpr int ck = (V == 7 ? 2 : 1) * L * N, cb = ck + L * N;  // (cb: WKV-7)
  static constexpr int mats = (V == 7 ? 4 : 2) * L * N;  // (after the [L][N] arrays)
  static constexpr int arb = mats, ark = V == 7 ? mats + L * L : mats, aak = mats + 3 * L * L;
  static constexpr int inv = mats + 4 * L * L;
  static constexpr int gam = V == 7 ? inv + L * L : mats + L * L, flag = gam + N;
  static constexpr int size = flag + 4;
  static_assert(size == chunk_operand_floats(V, N), "the host's scratch size (wkv_gpu.h) matches");
};

struct Chunk {
  int seq = -1;         // its sequence (-1: an unused slot)
  int index = 0;        // its number within the sequence
  int steps = 0;        // real steps in it (the rest is padding)
  int64_t first = 0;    // its first token in the flattened [B * T] token axis
  int num_chunks = 0;   // chunks of the sequence
  int seq_len = 0;      // steps of the sequence
  int64_t slot = 0;     // its scratch slot
};

__device__ __forceinline__ int64_t seq_start(const WkvProblem& p, int s) {
  return p.cu_seqlens ? p.cu_seqlens[s] : int64_t(s) * p.T;
}
__device__ __forceinline__ int64_t first_slot(const WkvProblem& p, int s) { return seq_start(p, s) / L + s; }

// Chunk c of sequence s.
__device__ __forceinline__ Chunk chunk_of(const WkvProblem& p, int s, int c) {
  Chunk k;
  k.seq = s, k.index = c;
  const int64_t bos = seq_start(p, s);
  const int len = int(seq_start(p, s + 1) - bos);
  k.num_chunks = (len + L - 1) / L;
  k.seq_len = len;
  k.steps = min(L, len - c * L);
  k.first = bos + int64_t(c) * L;
  k.slot = bos / L + s + c;
  return k;
}

// Chunk c of chunk k's sequence, from k alone: the serial loops read the sequence's bounds once
// (cu_seqlens, from memory) rather than on every chunk's path.
__device__ __forceinline__ Chunk chunk_of(Chunk k, int c) {
  k.first += int64_t(c - k.index) * L, k.slot += c - k.index, k.index = c;
  k.steps = min(L, k.seq_len - c * L);
  return k;
}

// The chunk that owns scratch slot x (seq -1: none). Sequences' first slots increase with s.
__device__ __forceinline__ Chunk chunk_at_slot(const WkvProblem& p, int64_t x) {
  int lo = 0, hi = int(p.num_seqs) - 1;
  while (lo < hi) {  // the last sequence whose first slot is <= x
    const int mid = (lo + hi + 1) / 2;
    if (first_slot(p, mid) <= x) lo = mid;
    else hi = mid - 1;
  }
  Chunk k = chunk_of(p, lo, int(x - first_slot(p, lo)));
  if (x < first_slot(p, lo) || k.index >= k.num_chunks) k.seq = -1;
  return k;
}

// Whether the inputs r, w, k (, a, b) are 16-byte aligned, as the chunk kernels need (then so is
// every row of them: H * N * sizeof(T) is a multiple of 16 for N >= 16). The op's adapter makes
// aligned copies of inputs that are not; the launcher refuses others.
inline bool inputs_aligned(const WkvProblem& p) {
  const bool v7 = p.version == 7;
  return ((reinterpret_cast<uintptr_t>(p.r) | reinterpret_cast<uintptr_t>(p.w) | reinterpret_cast<uintptr_t>(p.k) |
           reinterpret_cast<uintptr_t>(v7 ? p.a : p.r) | reinterpret_cast<uintptr_t>(v7 ? p.b : p.r)) &
          15u) == 0;
}

// The chunk kernels read their inputs in groups of consecutive keys of one step, one group per
// thread: 8 keys (a 16-byte load of 16-bit inputs) with CUDA, 4 with gfx942, so that the fused
// forward's 2N (CUDA) or 4N (gfx942) threads have one each.
constexpr int kGroupKeys = kWarpSize == 64 ? 4 : 8;

// Keys j0 .. j0 + kGroupKeys - 1 of a step (x + off) as floats, one vector load (the inputs are
// 16-byte aligned: inputs_aligned); 0 on padded steps.
template <class T>
__device__ __forceinline__ void load_keys(const T* x, int off, bool real, float (&out)[kGroupKeys]) {
  if (real) {
    load_vec(x + off, out);
  } else {
#pragma unroll
    for (int i = 0; i < kGroupKeys; ++i) out[i] = 0.f;
  }
}

// G[t][j] = log2(e) (w_0 + ... + w_t) of the chunk's steps at key j (w = 0 on padded steps) into
// shared memory (w: the chunk's step 0, key 0; step t at t * ldi). Base 2, so that each decay
// factor is one exp2f of a difference (one hardware 2^x, where expf would first scale its
// argument). CUDA: one thread per key loads its steps (a warp's loads of one step are consecutive
// keys) and sums them in registers, so shared memory sees only the results. gfx942 (whose chunk
// kernels are bound by their serial chain rather than by issue or shared memory, and came out
// slower that way): every thread loads a group of keys of one step (16 bytes), stages them
// in shared memory, then one thread per key sums them there.
template <class T, int N, int THREADS, int LD = N>
__device__ __forceinline__ void cumulative_log_decays(const T* w, int ldi, int steps, float (*G)[LD]) {
#if defined(ARWKV_HIP)
  constexpr int GK = kGroupKeys, kGroups = L * N / GK;
  for (int grp = threadIdx.x; grp < kGroups; grp += THREADS) {
    const int q = grp / (N / GK), j0 = grp % (N / GK) * GK;
    float x[GK];
    load_keys(w, q * ldi + j0, q < steps, x);
#pragma unroll
    for (int i = 0; i < GK; ++i) G[q][j0 + i] = kLog2e * x[i];
  }
  __syncthreads();
  for (int j = threadIdx.x; j < N; j += THREADS) {
    float acc = 0.f;
#pragma unroll
    for (int t = 0; t < L; ++t) G[t][j] = acc += G[t][j];
  }
#else
  // steps loaded at once (all L at once, sm_90a's WKV-6 grads spilled)
  constexpr int kPart = L / 2;
  for (int j = threadIdx.x; j < N; j += THREADS) {
    float acc = 0.f;
#pragma unroll 1
    for (int t0 = 0; t0 < L; t0 += kPart) {
      float x[kPart];
#pragma unroll
      for (int i = 0; i < kPart; ++i) x[i] = t0 + i < steps ? to_float(w[(t0 + i) * ldi + j]) : 0.f;
#pragma unroll
      for (int i = 0; i < kPart; ++i) G[t0 + i][j] = acc += kLog2e * x[i];
    }
  }
#endif
  __syncthreads();
}

// Whether the chunk factors: every key's G_{L-1}[j] >= -kFactorLimit (g_last: N floats). The same
// answer in every thread of the block; `flag` is a shared int; every thread takes part.
template <int N, int THREADS>
__device__ __forceinline__ bool chunk_factors(const float* g_last, int* flag) {
  if (threadIdx.x == 0) *flag = 1;
  __syncthreads();
  for (int j = threadIdx.x; j < N; j += THREADS)
    if (!(g_last[j] >= -kFactorLimit)) *flag = 0;
  __syncthreads();
  return *flag != 0;
}

// Column c of (I - A)^-1 for a strictly lower-triangular L x L matrix A (float, row-major, in
// shared memory, 16-byte aligned), by forward substitution: X[q] = I[q][c] + sum_{u < q} A[q][u] X[u]
// (so X[q] = 0 for q < c); emit(q, X[q]) for each row. Four columns u at a time: once X of the
// four before them is known, every later row takes its four terms from one 16-byte load. Each
// row's additions are those of the row-by-row solve, in the same order (the same bits); what
// changes is the order the instructions come in: every later row's four multiply-adds of a group
// are independent of the other rows', so an in-order issue overlaps them, where row by row each
// row's q dependent multiply-adds came back to back. I is read from
// `eye` (float, shared memory): compared with c in registers, gfx942 kept the 16 comparisons'
// lane masks live across the fused forward's chunk loop and ran out of scalar registers.
template <class Emit>
__device__ __forceinline__ void unit_lower_inverse_column(const float* a, const float* eye, int ld, int c, Emit emit) {
  float x[L];
#pragma unroll
  for (int q = 0; q < L; ++q) x[q] = eye[q * ld + c];
#pragma unroll
  for (int u0 = 0; u0 < L; u0 += 4)
#pragma unroll
    for (int q = u0 + 1; q < L; ++q) {  // (rows u0 + 1 .. u0 + 3 in order: each needs the ones before)
      float a4[4];
      load_vec(a + q * ld + u0, a4);
#pragma unroll
      for (int u = u0; u < u0 + 4; ++u)
        if (u < q) x[q] = fmaf(a4[u - u0], x[u], x[q]);
    }
#pragma unroll
  for (int q = 0; q < L; ++q) emit(q, x[q]);
}

// Element e of this lane's accumulator tile, where e is not known at compile time (a loop kept
// rolled): selected, so that the tile stays in registers.
__device__ __forceinline__ float tile_element(const TileAcc& acc, int e) {
  float x = acc.x[0];
#pragma unroll
  for (int i = 1; i < kTileAcc; ++i) x = i == e ? acc.x[i] : x;
  return x;
}

// An accumulator tile (columns = keys) times diag(gamma) for its 16 keys.
__device__ __forceinline__ void scale_columns(TileAcc& st, const float* gamma) {
#pragma unroll
  for (int e = 0; e < kTileAcc; ++e) st.x[e] *= gamma[TileAcc::col(e)];
}

// Rows t < steps of an accumulator tile (row t = step, column = value row) to a [B * T, H, N]
// tensor of T (or of split floats, SplitBits): dst points at (the chunk's first step, the band's
// first value row), step_stride is H * N. Padded steps are not written.
template <class T>
__device__ __forceinline__ void store_steps(T* dst, int64_t step_stride, int steps, const TileAcc& acc) {
#pragma unroll
  for (int e = 0; e < kTileAcc; ++e) {
    if (TileAcc::row(e) >= steps) continue;
    const int64_t at = int64_t(TileAcc::row(e)) * step_stride + TileAcc::col(e);
    if constexpr (std::is_same_v<T, SplitBits>) dst[at] = split_bits(acc.x[e]);
    else store<T>(dst, at, acc.x[e]);
  }
}

// The state-gradient pass loads a chunk's per-step inputs into registers before the barrier that
// frees their shared copies, so that the loads are under way while it stores its state gradient
// for the chunk, and writes them to shared memory after it.
// The band's [L][16] rows of a [B * T, H, N] tensor x (x + row0: step 0, the band's first value
// row; 0 on padded steps and where x is null): element lane + m * warp of the rows in register m.
constexpr int kBandRowRegs = L * 16 / kWarpSize;
template <class T>
__device__ __forceinline__ void load_band_rows(const void* x, int64_t row0, int64_t ld, int steps,
                                               float (&out)[kBandRowRegs]) {
#pragma unroll
  for (int m = 0; m < kBandRowRegs; ++m) {
    const int t = (threadIdx.x + m * kWarpSize) / 16, i = (threadIdx.x + m * kWarpSize) % 16;
    out[m] = t < steps && x ? load<T>(x, row0 + int64_t(t) * ld + i) : 0.f;
  }
}
__device__ __forceinline__ void store_band_rows(const float (&in)[kBandRowRegs], float (*rows)[kDownLd]) {
#pragma unroll
  for (int m = 0; m < kBandRowRegs; ++m) {
    const int t = (threadIdx.x + m * kWarpSize) / 16, i = (threadIdx.x + m * kWarpSize) % 16;
    rows[t][i] = in[m];
  }
}
// The chunk's decay (gamma: N floats) at this lane's keys (lane + j * warp) % N, in register j.
template <int N>
constexpr int kLaneKeys = N > kWarpSize ? N / kWarpSize : 1;
template <int N>
__device__ __forceinline__ void load_lane_decays(const float* gamma, float (&out)[kLaneKeys<N>]) {
#pragma unroll
  for (int j = 0; j < kLaneKeys<N>; ++j) out[j] = gamma[(threadIdx.x + j * kWarpSize) % N];
}
template <int N>
__device__ __forceinline__ void store_lane_decays(const float (&in)[kLaneKeys<N>], float* gam) {
#pragma unroll
  for (int j = 0; j < kLaneKeys<N>; ++j)
    if (threadIdx.x + j * kWarpSize < N) gam[threadIdx.x + j * kWarpSize] = in[j];
}

// ---- 2. state-grad: dLoss/dstate walking back, grad_v, (WKV-7) the solve's gradient ---------
// CUDA: up to N = 64 at most 128 registers, so that 16 one-warp blocks fit a unit (all of (8,
// 4096, 64, 64)'s at once: one more register and the last of them would wait for a second wave).
#if defined(ARWKV_HIP)
#define ARWKV_STATE_GRAD_BOUNDS(N) __launch_bounds__(kWarpSize)
#else
#define ARWKV_STATE_GRAD_BOUNDS(N) __launch_bounds__(kWarpSize, N <= 64 ? 16 : 1)
#endif
template <class T, int V, int N>
__global__ void ARWKV_STATE_GRAD_BOUNDS(N) wkv_chunk_state_grad_kernel(const WkvBackwardProblem p, const Scratch sc) {
  using Op = Operands<V, N>;
  constexpr int KT = N / 16;
  __shared__ float dS[16][kAccLd<N>];  // dLoss/dS for this band's rows, for the state after the chunk
  __shared__ float dys[L][kDownLd];
  __shared__ float dsas[V == 7 ? L : 1][kDownLd], dzs[V == 7 ? L : 1][kDownLd];
  __shared__ float gam[N];  // the chunk's decay
  const int i0 = blockIdx.x * 16, h = blockIdx.y, s = blockIdx.z;
  const int64_t H = p.H;
  const float* gs = static_cast<const float*>(p.grad_state);
  const int64_t state0 = ((int64_t(s) * H + h) * N + i0) * N;
  for (int idx = threadIdx.x; idx < 16 * N; idx += kWarpSize) dS[idx / N][idx % N] = gs ? gs[state0 + idx] : 0.f;

  const Chunk k0 = chunk_of(p, s, 0);
  for (int c = k0.num_chunks - 1; c >= 0; --c) {
    const Chunk k = chunk_of(k0, c);
    const SplitBits* op = reinterpret_cast<const SplitBits*>(sc.chunk_operands + (k.slot * H + h) * Op::size);
    const float* gamma = sc.chunk_operands + (k.slot * H + h) * Op::size + Op::gam;
    const int64_t row0 = (k.first * H + h) * N + i0;
    constexpr int kG = kLaneKeys<N>;
    float dyr[kBandRowRegs], gk[kG];
    load_band_rows<T>(p.grad_y, row0, H * N, k.steps, dyr);
    load_lane_decays<N>(gamma, gk);
    const bool factored = gamma[Op::flag - Op::gam] != 0.f;
    __syncthreads();  // the previous chunk is done with dS, dys, dsas, dzs and gam
    // the state gradient after the chunk, stored; where the chunk factors, b^ dS^T = B' (dS
    // diag(gamma))^T: dS is scaled as it is stored, which also starts the gradient before the chunk.
    // A lane's element u is idx = lane + u warp, at key idx % N, whose decay is gk[u % kG]. A
    // group of them is loaded before any is stored: a store to dS between two loads held the
    // second back (the compiler could not tell their addresses apart), and a loop of a few
    // elements a trip waited for each trip's stores. All in one group, but for CUDA up to N = 64
    // (two: in one, with 128 registers, ptxas spilled).
    constexpr int kPerLane = 16 * N / kWarpSize, kGroup = kWarpSize == 32 && N <= 64 ? kPerLane / 2 : kPerLane;
    SplitBits* dS_after = reinterpret_cast<SplitBits*>(sc.state_grads) + (k.slot * H + h) * N * N + int64_t(i0) * N;
#pragma unroll 1
    for (int u0 = 0; u0 < kPerLane; u0 += kGroup) {
      float d[kGroup];
#pragma unroll
      for (int u = 0; u < kGroup; ++u) {
        const unsigned idx = threadIdx.x + unsigned(u0 + u) * kWarpSize;
        d[u] = dS[idx / N][idx % N];
      }
#pragma unroll
      for (int u = 0; u < kGroup; ++u) {
        const unsigned idx = threadIdx.x + unsigned(u0 + u) * kWarpSize;
        dS_after[idx] = split_bits(d[u]);
        if (factored) dS[idx / N][idx % N] = d[u] * gk[u % kG];
      }
    }
    store_band_rows(dyr, dys);
    store_lane_decays<N>(gk, gam);
    __syncthreads();

    if (V == 7) {
      // dSA = A_rb^T dY + b^ dS^T;  dZ = (I - A_ab)^-T dSA
      TileAcc dsa = mma_split(load_split_a_transposed(op + Op::arb, L), load_split_b(&dys[0][0], kDownLd), fill_tile_acc(0.f));
#pragma unroll
      for (int kt = 0; kt < KT; ++kt)
        dsa = mma_split(load_split_a(op + Op::cb + kt * 16, N), load_split_b_transposed(&dS[0][kt * 16], kAccLd<N>), dsa);
      store_tile_acc(&dsas[0][0], kDownLd, dsa);
      __syncthreads();
      const TileAcc dz =
          mma_split(load_split_a_transposed(op + Op::inv, L), load_split_b(&dsas[0][0], kDownLd), fill_tile_acc(0.f));
      store_tile_acc(&dzs[0][0], kDownLd, dz);
      store_steps(reinterpret_cast<SplitBits*>(sc.dsa) + row0, H * N, k.steps, dz);
      __syncthreads();
    }
    // dV = A_rk^T dY + k^ dS^T (+ A_ak^T dZ)
    TileAcc dv = mma_split(load_split_a_transposed(op + Op::ark, L), load_split_b(&dys[0][0], kDownLd), fill_tile_acc(0.f));
#pragma unroll
    for (int kt = 0; kt < KT; ++kt)
      dv = mma_split(load_split_a(op + Op::ck + kt * 16, N), load_split_b_transposed(&dS[0][kt * 16], kAccLd<N>), dv);
    if (V == 7) dv = mma_split(load_split_a_transposed(op + Op::aak, L), load_split_b(&dzs[0][0], kDownLd), dv);
    store_steps<T>(static_cast<T*>(p.grad_v) + row0, H * N, k.steps, dv);
    __syncthreads();  // every lane has read dS

    // dS (for the state before the chunk) = dS diag(gamma) + dY^T r~ (+ dZ^T a~)
#pragma unroll
    for (int kt = 0; kt < KT; ++kt) {
      TileAcc st = load_tile_acc(&dS[0][kt * 16], kAccLd<N>);
      if (!factored) scale_columns(st, gam + kt * 16);
      st = mma_split(load_split_a_transposed(&dys[0][0], kDownLd), load_split_b(op + Op::rt + kt * 16, N), st);
      if (V == 7) st = mma_split(load_split_a_transposed(&dzs[0][0], kDownLd), load_split_b(op + Op::at + kt * 16, N), st);
      store_tile_acc(&dS[0][kt * 16], kAccLd<N>, st);
    }
  }
  __syncthreads();
  float* grad_s0 = static_cast<float*>(p.grad_initial_state);
  if (grad_s0)
    for (int idx = threadIdx.x; idx < 16 * N; idx += kWarpSize) grad_s0[state0 + idx] = dS[idx / N][idx % N];
}

// ---- 3. grads: r, w, k, a, b (u) of one chunk ------------------------------------------------

// P = X Y^T over the value rows: P[t][s] = sum_i X[t][i] Y[s][i] (X, Y: [L][N] per-step vectors
// with leading dimension ld, rows past `steps` zero).
// The sums over value-row tiles are unrolled where registers allow: gfx942 up to N = 64 (each
// trip otherwise waits for its loads from memory); unrolled, the loads of all tiles are hoisted,
// and the CUDA grads kernel spilled at N = 128.
template <int N>
constexpr int kRowTileUnroll = kWarpSize == 64 && N <= 64 ? N / 16 : 1;
template <int N, class X, class Y>
__device__ __forceinline__ TileAcc step_pairs(const X* x, const Y* y, int64_t ld, int steps) {
  TileAcc acc = fill_tile_acc(0.f);
#pragma unroll kRowTileUnroll<N>
  for (int it = 0; it < N / 16; ++it)
    acc = mma_split(load_split_a(x + it * 16, ld, steps), load_split_b_transposed(y + it * 16, ld, steps), acc);
  return acc;
}
// P = X M for key tile kt: P[t][j] = sum_i X[t][i] M[i][j] (M: [N][N] row-major state, split).
template <int N, class X>
__device__ __forceinline__ TileAcc times_state(const X* x, int64_t ld, int steps, const SplitBits* m, int kt) {
  TileAcc acc = fill_tile_acc(0.f);
#pragma unroll kRowTileUnroll<N>
  for (int it = 0; it < N / 16; ++it)
    acc = mma_split(load_split_a(x + it * 16, ld, steps), load_split_b(m + it * 16 * N + kt * 16, N), acc);
  return acc;
}

// The grads kernel's per-warp [L][16] tiles in shared memory: 4, or on gfx942 3, which keeps the
// fourth (S a_t dS1, only read) in registers, for LDS (see kBandLd). (On CUDA, where shared memory
// does not limit it, the tile in registers made ptxas spill at N = 128.)
constexpr int kGradTiles = kWarpSize == 64 ? 3 : 4;
template <class T, int V, int N>
__global__ void __launch_bounds__(grad_warps<N>() * kWarpSize) wkv_chunk_grads_kernel(const WkvBackwardProblem p,
                                                                                   const Scratch sc) {
  constexpr int WARPS = grad_warps<N>(), THREADS = WARPS * kWarpSize, KT = N / 16;
  __shared__ float G[L][kAccLd<N>];  // (padded: read in the lane pattern of an accumulator tile)
  // WKV-7: dA_rb, dA_rk, dA_ab, dA_ak;  WKV-6: dA (index 1), masked to where A is defined, and
  // (index 0) its part below the diagonal
  __shared__ float dA[4][L][kMatLd<N>];
  // per warp, for its key tile: first the four products over the value rows (kGradTiles of them),
  // then (each lane in place of its own elements) the parts of dG known at (t, j): of dG_t, of
  // dG_{t-1}, and of dG_{L-1} (those reach every step's dw). (Through shared memory, the
  // element-wise loop needs no register arrays, which unrolled made gfx942 spill scalar registers.)
  __shared__ float wt[WARPS][kGradTiles][L][kBandLd<N>];
  static_assert(sizeof(G) + sizeof(dA) + sizeof(wt) <= kStaticSharedLimit, "static shared memory");
  const Chunk k = chunk_at_slot(p, blockIdx.x);
  if (k.seq < 0) {  // an unused slot: nothing to add to grad_u (the caller sums all slots)
    if (V == 6)
      for (int j = threadIdx.x; j < N; j += THREADS) sc.grad_u_partial[(int64_t(blockIdx.x) * p.H + blockIdx.y) * N + j] = 0.f;
    return;
  }
  const int h = blockIdx.y, warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t H = p.H, ld = H * N, row0 = (k.first * H + h) * N;
  const int n = k.steps, gy_steps = p.grad_y ? n : 0;
  const T* gy = static_cast<const T*>(p.grad_y) + (p.grad_y ? row0 : 0);
  const T* v = static_cast<const T*>(p.v) + row0;
  // what the state passes wrote, split (SplitBits): S a_t and the solve's gradient per step, the
  // state at the chunk start and dLoss/d(state after the chunk)
  const SplitBits* sa = V == 7 ? reinterpret_cast<const SplitBits*>(sc.sa) + row0 : nullptr;
  const SplitBits* dz = V == 7 ? reinterpret_cast<const SplitBits*>(sc.dsa) + row0 : nullptr;
  const SplitBits* S0 = reinterpret_cast<const SplitBits*>(sc.snapshots) + (k.slot * H + h) * N * N;
  const SplitBits* dS1 = reinterpret_cast<const SplitBits*>(sc.state_grads) + (k.slot * H + h) * N * N;
  // the chunk's operands as the saves pass wrote them: where the chunk factors (its flag), the
  // per-step scaled inputs the products below take (r~, a~, and k, b times exp2(-G_s))
  using Op = Operands<V, N>;
  const float* slot = sc.chunk_operands + (k.slot * H + h) * Op::size;
  const SplitBits* op = reinterpret_cast<const SplitBits*>(slot);
  cumulative_log_decays<T, N, THREADS, kAccLd<N>>(static_cast<const T*>(p.w) + row0, int(ld), n, G);
  const bool factored = slot[Op::flag] != 0.f;

  // The L x L gradients, one per warp: dY SA^T, dY V^T, dZ SA^T, dZ V^T (s <= t for the r-rows,
  // s < t for the a-rows); WKV-6: dY V^T (s <= t: its diagonal is the bonus's).
  if (V == 7 ? warp < 4 : warp == 1) {
    TileAcc m = warp == 0   ? step_pairs<N>(gy, sa, ld, gy_steps)
                : warp == 1 ? step_pairs<N>(gy, v, ld, gy_steps)
                : warp == 2 ? step_pairs<N>(dz, sa, ld, n)
                            : step_pairs<N>(dz, v, ld, n);
#pragma unroll
    for (int e = 0; e < kTileAcc; ++e) {
      const int t = TileAcc::row(e), s = TileAcc::col(e);
      dA[warp][t][s] = (warp < 2 ? s <= t : s < t) ? m.x[e] : 0.f;
      if (V == 6) dA[0][t][s] = s < t ? m.x[e] : 0.f;  // without the bonus's diagonal
    }
  }
  __syncthreads();

  const T* r = static_cast<const T*>(p.r) + row0;
  const T* kk = static_cast<const T*>(p.k) + row0;
  const T* a = static_cast<const T*>(V == 7 ? p.a : p.r) + row0;
  const T* b = static_cast<const T*>(V == 7 ? p.b : p.r) + row0;
  // input x at (step t, key j) of the chunk, for t < n (padded steps have zero inputs, so the
  // loops below stop at n rather than test each step)
  auto input = [&](const T* x, int t, int j) { return to_float(x[int64_t(t) * ld + j]); };
  float(*here)[kBandLd<N>] = wt[warp][0];     // dY S0 first
  float(*all)[kBandLd<N>] = wt[warp][1];      // V dS1 first
  float(*before_)[kBandLd<N>] = wt[warp][2];  // dZ S0 first (WKV-7)
  // SA dS1 (WKV-7): with 4 tiles in shared memory (sads_rows, read after its product), with 3 in
  // registers (a lane's element e at (t, c) is sads.x[e])
  TileAcc sads = fill_tile_acc(0.f);
  float(*sads_rows)[kBandLd<N>] = wt[warp][kGradTiles - 1];
  // this warp's key tile, if it has one
  const int kt = warp;
  if (kt < KT) {
    // sums over the value rows: dY S0 and V dS1 (WKV-7 also dZ S0 and SA dS1)
    TileAcc dys = times_state<N>(gy, ld, gy_steps, S0, kt);
    TileAcc dzs = V == 7 ? times_state<N>(dz, ld, n, S0, kt) : fill_tile_acc(0.f);
    if (factored) {
      // The decays factor: every sum over the chunk's steps is a tile product of the L x L
      // gradients with per-step scaled inputs (from the chunk's slot). Rows:
      // dr_t = E[t, -1] (dY S0 + dA_rb B' + dA_rk K')_t, da_t = E[t-1, -1] (dZ S0 + dA_ab B' +
      // dA_ak K')_t with B'_s = b_s exp2(-G_s), K'_s likewise (WKV-6: dr_t = E[t-1, -1] (dY S0 +
      // dA' K')_t, dA' without the diagonal).
      const SplitB kp = load_split_b(op + Op::ck + kt * 16, N);
      if (V == 7) {
        const SplitB bp = load_split_b(op + Op::cb + kt * 16, N);
        dys = mma_split(load_split_a(&dA[1][0][0], kMatLd<N>), kp, mma_split(load_split_a(&dA[0][0][0], kMatLd<N>), bp, dys));
        dzs = mma_split(load_split_a(&dA[3][0][0], kMatLd<N>), kp, mma_split(load_split_a(&dA[2][0][0], kMatLd<N>), bp, dzs));
      } else {
        dys = mma_split(load_split_a(&dA[0][0][0], kMatLd<N>), kp, dys);
      }
    }
    store_tile_acc(&here[0][0], kBandLd<N>, dys);
    store_tile_acc(&all[0][0], kBandLd<N>, times_state<N>(v, ld, n, dS1, kt));
    if (V == 7) {
      store_tile_acc(&before_[0][0], kBandLd<N>, dzs);
      sads = times_state<N>(sa, ld, n, dS1, kt);
      if (kGradTiles == 4) store_tile_acc(&sads_rows[0][0], kBandLd<N>, sads);
    }
    if (factored) {
      // rows, element-wise: dr, da, and their parts of dG (dr r_t at t; da a_t at t - 1)
#pragma unroll 1
      for (int e = 0; e < kTileAcc; ++e) {
        const int t = TileAcc::row(e), c = TileAcc::col(e), j = kt * 16 + c;
        const float before = t ? G[t - 1][j] : 0.f;
        const bool real = t < n;
        const int64_t out = row0 + int64_t(t) * ld + j;
        const float r_t = real ? input(r, t, j) : 0.f;
        if (V == 7) {
          const float dr = here[t][c] * exp2f(G[t][j]), da = before_[t][c] * exp2f(before);
          here[t][c] = dr * r_t;
          before_[t][c] = da * (real ? input(a, t, j) : 0.f);
          if (real) store<T>(p.grad_r, out, dr), store<T>(p.grad_a, out, da);
        } else {
          const float dr = here[t][c] * exp2f(before), k_t = real ? input(kk, t, j) : 0.f;
          before_[t][c] = dr * r_t;
          here[t][c] = 0.f;
          if (real) store<T>(p.grad_r, out, fmaf(dA[1][t][t] * load<T>(p.u, int64_t(h) * N + j), k_t, dr));
        }
      }
      // Columns: db_s = E[L-1, s] SA dS1 + exp2(-G_s) (dA_rb^T R~ + dA_ab^T A~)_s, dk_s likewise
      // with V dS1, dA_rk, dA_ak (R~_q = r_q E[q, -1], A~_q = a_q E[q-1, -1]; WKV-6: dk_s =
      // E[L-1, s] V dS1 + exp2(-G_s) (dA'^T R')_s, R'_q = r_q E[q-1, -1]). The accumulators start
      // from the end terms scaled by E[L-1, -1], so one factor exp2(-G_s) finishes both.
      TileAcc dk = load_tile_acc(&all[0][0], kBandLd<N>);
      TileAcc db = V != 7           ? fill_tile_acc(0.f)
                   : kGradTiles == 4 ? load_tile_acc(&sads_rows[0][0], kBandLd<N>)
                                     : sads;
#pragma unroll
      for (int e = 0; e < kTileAcc; ++e) {
        const float gamma = exp2f(G[L - 1][kt * 16 + TileAcc::col(e)]);
        dk.x[e] *= gamma, db.x[e] *= gamma;
      }
      const SplitB rp = load_split_b(op + Op::rt + kt * 16, N);
      if (V == 7) {
        const SplitB ap = load_split_b(op + Op::at + kt * 16, N);
        db = mma_split(load_split_a_transposed(&dA[2][0][0], kMatLd<N>), ap,
                       mma_split(load_split_a_transposed(&dA[0][0][0], kMatLd<N>), rp, db));
        dk = mma_split(load_split_a_transposed(&dA[3][0][0], kMatLd<N>), ap,
                       mma_split(load_split_a_transposed(&dA[1][0][0], kMatLd<N>), rp, dk));
      } else {
        dk = mma_split(load_split_a_transposed(&dA[0][0][0], kMatLd<N>), rp, dk);
      }
      // element-wise: db, dk, their part of dG_t, and (in place of V dS1) the shares of dG_{L-1}
#pragma unroll
      for (int e = 0; e < kTileAcc; ++e) {
        const int t = TileAcc::row(e), c = TileAcc::col(e), j = kt * 16 + c;
        const float g = G[t][j], from_start = exp2f(-g), to_end = exp2f(G[L - 1][j] - g);
        const bool real = t < n;
        const int64_t out = row0 + int64_t(t) * ld + j;
        const float k_t = real ? input(kk, t, j) : 0.f, dk_t = dk.x[e] * from_start;
        if (V == 7) {
          const float b_t = real ? input(b, t, j) : 0.f, db_t = db.x[e] * from_start;
          here[t][c] -= dk_t * k_t + db_t * b_t;
          all[t][c] = (all[t][c] * k_t + (kGradTiles == 4 ? sads_rows[t][c] : sads.x[e]) * b_t) * to_end;
          if (real) store<T>(p.grad_k, out, dk_t), store<T>(p.grad_b, out, db_t);
        } else {
          here[t][c] -= dk_t * k_t;
          all[t][c] *= to_end * k_t;
          if (real) {
            const float r_t = input(r, t, j);
            store<T>(p.grad_k, out, fmaf(dA[1][t][t] * load<T>(p.u, int64_t(h) * N + j), r_t, dk_t));
          }
        }
      }
    } else {  // the pairwise form, exact for any decay
#pragma unroll 1
      for (int e = 0; e < kTileAcc; ++e) {  // this lane's elements of the tile
        const int t = TileAcc::row(e), c = TileAcc::col(e), j = kt * 16 + c;
        const float g = G[t][j], before = t ? G[t - 1][j] : 0.f, to_end = exp2f(G[L - 1][j] - g);
        const bool real = t < n;
        const float r_t = real ? input(r, t, j) : 0.f, k_t = real ? input(kk, t, j) : 0.f;
        const int64_t out = row0 + int64_t(t) * ld + j;
        const float dys = here[t][c], vds = all[t][c];
        if (V == 7) {
          const float a_t = real ? input(a, t, j) : 0.f, b_t = real ? input(b, t, j) : 0.f;
          // row operands: r_t (E[t, s], s <= t) and a_t (E[t-1, s], s < t)
          float dr = dys * exp2f(g), da = before_[t][c] * exp2f(before);
#pragma unroll 1
          for (int s = 0; s <= t && s < n; ++s) {
            const float bs = input(b, s, j), ks = input(kk, s, j);
            dr = fmaf(fmaf(dA[0][t][s], bs, dA[1][t][s] * ks), exp2f(g - G[s][j]), dr);
            if (s < t) da = fmaf(fmaf(dA[2][t][s], bs, dA[3][t][s] * ks), exp2f(before - G[s][j]), da);
          }
          // column operands: b_t, k_t (to the chunk end, and as column t of the matrices)
          const float sads_e = kGradTiles == 4 ? sads_rows[t][c] : tile_element(sads, e);
          const float db_end = sads_e * to_end, dk_end = vds * to_end;
          float db = db_end, dk = dk_end;
#pragma unroll 1
          for (int q = t; q < n; ++q) {
            const float rq = input(r, q, j), e_rq = exp2f(G[q][j] - g);
            db = fmaf(dA[0][q][t] * rq, e_rq, db);
            dk = fmaf(dA[1][q][t] * rq, e_rq, dk);
            if (q > t) {
              const float aq = input(a, q, j), e_aq = exp2f(G[q - 1][j] - g);
              db = fmaf(dA[2][q][t] * aq, e_aq, db);
              dk = fmaf(dA[3][q][t] * aq, e_aq, dk);
            }
          }
          here[t][c] = dr * r_t - dk * k_t - db * b_t;
          before_[t][c] = da * a_t;
          all[t][c] = dk_end * k_t + db_end * b_t;
          if (t < n) {
            store<T>(p.grad_r, out, dr);
            store<T>(p.grad_a, out, da);
            store<T>(p.grad_b, out, db);
            store<T>(p.grad_k, out, dk);
          }
        } else {
          // r_t reads E[t-1, s] (s < t), k_t is column t; the bonus (diagonal) carries no decay
          const float uj = load<T>(p.u, int64_t(h) * N + j), bonus = dA[1][t][t];
          float dr = dys * exp2f(before);
#pragma unroll 1
          for (int s = 0; s < t && s < n; ++s) dr = fmaf(dA[1][t][s] * input(kk, s, j), exp2f(before - G[s][j]), dr);
          const float dk_end = vds * to_end;
          float dk = dk_end;
#pragma unroll 1
          for (int q = t + 1; q < n; ++q) dk = fmaf(dA[1][q][t] * input(r, q, j), exp2f(G[q - 1][j] - g), dk);
          here[t][c] = -dk * k_t;
          before_[t][c] = dr * r_t;
          all[t][c] = dk_end * k_t;
          if (t < n) {
            store<T>(p.grad_r, out, fmaf(bonus * uj, k_t, dr));
            store<T>(p.grad_k, out, fmaf(bonus * uj, r_t, dk));
          }
        }
      }
    }
  }
  __syncthreads();
  // dw_u = sum_{t >= u} dG_t, dG_t = here_t + before_{t+1} (+ all of the shares of dG_{L-1},
  // and the decay over the chunk's: gamma * sum_i S0 dS1), one key per lane.
#if defined(ARWKV_HIP)
  // gfx942: the sum over the value rows i by the whole wave (by 16 lanes alone, each waited for
  // N / 8 rounds of loads): lane l takes key l % 16 of the tile and every fourth row from l / 16,
  // then the four parts are added across lanes, in the same order in every lane (deterministic).
  float s0_ds1 = 0.f;
  if (kt < KT) {
    const SplitBits *s0 = S0 + (lane / 16) * N + kt * 16 + lane % 16, *ds1 = dS1 + (s0 - S0);
#pragma unroll 8
    for (int m = 0; m < N / 4; ++m) s0_ds1 = fmaf(to_float(s0[m * 4 * N]), to_float(ds1[m * 4 * N]), s0_ds1);
#pragma unroll
    for (int o = 16; o < kWarpSize; o *= 2) s0_ds1 += lane_xor(s0_ds1, o);
  }
#endif
  if (kt < KT && lane < 16) {
    const int j = kt * 16 + lane;
#if defined(ARWKV_HIP)
    float acc = s0_ds1;
#else  // (by 16 lanes: any other way, ptxas spilled the WKV-6 grads at N = 128)
    float acc = 0.f;
#pragma unroll 8
    for (int i = 0; i < N; ++i) acc = fmaf(to_float(S0[i * N + j]), to_float(dS1[i * N + j]), acc);
#endif
    acc *= exp2f(G[L - 1][j]);
    for (int t = 0; t < L; ++t) acc += all[t][lane];
    float du = 0.f;
    for (int t = L - 1; t >= 0; --t) {
      acc += here[t][lane] + (t + 1 < L ? before_[t + 1][lane] : 0.f);
      if (t < n) {
        store<T>(p.grad_w, row0 + int64_t(t) * ld + j, acc);
        if (V == 6) du = fmaf(dA[1][t][t] * input(r, t, j), input(kk, t, j), du);
      }
    }
    if (V == 6) sc.grad_u_partial[(k.slot * H + h) * N + j] = du;
  }
}

// ---- the fused forward (and 1. saves): operands built in shared memory inside the serial loop --
// One block per (sequence, head), one warp / wave per 16 value rows of the state, which stays in
// registers as N / 16 accumulator tiles. Per chunk the block builds the chunk's operands in shared
// memory, then each warp advances its rows. Which way round a band's tiles hold the state follows
// the lane maps: an accumulator is, register for register, a CUDA A operand and a gfx942 B operand
// (split_acc), so CUDA keeps S (rows = value rows) and computes every product transposed (Z^T =
// S A~^T + V^T A_ak^T, ...), gfx942 keeps S^T (rows = keys) and computes them as the chunk form
// writes them (Z = A~ S^T + A_ak V, ...). Nothing per band goes through shared memory.
// The state update is S' = S diag(gamma) + SA^T b^ + V^T k^; in a factored chunk the column operands
// are b, k times exp2(-G_s) (those of the L x L products) and gamma is applied after the sums:
// S' = (S + SA^T B' + V^T K') diag(gamma), the same terms to rounding.
#if defined(ARWKV_HIP)
constexpr bool kBandRowsAreKeys = true;
#else
constexpr bool kBandRowsAreKeys = false;
#endif
// The products of a band, one spelling per orientation. A band operand is what an accumulator
// becomes without moving data (split_acc): S^T or SA for gfx942, S or SA^T for CUDA.
using BandOperand = AccOperand;
#if defined(ARWKV_HIP)
// V [s][i] for the band's value rows (x: step 0, the band's first row)
template <class T>
__device__ __forceinline__ SplitB band_values(const T* x, int64_t ld, int steps) { return load_split_b(x, ld, steps); }
// acc + M X for an L x L matrix M (split, row-major) and a band operand X
template <int N>
__device__ __forceinline__ TileAcc matrix_times(const SplitBits* m, const SplitB& x, TileAcc acc) {
  return mma_split(load_split_a(m, kMatLd<N>), x, acc);
}
// acc + R S^T for a key tile of [L][N] row operands R and the band's state tile
template <int N>
__device__ __forceinline__ TileAcc rows_times_state(const SplitBits* rows, const SplitB& s, TileAcc acc) {
  return mma_split(load_split_a(rows, kRowLd<N>), s, acc);
}
// the band's state tile (as S^T) + C^T X for a key tile of [L][N] column operands C
template <int N>
__device__ __forceinline__ TileAcc update_state(const SplitBits* cols, const SplitB& x, TileAcc st) {
  return mma_split(load_split_a_transposed(cols, kColLd<N>), x, st);
}
#else
// the same, transposed: V^T [i][s]; (M X)^T = X^T M^T; (R S^T)^T = S R^T; S + X^T C
template <class T>
__device__ __forceinline__ SplitA band_values(const T* x, int64_t ld, int steps) {
  return load_split_a_transposed(x, ld, steps);
}
template <int N>
__device__ __forceinline__ TileAcc matrix_times(const SplitBits* m, const SplitA& x, TileAcc acc) {
  return mma_split(x, load_split_b_transposed(m, kMatLd<N>), acc);
}
template <int N>
__device__ __forceinline__ TileAcc rows_times_state(const SplitBits* rows, const SplitA& s, TileAcc acc) {
  return mma_split(s, load_split_b_transposed(rows, kRowLd<N>), acc);
}
template <int N>
__device__ __forceinline__ TileAcc update_state(const SplitBits* cols, const SplitA& x, TileAcc st) {
  return mma_split(x, load_split_b(cols, kColLd<N>), st);
}
#endif

// Element e of a band tile: its value row and its key (state) or step (per-step products).
__device__ __forceinline__ int band_value(int e) { return kBandRowsAreKeys ? TileAcc::col(e) : TileAcc::row(e); }
__device__ __forceinline__ int band_other(int e) { return kBandRowsAreKeys ? TileAcc::row(e) : TileAcc::col(e); }

// A band's state tile times diag(gamma) over its 16 keys (gamma: 8-byte aligned). Elements e, e + 1
// of a lane are adjacent keys (see below): one 8-byte load per pair, and the pairs a lane holds
// twice (CUDA: rows 8 apart) load once.
__device__ __forceinline__ void scale_band_keys(TileAcc& st, const float* gamma) {
#pragma unroll
  for (int e = 0; e < kTileAcc; e += 2) {
    const float2 g = *ARWKV_NOTED(reinterpret_cast<const float2*>(gamma + band_other(e)));
    st.x[e] *= g.x, st.x[e + 1] *= g.y;
  }
}

// A band's per-step tile (steps at band_other, value rows at band_value) to a [B * T, H, N] tensor
// of T or of split floats (dst: the chunk's first step, the band's first value row; ld: H * N).
// Padded steps are not written.
template <class T>
__device__ __forceinline__ void store_band_steps(T* dst, int64_t ld, int steps, const TileAcc& acc) {
#pragma unroll
  for (int e = 0; e < kTileAcc; ++e) {
    if (band_other(e) >= steps) continue;
    const int64_t at = int64_t(band_other(e)) * ld + band_value(e);
    if constexpr (std::is_same_v<T, SplitBits>) dst[at] = split_bits(acc.x[e]);
    else store<T>(dst, at, acc.x[e]);
  }
}

// Key tile kt of a band's state, split (sk = split_acc of its tile), to a [value row][key] array
// (dst: the band's first value row, leading dimension N). Elements e, e + 1 of a lane are adjacent
// keys of one value row in both lane maps, so each pair is one 8-byte store, and each lane's
// addresses are one base plus constants.
template <int N>
__device__ __forceinline__ void store_band_state(SplitBits* dst, int kt, const BandOperand& sk) {
  float2* lane_dst = reinterpret_cast<float2*>(dst + band_value(0) * N + kt * 16 + band_other(0));
#pragma unroll
  for (int e = 0; e < kTileAcc; e += 2) {
    uint32_t w0, w1;
    split_pair_words(sk.hi.reg[e / 2], sk.lo.reg[e / 2], w0, w1);
    lane_dst[((band_value(e) - band_value(0)) * N + band_other(e) - band_other(0)) / 2] =
        float2{__uint_as_float(w0), __uint_as_float(w1)};
  }
}

// The column operands' factor at (step q, key j): exp2(-G_q) where the chunk factors, else the
// decay to the chunk end exp2(G_{L-1} - G_q).
template <int N>
__device__ __forceinline__ float column_factor(const float (*G)[N], int q, int j, bool factored) {
  return exp2f(factored ? -G[q][j] : G[L - 1][j] - G[q][j]);
}

// Operands' arrays, rows padded (kPad; the saves pass copies them to the scratch slot without:
// copy_operands). Row
// operands: r~ (WKV-6: r'), a~ (WKV-6: r * u, for the bonus); column operands: k, b times exp2(-G_s) or
// E[L-1, s] (WKV-6's cb: k); 16-byte aligned, written 16 bytes at a time.
template <int V, int N>
struct FusedShared {
  float G[L][N];  // cumulative log2 decays of the chunk
  // (copy_operands takes rt, at as one run of rows, ck, cb as another, mats, inv as a third)
  alignas(16) SplitBits rt[L][kRowLd<N>], at[L][kRowLd<N>];
  alignas(16) SplitBits ck[L][kColLd<N>], cb[L][kColLd<N>];
  alignas(16) float mats[V == 7 ? 4 : 2][L][kMatLd<N>];  // rb, rk, ab, ak (WKV-6: A, the bonus); then split in place, but ab
  alignas(16) SplitBits inv[V == 7 ? L : 1][kMatLd<N>];  // (I - A_ab)^-1
  alignas(16) float gamma[N];  // the decay over the chunk (read in pairs: scale_band_keys)
  float flag[4];               // 1 if the chunk factors (for the backward's copy)
  int factors;
};

// The chunk's operands from FusedShared (rows padded) to its scratch slot (Operands: rows not
// padded; the same order), 16 bytes per thread at a time: the rows of the row operands (rt (, at)),
// of the column operands (ck (, cb)), of the matrices (, inv), then gamma and the flag.
template <int V, int N, int THREADS>
__device__ __forceinline__ void copy_operands(const FusedShared<V, N>& sh, float* slot) {
  using Op = Operands<V, N>;
  constexpr int kWide = V == 7 ? 2 * L : L, kNarrow = V == 7 ? 5 * L : L;  // rows of N (each kind), of L
  // Unrolled where registers allow (N = 128: one block per unit; at N = 64, unrolled, the saves
  // pass held several rows in registers and spilled), so that a trip does not wait for the last
  // one's stores.
  constexpr int kUnroll = N >= 128 ? 4 : 1;
  const float* rows = reinterpret_cast<const float*>(&sh.rt[0][0]);
#pragma unroll kUnroll
  for (int i = threadIdx.x; i < kWide * N / 4; i += THREADS)
    reinterpret_cast<float4*>(slot + Op::rt)[i] =
        *reinterpret_cast<const float4*>(rows + i / (N / 4) * kRowLd<N> + i % (N / 4) * 4);
  const float* cols = reinterpret_cast<const float*>(&sh.ck[0][0]);
#pragma unroll kUnroll
  for (int i = threadIdx.x; i < kWide * N / 4; i += THREADS)
    reinterpret_cast<float4*>(slot + Op::ck)[i] =
        *reinterpret_cast<const float4*>(cols + i / (N / 4) * kColLd<N> + i % (N / 4) * 4);
  const float* narrow = &sh.mats[0][0][0];
#pragma unroll kUnroll
  for (int i = threadIdx.x; i < kNarrow * L / 4; i += THREADS)
    reinterpret_cast<float4*>(slot + Op::mats)[i] =
        *reinterpret_cast<const float4*>(narrow + i / (L / 4) * kMatLd<N> + i % (L / 4) * 4);
  static_assert((N + 4) / 4 <= THREADS, "gamma and the flag: one 16-byte store per thread");
  if (threadIdx.x < (N + 4) / 4)
    reinterpret_cast<float4*>(slot + Op::gam)[threadIdx.x] = reinterpret_cast<const float4*>(sh.gamma)[threadIdx.x];
}

// CUDA: blocks per unit the registers must allow (the second bound): 4 up to N = 64 (<= 128 registers
// at N = 64, so that all (8, 4096, 64, 64) blocks are resident at once), 1 at N = 128 (its 64
// state registers per lane; with more blocks it spilled). gfx942 reads that bound differently and
// takes a waves-per-SIMD attribute instead.
#if defined(ARWKV_HIP) && !defined(ARWKV_GPU_EMULATION)
#define ARWKV_FUSED_BOUNDS(N) __launch_bounds__(N / 16 * kWarpSize) __attribute__((amdgpu_waves_per_eu(2)))
#elif defined(ARWKV_HIP)
#define ARWKV_FUSED_BOUNDS(N) __launch_bounds__(N / 16 * kWarpSize)
#else
#define ARWKV_FUSED_BOUNDS(N) __launch_bounds__(N / 16 * kWarpSize, N == 128 ? 1 : 4)
#endif
// Builds chunk k's operands for head h in shared memory, every thread of the block taking part
// (the caller has synchronised since sh was last read): the cumulative log2 decays, the operands
// (split), the decay over the chunk, the L x L matrices (masked, split; A_ab kept float) and
// (WKV-7) the solve's inverse. Returns whether the chunk factors (then the column operands are
// k, b times exp2(-G_s); else times E[L-1, s]).
template <class T, int V, int N, int THREADS>
__device__ __forceinline__ bool build_chunk(const WkvProblem& p, const Chunk& k, int h, FusedShared<V, N>& sh) {
  constexpr int WARPS = THREADS / kWarpSize, KT = N / 16, kMats = V == 7 ? 4 : 2;
  constexpr int GK = kGroupKeys, kGroups = L * N / GK;  // (step, GK keys) groups of a chunk's inputs
  const int64_t H = p.H, first = (k.first * H + h) * N;  // (the chunk's first step, key 0)
  const int ldi = int(H * N), warp = threadIdx.x / kWarpSize;
  // the chunk's inputs: step q, key j at [q * ldi + j] (32-bit offsets from a per-chunk base)
  const T *r = static_cast<const T*>(p.r) + first, *w = static_cast<const T*>(p.w) + first;
  const T *kk = static_cast<const T*>(p.k) + first;
  const T *a = static_cast<const T*>(V == 7 ? p.a : p.r) + first, *b = static_cast<const T*>(V == 7 ? p.b : p.r) + first;
  cumulative_log_decays<T, N, THREADS>(w, ldi, k.steps, sh.G);
  const bool factored = chunk_factors<N, THREADS>(sh.G[L - 1], &sh.factors);
  if (threadIdx.x == 0) sh.flag[0] = factored ? 1.f : 0.f;  // (for the backward's copy of the chunk)

  if (!factored) {
    // the L x L matrices as pairwise sums (exact for any decay), from the raw inputs staged as
    // floats where the operands go next
    float(*xr)[kRowLd<N>] = reinterpret_cast<float(*)[kRowLd<N>]>(&sh.rt[0][0]);
    float(*xa)[kRowLd<N>] = reinterpret_cast<float(*)[kRowLd<N>]>(&sh.at[0][0]);
    float(*xk)[kColLd<N>] = reinterpret_cast<float(*)[kColLd<N>]>(&sh.ck[0][0]);
    float(*xb)[kColLd<N>] = reinterpret_cast<float(*)[kColLd<N>]>(&sh.cb[0][0]);
    for (int grp = threadIdx.x; grp < kGroups; grp += THREADS) {
      const int q = grp / (N / GK), j0 = grp % (N / GK) * GK, off = q * ldi + j0;
      auto stage = [&](const T* x, auto dst) {
        float v[GK];
        load_keys(x, off, q < k.steps, v);
#pragma unroll
        for (int i = 0; i < GK; ++i) dst[q][j0 + i] = v[i];
      };
      stage(r, xr), stage(kk, xk);
      if (V == 7) stage(a, xa), stage(b, xb);
    }
    __syncthreads();
    // (not unrolled: the rare path; unrolled, gfx942 once ran out of registers at N = 32)
#pragma unroll 1
    for (int pr = threadIdx.x; pr < L * L; pr += THREADS) {
      const int t = pr / L, q = pr % L;  // (row step, column step)
      float rb = 0.f, rk = 0.f, ab = 0.f, ak = 0.f;
      if (q <= t)
#pragma unroll 1
        for (int j = 0; j < N; ++j) {
          const float e = exp2f(sh.G[t][j] - sh.G[q][j]);                     // E[t, q]
          const float ep = q < t ? exp2f(sh.G[t - 1][j] - sh.G[q][j]) : 0.f;  // E[t-1, q]
          if (V == 7) {
            rb = fmaf(xr[t][j] * xb[q][j], e, rb), rk = fmaf(xr[t][j] * xk[q][j], e, rk);
            ab = fmaf(xa[t][j] * xb[q][j], ep, ab), ak = fmaf(xa[t][j] * xk[q][j], ep, ak);
          } else {
            rk = fmaf(xr[t][j] * xk[q][j], ep, rk);
          }
        }
      if (V == 7) sh.mats[0][t][q] = rb, sh.mats[1][t][q] = rk, sh.mats[2][t][q] = ab, sh.mats[3][t][q] = ak;
      else sh.mats[0][t][q] = rk;
    }
    __syncthreads();  // the staged inputs are read
  }

  // the chunk's operands, GK keys of one step per thread at a time (CUDA: 8 lanes' keys span 64
  // of a row, and the lanes at keys 32 .. 63 of each 64 store their upper half first: store_split)
  for (int grp = threadIdx.x; grp < kGroups; grp += THREADS) {
    const int q = grp / (N / GK), j0 = grp % (N / GK) * GK, off = q * ldi + j0;
    const bool real = q < k.steps, spread = GK == 8 && N >= 64 && (j0 & 32);
    float x[GK], y[GK], o[GK];
    load_keys(r, off, real, x);
    load_keys(kk, off, real, y);
#pragma unroll
    for (int i = 0; i < GK; ++i)  // r_t E[t, -1] (WKV-6: E[t-1, -1])
      o[i] = x[i] * (V == 7 ? exp2f(sh.G[q][j0 + i]) : q ? exp2f(sh.G[q - 1][j0 + i]) : 1.f);
    store_split(&sh.rt[q][j0], o, spread);
    float cf[GK];  // the column operands' factor (k's and b's)
#pragma unroll
    for (int i = 0; i < GK; ++i) cf[i] = column_factor(sh.G, q, j0 + i, factored);
#pragma unroll
    for (int i = 0; i < GK; ++i) o[i] = y[i] * cf[i];
    store_split(&sh.ck[q][j0], o, spread);
    if (V == 6) {  // the bonus's r_t * u and k_t
#pragma unroll
      for (int i = 0; i < GK; ++i) o[i] = x[i] * load<T>(p.u, int64_t(h) * N + j0 + i);
      store_split(&sh.at[q][j0], o, spread);
      store_split(&sh.cb[q][j0], y, spread);
    } else {
      load_keys(a, off, real, x);
      load_keys(b, off, real, y);
#pragma unroll
      for (int i = 0; i < GK; ++i) o[i] = x[i] * (q ? exp2f(sh.G[q - 1][j0 + i]) : 1.f);
      store_split(&sh.at[q][j0], o, spread);
#pragma unroll
      for (int i = 0; i < GK; ++i) o[i] = y[i] * cf[i];
      store_split(&sh.cb[q][j0], o, spread);
    }
  }
  for (int j = threadIdx.x; j < N; j += THREADS) sh.gamma[j] = exp2f(sh.G[L - 1][j]);
  __syncthreads();

  // factored: the L x L matrices as tile products of the operands (WKV-6's bonus, whose
  // diagonal is the product of r * u and k, always)
  for (int m = warp; m < kMats; m += WARPS)
    if (factored || V == 6 && m == 1) {
      const bool second = V == 7 ? m >= 2 : m == 1, b_cols = V == 7 ? m % 2 == 0 : m == 1;
      const SplitBits* rows = second ? &sh.at[0][0] : &sh.rt[0][0];
      const SplitBits* cols = b_cols ? &sh.cb[0][0] : &sh.ck[0][0];
      TileAcc acc = fill_tile_acc(0.f);
#pragma unroll
      for (int kt = 0; kt < KT; ++kt)
        acc = mma_split(load_split_a(rows + kt * 16, kRowLd<N>), load_split_b_transposed(cols + kt * 16, kColLd<N>), acc);
      store_tile_acc(&sh.mats[m][0][0], kMatLd<N>, acc);
    }
  __syncthreads();
  // where the matrices are defined (s <= t for the r-rows, s < t for the a-rows and WKV-6's A,
  // whose diagonal is the bonus r_t . (u * k_t)), split in place; A_ab stays float for the solve
  for (int pr = threadIdx.x; pr < L * L; pr += THREADS) {
    const int t = pr / L, q = pr % L;
    float* m = &sh.mats[0][t][q];
    constexpr int M = L * kMatLd<N>;  // (from one matrix to the next)
    if (V == 7) {
      m[0] = __uint_as_float(split_bits(q <= t ? m[0] : 0.f).bits);
      m[M] = __uint_as_float(split_bits(q <= t ? m[M] : 0.f).bits);
      m[2 * M] = q < t ? m[2 * M] : 0.f;
      m[3 * M] = __uint_as_float(split_bits(q < t ? m[3 * M] : 0.f).bits);
      sh.inv[t][q].bits = __float_as_uint(t == q ? 1.f : 0.f);  // the solve starts from I
    } else {
      m[0] = __uint_as_float(split_bits(q < t ? m[0] : q == t ? m[M] : 0.f).bits);
    }
  }
  if (V == 7) {
    __syncthreads();
    // (I - A_ab)^-1, written over the identity it starts from (each thread its own column), split.
    // gfx942 rounds in integer arithmetic: there the 16 values of a column split one after another
    // in the solving lanes were the longest wait of a chunk, so the solve writes floats and then
    // every thread splits one. (CUDA's conversion instruction makes the split cheap where it is;
    // a second pass cost more: forward 1.36 -> 1.46 ms by estimate.)
    constexpr bool kSplitAfter = kWarpSize == 64;
    if (threadIdx.x < L)
      unit_lower_inverse_column(&sh.mats[2][0][0], reinterpret_cast<const float*>(&sh.inv[0][0]), kMatLd<N>, threadIdx.x,
                                [&](int q, float x) {
                                  if constexpr (kSplitAfter) sh.inv[q][threadIdx.x].bits = __float_as_uint(x);
                                  else sh.inv[q][threadIdx.x] = split_bits(x);
                                });
    if (kSplitAfter) {
      __syncthreads();
      for (int pr = threadIdx.x; pr < L * L; pr += THREADS) {
        SplitBits& x = sh.inv[pr / L][pr % L];
        x = split_bits(__uint_as_float(x.bits));
      }
    }
  }
  __syncthreads();

  return factored;
}

// SAVES: the backward's first pass. Instead of the outputs and the final state it stores what the
// state-gradient and gradient passes take: each chunk's operands (its scratch slot, Operands), the
// state at each chunk start (split, [value row][key]) and (WKV-7) S a_t per step (split).
template <class T, int V, int N, bool SAVES>
__global__ void ARWKV_FUSED_BOUNDS(N) wkv_chunk_fused_forward_kernel(const WkvProblem p, const Scratch sc) {
  using Op = Operands<V, N>;
  constexpr int WARPS = N / 16, THREADS = WARPS * kWarpSize, KT = N / 16;
  __shared__ FusedShared<V, N> sh;
  static_assert(sizeof(sh) <= kStaticSharedLimit, "static shared memory");
  const int h = blockIdx.x, s = blockIdx.y, warp = threadIdx.x / kWarpSize, i0 = warp * 16;
  const int64_t H = p.H, ld = H * N;
  const float* init = static_cast<const float*>(p.initial_state);
  const int64_t state0 = (int64_t(s) * H + h) * N * N;  // this (sequence, head)'s [N, N] state
  TileAcc st[KT];  // tile kt: keys 16 kt .. 16 kt + 15 of value rows i0 .. i0 + 15
#pragma unroll
  for (int kt = 0; kt < KT; ++kt)
#pragma unroll
    for (int e = 0; e < kTileAcc; ++e)
      st[kt].x[e] = init ? init[state0 + int64_t(i0 + band_value(e)) * N + kt * 16 + band_other(e)] : 0.f;
  const SplitBits* ark = reinterpret_cast<const SplitBits*>(&sh.mats[V == 7 ? 1 : 0][0][0]);
  const SplitBits* arb = reinterpret_cast<const SplitBits*>(&sh.mats[0][0][0]);
  const SplitBits* aak = reinterpret_cast<const SplitBits*>(&sh.mats[V == 7 ? 3 : 0][0][0]);

  const Chunk k0 = chunk_of(p, s, 0);
  for (int c = 0; c < k0.num_chunks; ++c) {
    const Chunk k = chunk_of(k0, c);
    const int64_t first = (k.first * H + h) * N;  // (the chunk's first step, key 0)
    // SAVES: this band's rows of the state at the chunk start. WKV-7 stores each key tile as split
    // for Z's product; WKV-6's saves take no product of the state, so they store it first thing
    // (split there, late in the chunk, the CUDA compiler kept the split tiles live across the chunk
    // building and spilled).
    SplitBits* snapshot =
        SAVES ? reinterpret_cast<SplitBits*>(sc.snapshots) + (k.slot * H + h) * N * N + i0 * N : nullptr;
    if (SAVES && V == 6)
#pragma unroll
      for (int kt = 0; kt < KT; ++kt) store_band_state<N>(snapshot, kt, split_acc(st[kt]));
    __syncthreads();  // the previous chunk's readers of sh are done
    const bool factored = build_chunk<T, V, N, THREADS>(p, k, h, sh);
    // (stored first: the band's products below overlap the stores, and nothing writes sh until the
    // next chunk's barrier)
    if (SAVES) copy_operands<V, N, THREADS>(sh, sc.chunk_operands + (k.slot * H + h) * Op::size);

    // this band's rows: outputs, then the state after the chunk
    const T* vrow = static_cast<const T*>(p.v) + first + i0;  // v at (the chunk's step 0, value row i0)
    TileAcc y = fill_tile_acc(0.f);
    const BandOperand vv = band_values(vrow, ld, k.steps);
    TileAcc z = fill_tile_acc(0.f);
#pragma unroll
    for (int kt = 0; kt < KT; ++kt) {
      const BandOperand sk = split_acc(st[kt]);
      if (SAVES && V == 7) store_band_state<N>(snapshot, kt, sk);
      if (V == 7) z = rows_times_state<N>(&sh.at[0][0] + kt * 16, sk, z);  // Z = A~ S^T + A_ak V
      if (!SAVES) y = rows_times_state<N>(&sh.rt[0][0] + kt * 16, sk, y);  // Y = R~ S^T + A_rb SA + A_rk V
    }
    BandOperand sa{};
    if (V == 7) {
      const TileAcc sa_rows = matrix_times<N>(&sh.inv[0][0], split_acc(matrix_times<N>(aak, vv, z)), fill_tile_acc(0.f));
      sa = split_acc(sa_rows);
      if (SAVES) store_band_steps(reinterpret_cast<SplitBits*>(sc.sa) + first + i0, ld, k.steps, sa_rows);
      else y = matrix_times<N>(arb, sa, y);
    }
    if (!SAVES) y = matrix_times<N>(ark, vv, y);
#pragma unroll
    for (int kt = 0; kt < KT; ++kt) {  // S' = S diag(gamma) + SA^T B^ + V^T K^ (see above for factored chunks)
      if (!factored) scale_band_keys(st[kt], sh.gamma + kt * 16);
      if (V == 7) st[kt] = update_state<N>(&sh.cb[0][0] + kt * 16, sa, st[kt]);
      st[kt] = update_state<N>(&sh.ck[0][0] + kt * 16, vv, st[kt]);
    }
    if (factored)
#pragma unroll
      for (int kt = 0; kt < KT; ++kt) scale_band_keys(st[kt], sh.gamma + kt * 16);
    if (!SAVES) store_band_steps(static_cast<T*>(p.y) + first + i0, ld, k.steps, y);
  }
  float* final_state = static_cast<float*>(p.final_state);
  if (!SAVES && final_state)
#pragma unroll
    for (int kt = 0; kt < KT; ++kt)
#pragma unroll
      for (int e = 0; e < kTileAcc; ++e)
        final_state[state0 + int64_t(i0 + band_value(e)) * N + kt * 16 + band_other(e)] = st[kt].x[e];
}

}  // namespace chunked
}  // namespace gpu
}  // namespace arwkv
