// WKV-7 and WKV-6 GPU kernels, forward and backward, for CUDA and HIP (one source; the few
// platform differences live in wkv_gpu_compat.h). Included by wkv_gpu_<dtype>.cu, which
// instantiate forward<T> / backward<T> for one input type each, so files compile in parallel.
//
// Layout of the work (per sequence s, head h; S is N x N, row i = value, column j = key):
//  - Value rows are independent in the forward recurrence, so a "row" kernel gives each block a
//    band of rows and each row L adjacent lanes holding KPT keys each; row sums (S a, S r) are
//    lane-group butterflies. Several blocks per head keep the GPU busy when B * H is small.
//  - Backward, with no division by the decay (stable for any decay):
//      1. rows kernel, snapshot mode: the forward recurrence again, storing S every kChunk steps
//         (transposed) and sa_t = S a_t (WKV-7);
//      2. rows kernel, backward mode: the state gradient dS runs backwards in time row by row
//         (it never needs S): gives grad_v, dsa_t = dS b_t (WKV-7) and grad_initial_state;
//      3. columns kernel: given sa_t, dsa_t, v_t and grad_y_t as vectors, S and dS evolve column
//         by column, so each thread holds a column slice; per chunk it recomputes the chunk's
//         states from the snapshot into registers, then walks back through the chunk producing
//         grad_r, grad_w, grad_k (grad_a, grad_b | grad_u) as column sums over its rows.
//    Nothing is shared between heads or sequences, and every output element is written by
//    exactly one thread: results are deterministic.
//
// Interface: wkv_gpu.h (the problem is csrc/wkv_problem.h; the scratch, stream and multiprocessor
// count are the GPU backend's own). Each kernel takes the problem and the scratch by value.
#pragma once

#include <type_traits>
#include <utility>

#include "wkv_gpu_chunked.cuh"
#include "wkv_gpu_compat.h"

namespace arwkv {
namespace gpu {

struct Segment {
  int64_t bos;         // first token of the sequence in the flattened [B * T] token axis
  int len;             // its number of steps
  int64_t first_slot;  // its first snapshot slot
};

__device__ __forceinline__ Segment segment_of(const WkvProblem& p, int s) {
  Segment g;
  if (p.cu_seqlens) {
    g.bos = p.cu_seqlens[s];
    g.len = int(p.cu_seqlens[s + 1] - g.bos);
  } else {
    g.bos = int64_t(s) * p.T;
    g.len = int(p.T);
  }
  g.first_slot = g.bos / kChunk + s;
  return g;
}

// ---------------------------------------------------------------------------------------------
// Rows kernel: one block = ROWS value rows of one (sequence, head); a row = L adjacent lanes,
// each holding KPT keys as KPT/4 float4 groups interleaved across the lanes (conflict-free
// shared-memory reads).
template <int N_, int KPT_, int THREADS_>
struct RowTile {
  static constexpr int N = N_, KPT = KPT_, THREADS = THREADS_;
  static constexpr int L = N / KPT;          // lanes per row
  static constexpr int ROWS = THREADS / L;   // rows per block
  static constexpr int Q = KPT / 4;          // float4 groups per thread
  static_assert(KPT % 4 == 0 && L <= 32 && ROWS <= N && N % ROWS == 0, "bad row tile");
  static_assert(THREADS % 64 == 0, "blocks are whole 64-lane waves");
  __device__ static int key(int q, int lane, int e) { return (q * L + lane) * 4 + e; }
};

// Two tiles per head size: "wide" when there are enough (sequence, head) pairs to fill the GPU,
// "narrow" (more blocks per head) when there are few.
template <int N> struct WideRows;
template <> struct WideRows<16> { using Tile = RowTile<16, 4, 64>; };
template <> struct WideRows<32> { using Tile = RowTile<32, 16, 64>; };
template <> struct WideRows<64> { using Tile = RowTile<64, 16, 128>; };
#if defined(ARWKV_HIP)  // 32 keys per lane would need > 128 VGPRs: < 4 waves per SIMD
template <> struct WideRows<128> { using Tile = RowTile<128, 16, 128>; };
#else
template <> struct WideRows<128> { using Tile = RowTile<128, 32, 128>; };
#endif
template <int N> struct NarrowRows;
template <> struct NarrowRows<16> { using Tile = RowTile<16, 4, 64>; };
template <> struct NarrowRows<32> { using Tile = RowTile<32, 8, 64>; };
template <> struct NarrowRows<64> { using Tile = RowTile<64, 8, 64>; };
#if defined(ARWKV_HIP)  // two waves per workgroup halve the LDS per wave
template <> struct NarrowRows<128> { using Tile = RowTile<128, 8, 128>; };
#else
template <> struct NarrowRows<128> { using Tile = RowTile<128, 8, 64>; };
#endif

enum RowMode { kForward = 0, kSnapshots = 1, kStateGrad = 2 };

// Steps the rows kernels stage in shared memory at a time. On CDNA (64 KB LDS per CU) the
// LDS of small workgroups is what limits waves per SIMD, so HIP stages fewer steps per barrier.
#if defined(ARWKV_HIP)
constexpr int kStage = 2;
#else
constexpr int kStage = kChunk;
#endif
static_assert(kChunk % kStage == 0, "a chunk is whole stages");

// Stages n steps from step c0 on: the key vectors r, decay = exp(w), k, a, b (WKV-7) or r, decay, k
// (WKV-6) for all N keys, and one per-row value (v or grad_y) for the block's rows.
template <class T, int V, int N, int ROWS, int THREADS>
__device__ __forceinline__ void stage_rows(const WkvProblem& p, const Segment& g, int h, int row0, int c0,
                                           int n, const void* row_src, float (*kr)[N], float (*kd)[N],
                                           float (*kk)[N], float (*ka)[N], float (*kb)[N],
                                           float (*xr)[ROWS]) {
  const int64_t H = p.H;
  for (int idx = threadIdx.x; idx < n * N; idx += THREADS) {
    const int s = idx / N, j = idx % N;
    const int64_t off = ((g.bos + c0 + s) * H + h) * N + j;
    kr[s][j] = load<T>(p.r, off);
    kd[s][j] = expf(load<T>(p.w, off));
    kk[s][j] = load<T>(p.k, off);
    if (V == 7) {
      ka[s][j] = load<T>(p.a, off);
      kb[s][j] = load<T>(p.b, off);
    }
  }
  for (int idx = threadIdx.x; idx < n * ROWS; idx += THREADS) {
    const int s = idx / ROWS, i = idx % ROWS;
    xr[s][i] = row_src ? load<T>(row_src, ((g.bos + c0 + s) * H + h) * N + row0 + i) : 0.f;
  }
}

template <class T, int V, class Tile, int MODE>
__global__ void __launch_bounds__(Tile::THREADS) wkv_rows_kernel(const WkvBackwardProblem p,
                                                                  const Scratch sc) {
  constexpr int N = Tile::N, L = Tile::L, ROWS = Tile::ROWS, Q = Tile::Q, THREADS = Tile::THREADS;
  __shared__ __align__(16) float kr[kStage][N];
  __shared__ __align__(16) float kd[kStage][N];
  __shared__ __align__(16) float kk[kStage][N];
  __shared__ __align__(16) float ka[V == 7 ? kStage : 1][N];
  __shared__ __align__(16) float kb[V == 7 ? kStage : 1][N];
  __shared__ float xr[kStage][ROWS];

  const int lane = threadIdx.x % L, row_local = threadIdx.x / L;
  const int row0 = blockIdx.x * ROWS, i = row0 + row_local;
  const int h = blockIdx.y, s = blockIdx.z;
  const int64_t H = p.H;
  const Segment g = segment_of(p, s);
  const int64_t state_off = ((int64_t(s) * H + h) * N + i) * N;

  float S[Q][4];  // this thread's keys of row i (of S, or of dS in kStateGrad mode)
  float u[Q][4];  // WKV-6 bonus for these keys
  const float* init = static_cast<const float*>(MODE == kStateGrad ? p.grad_state : p.initial_state);
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    const int j = Tile::key(q, lane, 0);
    float4 x = init ? *reinterpret_cast<const float4*>(init + state_off + j) : make_float4(0.f, 0.f, 0.f, 0.f);
    S[q][0] = x.x, S[q][1] = x.y, S[q][2] = x.z, S[q][3] = x.w;
#pragma unroll
    for (int e = 0; e < 4; ++e) u[q][e] = V == 6 ? load<T>(p.u, int64_t(h) * N + j + e) : 0.f;
  }

  const int num_chunks = (g.len + kChunk - 1) / kChunk;
  for (int step = 0; step < num_chunks; ++step) {
    const int c = MODE == kStateGrad ? num_chunks - 1 - step : step;
    const int c0 = c * kChunk, n = min(kChunk, g.len - c0);
    if (MODE == kSnapshots) {  // the state before this chunk, transposed: [key][row]
      float* snap = sc.snapshots + ((g.first_slot + c) * H + h) * N * N;
#pragma unroll
      for (int q = 0; q < Q; ++q)
#pragma unroll
        for (int e = 0; e < 4; ++e) snap[int64_t(Tile::key(q, lane, e)) * N + i] = S[q][e];
    }
    // Staged kStage steps at a time (all kChunk at once on CUDA; fewer on HIP, where the LDS
    // a workgroup takes is what limits waves per SIMD).
    const int num_stages = kStage == kChunk ? 1 : (n + kStage - 1) / kStage;  // a constant on CUDA
    for (int si = 0; si < num_stages; ++si) {
      const int sb = MODE == kStateGrad ? num_stages - 1 - si : si;
      const int b0 = c0 + sb * kStage, m = min(kStage, n - sb * kStage);  // steps b0 .. b0 + m - 1
      __syncthreads();  // the previous stage's readers are done with it
      stage_rows<T, V, N, ROWS, THREADS>(p, g, h, row0, b0, m, MODE == kStateGrad ? p.grad_y : p.v, kr, kd,
                                         kk, ka, kb, xr);
      __syncthreads();

      for (int t = 0; t < m; ++t) {
        const int st = MODE == kStateGrad ? m - 1 - t : t;  // step within the stage
        const int64_t out = ((g.bos + b0 + st) * H + h) * N + i;
        const float x = xr[st][row_local];  // v_t[i], or grad_y_t[i]
        // this thread's 4 keys of group q of a staged vector, as an array
        auto key4 = [&](float (*vec)[N], int q, float (&dst)[4]) {
          const float4 x4 = *reinterpret_cast<const float4*>(&vec[st][Tile::key(q, lane, 0)]);
          dst[0] = x4.x, dst[1] = x4.y, dst[2] = x4.z, dst[3] = x4.w;
        };
        float r_[4], d_[4], k_[4], a_[4], b_[4];
        if (MODE != kStateGrad) {
          if (V == 7) {
            // sa = S a_t;  S = S diag(d) + sa b^T + v k^T;  y = S r_t
            float sa = 0.f;
#pragma unroll
            for (int q = 0; q < Q; ++q) {
              key4(ka, q, a_);
#pragma unroll
              for (int e = 0; e < 4; ++e) sa = fmaf(S[q][e], a_[e], sa);
            }
            sa = group_sum<L>(sa);
            float y = 0.f;
#pragma unroll
            for (int q = 0; q < Q; ++q) {
              key4(kd, q, d_), key4(kb, q, b_), key4(kk, q, k_), key4(kr, q, r_);
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                S[q][e] = fmaf(S[q][e], d_[e], fmaf(sa, b_[e], x * k_[e]));
                y = fmaf(S[q][e], r_[e], y);
              }
            }
            if (MODE == kForward) {
              y = group_sum<L>(y);
              if (lane == 0) store<T>(p.y, out, y);
            } else if (lane == 0) {
              sc.sa[out] = sa;
            }
          } else {
            // y = sum_j r_j (S_ij + u_j k_j v_i);  S = S diag(d) + v k^T
            float y = 0.f;
#pragma unroll
            for (int q = 0; q < Q; ++q) {
              key4(kd, q, d_), key4(kk, q, k_), key4(kr, q, r_);
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                y = fmaf(r_[e], fmaf(u[q][e] * k_[e], x, S[q][e]), y);
                S[q][e] = fmaf(S[q][e], d_[e], x * k_[e]);
              }
            }
            if (MODE == kForward) {
              y = group_sum<L>(y);
              if (lane == 0) store<T>(p.y, out, y);
            }
          }
        } else {
          // Backwards in time; S holds dS = dLoss/dS_t, x = grad_y_t[i].
          if (V == 7) {
            // dS += gy r^T;  grad_v = dS k;  dsa = dS b;  dS = dS diag(d) + dsa a^T
            float dv = 0.f, dsa = 0.f;
#pragma unroll
            for (int q = 0; q < Q; ++q) {
              key4(kr, q, r_), key4(kk, q, k_), key4(kb, q, b_);
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                S[q][e] = fmaf(x, r_[e], S[q][e]);
                dv = fmaf(S[q][e], k_[e], dv);
                dsa = fmaf(S[q][e], b_[e], dsa);
              }
            }
            dsa = group_sum<L>(dsa);
            dv = group_sum<L>(dv);
#pragma unroll
            for (int q = 0; q < Q; ++q) {
              key4(kd, q, d_), key4(ka, q, a_);
#pragma unroll
              for (int e = 0; e < 4; ++e) S[q][e] = fmaf(S[q][e], d_[e], dsa * a_[e]);
            }
            if (lane == 0) {
              store<T>(p.grad_v, out, dv);
              sc.dsa[out] = dsa;
            }
          } else {
            // grad_v = dS k + gy (r . u k);  dS = dS diag(d) + gy r^T
            float dv = 0.f;
#pragma unroll
            for (int q = 0; q < Q; ++q) {
              key4(kr, q, r_), key4(kk, q, k_), key4(kd, q, d_);
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                dv = fmaf(fmaf(x * r_[e], u[q][e], S[q][e]), k_[e], dv);
                S[q][e] = fmaf(S[q][e], d_[e], x * r_[e]);
              }
            }
            dv = group_sum<L>(dv);
            if (lane == 0) store<T>(p.grad_v, out, dv);
          }
        }
      }
    }
  }

  float* final_out =
      static_cast<float*>(MODE == kForward ? p.final_state : MODE == kStateGrad ? p.grad_initial_state : nullptr);
  if (final_out) {
#pragma unroll
    for (int q = 0; q < Q; ++q)
      *reinterpret_cast<float4*>(final_out + state_off + Tile::key(q, lane, 0)) =
          make_float4(S[q][0], S[q][1], S[q][2], S[q][3]);
  }
}

// Bits of a where mask is set, of b elsewhere.
__device__ __forceinline__ float select_bits(uint32_t mask, float a, float b) {
  return __uint_as_float((__float_as_uint(a) & mask) | (__float_as_uint(b) & ~mask));
}

// Pointer q of four (q in 0..3), chosen with bitwise selects rather than lane masks (store
// through it with store_global: the compiler no longer knows it points to global memory).
__device__ __forceinline__ void* select_ptr(int q, void* p0, void* p1, void* p2, void* p3) {
  auto pick = [](uint32_t mask, uint64_t a, uint64_t b) {
    return (a & (uint64_t(mask) * 0x100000001ull)) | (b & ~(uint64_t(mask) * 0x100000001ull));
  };
  const uint32_t odd = 0u - uint32_t(q & 1), high = 0u - uint32_t((q >> 1) & 1);
  const uint64_t low_pair = pick(odd, uint64_t(p1), uint64_t(p0));
  const uint64_t high_pair = pick(odd, uint64_t(p3), uint64_t(p2));
  return reinterpret_cast<void*>(pick(high, high_pair, low_pair));
}

// Sums of NV values over groups of G adjacent lanes (NV <= G, both powers of two) with
// NV - 1 + log2(G / NV) shuffles instead of NV * log2(G) (4 instead of 12 for G = 8, NV = 4):
// each halving step sends the half of the values the partner lane keeps, then a butterfly
// finishes the one value left. Returns, on every lane, the sum of v[(lane % G) / (G / NV)];
// the lanes with lane % (G / NV) == 0 are one owner of each sum.
template <int G, int NV>
__device__ __forceinline__ float group_sums_scattered(const float (&v)[NV], int lane) {
  static_assert(NV >= 1 && NV <= G && (NV & (NV - 1)) == 0, "NV: a power of two, at most G");
  float x[NV];
#pragma unroll
  for (int q = 0; q < NV; ++q) x[q] = v[q];
#pragma unroll
  for (int n = NV; n > 1; n /= 2) {  // n values left; partner at offset G * n / (2 * NV)
    const int offset = G * n / (2 * NV);
    // all ones where this lane keeps the upper half: a bitwise select, so the choice stays in a
    // vector register (as lane masks, the unrolled loops' choices spill scalar registers on gfx942)
    const uint32_t upper = 0u - uint32_t((lane & offset) != 0);
#pragma unroll
    for (int q = 0; q < n / 2; ++q) {
      const float keep = select_bits(upper, x[q + n / 2], x[q]), send = select_bits(upper, x[q], x[q + n / 2]);
      x[q] = keep + lane_xor(send, offset);
    }
  }
  return group_sum<G / NV>(x[0]);
}

// ---------------------------------------------------------------------------------------------
// Columns kernel (backward step 3): a thread holds RR rows of one key column j, G adjacent
// lanes cover all N rows of the column, a block covers COLS columns of one (sequence, head).
// A thread's rows are RR/4 groups of 4 interleaved across the G lanes (row(e) below), so the
// lanes of a column read consecutive float4 of the staged row vectors: no bank conflicts.
template <int N_>
struct ColTile {
  static constexpr int N = N_;
  static constexpr int RR = N == 16 ? 4 : 8;     // rows per thread
  static constexpr int G = N / RR;               // lanes per column
  static constexpr int THREADS = N >= 64 ? 128 : 64;
  static constexpr int COLS = THREADS / G;       // columns per block
  static_assert(RR % 4 == 0 && G <= 32 && COLS <= N && N % COLS == 0, "bad column tile");
};

template <class T, int V, int N>
__global__ void __launch_bounds__(ColTile<N>::THREADS) wkv_columns_kernel(const WkvBackwardProblem p,
                                                                           const Scratch sc) {
  using Tile = ColTile<N>;
  constexpr int RR = Tile::RR, G = Tile::G, COLS = Tile::COLS, THREADS = Tile::THREADS;
  // row vectors of the chunk: v, grad_y, and for WKV-7 sa and dsa
  __shared__ __align__(16) float rv[kChunk][N];
  __shared__ __align__(16) float rgy[kChunk][N];
  __shared__ __align__(16) float rsa[V == 7 ? kChunk : 1][N];
  __shared__ __align__(16) float rdsa[V == 7 ? kChunk : 1][N];
  // this block's columns of r, decay, k, a, b
  __shared__ float cr[kChunk][COLS], cd[kChunk][COLS], ck[kChunk][COLS];
  __shared__ float ca[V == 7 ? kChunk : 1][COLS], cb[V == 7 ? kChunk : 1][COLS];

  const int gl = threadIdx.x % G, col_local = threadIdx.x / G;
  const int col0 = blockIdx.x * COLS, j = col0 + col_local;
  // this thread's e-th row
  auto row = [gl](int e) { return ((e / 4) * G + gl) * 4 + e % 4; };
  const int h = blockIdx.y, s = blockIdx.z;
  const int64_t H = p.H;
  const Segment g = segment_of(p, s);

  float dS[RR];  // dLoss/dS[row(e), j], walking backwards in time
#pragma unroll
  for (int e = 0; e < RR; ++e)
    dS[e] = p.grad_state ? static_cast<const float*>(p.grad_state)[((int64_t(s) * H + h) * N + row(e)) * N + j] : 0.f;
  const float uj = V == 6 ? load<T>(p.u, int64_t(h) * N + j) : 0.f;
  float du = 0.f;
  // The gradient whose column sums this lane stores in the walk back (chosen once, by bitwise
  // selects: per-step branches or lane masks cost scalar registers and instructions on gfx942).
  void* const own_grad = V == 7 ? select_ptr(gl / (G / 4), p.grad_k, p.grad_b, p.grad_w, p.grad_a)
                                : select_ptr(gl / (G / 2), p.grad_k, p.grad_w, nullptr, nullptr);
  const uint32_t k_lane = 0u - uint32_t(gl < G / 2);  // WKV-6: this lane's sum is grad_k's

  const int num_chunks = (g.len + kChunk - 1) / kChunk;
  for (int c = num_chunks - 1; c >= 0; --c) {
    const int c0 = c * kChunk, n = min(kChunk, g.len - c0);
    __syncthreads();
    for (int idx = threadIdx.x; idx < n * N; idx += THREADS) {
      const int st = idx / N, i = idx % N;
      const int64_t off = ((g.bos + c0 + st) * H + h) * N + i;
      rv[st][i] = load<T>(p.v, off);
      rgy[st][i] = p.grad_y ? load<T>(p.grad_y, off) : 0.f;
      if (V == 7) {
        rsa[st][i] = sc.sa[off];
        rdsa[st][i] = sc.dsa[off];
      }
    }
    for (int idx = threadIdx.x; idx < n * COLS; idx += THREADS) {
      const int st = idx / COLS, cc = idx % COLS;
      const int64_t off = ((g.bos + c0 + st) * H + h) * N + col0 + cc;
      cr[st][cc] = load<T>(p.r, off);
      cd[st][cc] = expf(load<T>(p.w, off));
      ck[st][cc] = load<T>(p.k, off);
      if (V == 7) {
        ca[st][cc] = load<T>(p.a, off);
        cb[st][cc] = load<T>(p.b, off);
      }
    }
    __syncthreads();

    // Recompute the chunk: prev[st][e] = S_{t-1}[row(e), j] for each step t = c0 + st; along the
    // way, grad_r (it needs S_t for WKV-7, S_{t-1} for WKV-6, never dS).
    float prev[kChunk][RR];
    float gyv[kChunk];  // WKV-6: grad_y_t . v_t
    float S[RR];
    const float* snap = sc.snapshots + ((g.first_slot + c) * H + h) * N * N + int64_t(j) * N;
#pragma unroll
    for (int e = 0; e < RR; e += 4) {
      const float4 x = *reinterpret_cast<const float4*>(snap + row(e));
      S[e] = x.x, S[e + 1] = x.y, S[e + 2] = x.z, S[e + 3] = x.w;
    }
#pragma unroll
    for (int st = 0; st < kChunk; ++st) {
      gyv[st] = 0.f;
      if (st >= n) continue;  // uniform over the block
      const int64_t out = ((g.bos + c0 + st) * H + h) * N + j;
      const float d = cd[st][col_local], kj = ck[st][col_local];
      float dr = 0.f;
      if (V == 7) {
        const float bj = cb[st][col_local];
#pragma unroll
        for (int e = 0; e < RR; ++e) {
          prev[st][e] = S[e];
          S[e] = fmaf(S[e], d, fmaf(rsa[st][row(e)], bj, rv[st][row(e)] * kj));
          dr = fmaf(S[e], rgy[st][row(e)], dr);
        }
        dr = group_sum<G>(dr);
      } else {
        float gv = 0.f;
#pragma unroll
        for (int e = 0; e < RR; ++e) {
          prev[st][e] = S[e];
          dr = fmaf(S[e], rgy[st][row(e)], dr);
          gv = fmaf(rgy[st][row(e)], rv[st][row(e)], gv);
          S[e] = fmaf(S[e], d, rv[st][row(e)] * kj);
        }
        dr = group_sum<G>(dr);
        gv = group_sum<G>(gv);
        gyv[st] = gv;
        dr = fmaf(uj * kj, gv, dr);
      }
      if (gl == 0) store<T>(p.grad_r, out, dr);
    }

    // Walk back through the chunk.
#pragma unroll
    for (int st = kChunk - 1; st >= 0; --st) {
      if (st >= n) continue;
      const int64_t out = ((g.bos + c0 + st) * H + h) * N + j;
      const float d = cd[st][col_local], rj = cr[st][col_local];
      if (V == 7) {
        // dS (for S_t) += gy r^T; grad_k = dS^T v; grad_b = dS^T sa; grad_w = d * sum dS S_{t-1};
        // grad_a = S_{t-1}^T dsa; then dS (for S_{t-1}) = dS diag(d) + dsa a^T
        const float aj = ca[st][col_local];
        float dk = 0.f, db = 0.f, dw = 0.f, da = 0.f;
#pragma unroll
        for (int e = 0; e < RR; ++e) {
          const float ds = fmaf(rgy[st][row(e)], rj, dS[e]);
          dk = fmaf(ds, rv[st][row(e)], dk);
          db = fmaf(ds, rsa[st][row(e)], db);
          dw = fmaf(ds, prev[st][e], dw);
          da = fmaf(prev[st][e], rdsa[st][row(e)], da);
          dS[e] = fmaf(ds, d, rdsa[st][row(e)] * aj);
        }
        // the four column sums at once: lane q * G / 4 holds sum q, and stores it to own_grad
        const float sums[4] = {dk, db, dw * d, da};
        const float total = group_sums_scattered<G, 4>(sums, gl);
        if (gl % (G / 4) == 0) store_global<T>(own_grad, out, from_float<T>(total));
      } else {
        // dS is for S_t (y_t reads S_{t-1}): grad_k = dS^T v + u r (gy . v);
        // grad_w = d * sum dS S_{t-1}; then dS (for S_{t-1}) = dS diag(d) + gy r^T
        const float kj = ck[st][col_local];
        float dk = 0.f, dw = 0.f;
#pragma unroll
        for (int e = 0; e < RR; ++e) {
          dk = fmaf(dS[e], rv[st][row(e)], dk);
          dw = fmaf(dS[e], prev[st][e], dw);
          dS[e] = fmaf(dS[e], d, rgy[st][row(e)] * rj);
        }
        // both column sums at once: lane 0 holds grad_k's (the bonus term still to add), lane
        // G/2 grad_w's; each stores its own to own_grad
        const float sums[2] = {dk, dw * d};
        const float total = group_sums_scattered<G, 2>(sums, gl);
        du = fmaf(rj * kj, gyv[st], du);
        if (gl % (G / 2) == 0)
          store_global<T>(own_grad, out, from_float<T>(select_bits(k_lane, fmaf(uj * rj, gyv[st], total), total)));
      }
    }
  }
  if (V == 6 && gl == 0) sc.grad_u_partial[(int64_t(s) * H + h) * N + j] = du;
}

// ---------------------------------------------------------------------------------------------
// Launchers. Each launch is checked at once, so a failure names its kernel.

template <class T> constexpr const char* dtype_name();
template <> constexpr const char* dtype_name<float>() { return "f32"; }
template <> constexpr const char* dtype_name<Bf16>() { return "bf16"; }
template <> constexpr const char* dtype_name<F16>() { return "f16"; }

// The kernels' names in launch errors, by version and step.
template <int V, int MODE>
constexpr const char* rows_kernel_name() {
  if (MODE == kForward) return V == 7 ? "wkv7_forward_rows" : "wkv6_forward_rows";
  if (MODE == kSnapshots) return V == 7 ? "wkv7_backward_snapshots" : "wkv6_backward_snapshots";
  return V == 7 ? "wkv7_backward_state_grad" : "wkv6_backward_state_grad";
}
template <int V>
constexpr const char* columns_kernel_name() {
  return V == 7 ? "wkv7_backward_columns" : "wkv6_backward_columns";
}

template <class T, int N>
LaunchStatus launch_status(const char* kernel) {
  const gpuError_t e = gpu_last_error();
  LaunchStatus s;
  if (!gpu_ok(e)) s = {gpu_error_string(e), kernel, dtype_name<T>(), N};
  return s;
}

template <class T, int V, class Tile, int MODE>
void launch_rows_tile(const WkvBackwardProblem& p, const Scratch& sc, const Device& d) {
  const dim3 grid(unsigned(Tile::N / Tile::ROWS), unsigned(p.H), unsigned(p.num_seqs));
  const auto kernel = wkv_rows_kernel<T, V, Tile, MODE>;
  ARWKV_LAUNCH(kernel, grid, Tile::THREADS, static_cast<gpuStream>(d.stream), p, sc);
}

template <class T, int V, int N, int MODE>
LaunchStatus launch_rows(const WkvBackwardProblem& p, const Scratch& sc, const Device& d) {
  using Wide = typename WideRows<N>::Tile;
  using Narrow = typename NarrowRows<N>::Tile;
  // Fewer wide blocks than two per multiprocessor leaves most of the GPU idle (decoding, one
  // long sequence): split each head into more, narrower row bands instead.
  const int64_t wide_blocks = p.num_seqs * p.H * (N / Wide::ROWS);
  if (wide_blocks >= 2 * int64_t(d.num_sms))
    launch_rows_tile<T, V, Wide, MODE>(p, sc, d);
  else
    launch_rows_tile<T, V, Narrow, MODE>(p, sc, d);
  return launch_status<T, N>(rows_kernel_name<V, MODE>());
}

template <class T, int V, int N>
LaunchStatus launch_columns(const WkvBackwardProblem& p, const Scratch& sc, const Device& d) {
  using Tile = ColTile<N>;
  const dim3 grid(unsigned(N / Tile::COLS), unsigned(p.H), unsigned(p.num_seqs));
  const auto kernel = wkv_columns_kernel<T, V, N>;
  ARWKV_LAUNCH(kernel, grid, Tile::THREADS, static_cast<gpuStream>(d.stream), p, sc);
  return launch_status<T, N>(columns_kernel_name<V>());
}

template <class T, int V, int N>
LaunchStatus forward_n(const WkvProblem& p, const Device& d) {
  WkvBackwardProblem args;  // the kernels' one argument type; no gradients in the forward
  static_cast<WkvProblem&>(args) = p;
  return launch_rows<T, V, N, kForward>(args, Scratch{}, d);
}

template <class T, int V, int N>
LaunchStatus backward_n(const WkvBackwardProblem& p, const Scratch& sc, const Device& d) {
  LaunchStatus s = launch_rows<T, V, N, kSnapshots>(p, sc, d);
  if (s.ok()) s = launch_rows<T, V, N, kStateGrad>(p, sc, d);
  if (s.ok()) s = launch_columns<T, V, N>(p, sc, d);
  return s;
}

// f(std::integral_constant<int, N>) for the problem's head size N, one instantiation per entry
// of kHeadSizes (the one list; a head size added there needs its row tiles above).
template <class F, size_t... I>
LaunchStatus with_head_size(int64_t n, const char* kernel, const char* dtype, F&& f, std::index_sequence<I...>) {
  LaunchStatus s{"unsupported head size", kernel, dtype, int(n)};
  (void)((n == kHeadSizes[I] ? (s = f(std::integral_constant<int, kHeadSizes[I]>{}), true) : false) || ...);
  return s;
}
template <class F>
LaunchStatus with_head_size(int64_t n, const char* kernel, const char* dtype, F&& f) {
  return with_head_size(n, kernel, dtype, static_cast<F&&>(f), std::make_index_sequence<kNumHeadSizes>());
}

// The chunked kernels (wkv_gpu_chunked.cuh): the fused forward (forward); the fused forward's
// saves pass, the state-gradient pass, the per-chunk gradients (backward).
template <int V>
constexpr const char* chunk_kernel_name(int which) {
  constexpr const char* names7[] = {"wkv7_chunk_forward", "wkv7_chunk_saves", "wkv7_chunk_state_grad",
                                    "wkv7_chunk_grads"};
  constexpr const char* names6[] = {"wkv6_chunk_forward", "wkv6_chunk_saves", "wkv6_chunk_state_grad",
                                    "wkv6_chunk_grads"};
  return V == 7 ? names7[which] : names6[which];
}

template <class T, int V, int N>
LaunchStatus chunked_n(const WkvBackwardProblem& p, const Scratch& sc, const Device& d, bool backward) {
  using namespace chunked;
  const auto stream = static_cast<gpuStream>(d.stream);
  const dim3 per_sequence(unsigned(p.H), unsigned(p.num_seqs));
  const WkvProblem& fp = p;
  if (!inputs_aligned(fp))
    return {"inputs r, w, k (a, b) are not 16-byte aligned (the op makes aligned copies)",
            chunk_kernel_name<V>(backward ? 1 : 0), dtype_name<T>(), N};
  if (!backward) {
    const auto fused = wkv_chunk_fused_forward_kernel<T, V, N, false>;
    ARWKV_LAUNCH(fused, per_sequence, N / 16 * kWarpSize, stream, fp, sc);
    return launch_status<T, N>(chunk_kernel_name<V>(0));
  }
  const auto saves = wkv_chunk_fused_forward_kernel<T, V, N, true>;
  ARWKV_LAUNCH(saves, per_sequence, N / 16 * kWarpSize, stream, fp, sc);
  LaunchStatus s = launch_status<T, N>(chunk_kernel_name<V>(1));
  if (s.ok()) {
    const auto state_grad = wkv_chunk_state_grad_kernel<T, V, N>;
    ARWKV_LAUNCH(state_grad, dim3(unsigned(N / 16), unsigned(p.H), unsigned(p.num_seqs)), kWarpSize, stream, p, sc);
    s = launch_status<T, N>(chunk_kernel_name<V>(2));
  }
  if (s.ok()) {
    const auto grads = wkv_chunk_grads_kernel<T, V, N>;
    const dim3 per_chunk(unsigned(num_chunk_slots(p, kChunkSteps)), unsigned(p.H));
    ARWKV_LAUNCH(grads, per_chunk, grad_warps<N>() * kWarpSize, stream, p, sc);
    s = launch_status<T, N>(chunk_kernel_name<V>(3));
  }
  return s;
}

template <class T, int V>
LaunchStatus forward_v(const WkvProblem& p, const Scratch& sc, const Device& d) {
  if (d.algorithm == Algorithm::chunked) {
    WkvBackwardProblem args;  // the kernels' one argument type; no gradients in the forward
    static_cast<WkvProblem&>(args) = p;
    return with_head_size(p.N, chunk_kernel_name<V>(0), dtype_name<T>(),
                          [&](auto n) { return chunked_n<T, V, decltype(n)::value>(args, sc, d, false); });
  }
  return with_head_size(p.N, rows_kernel_name<V, kForward>(), dtype_name<T>(),
                        [&](auto n) { return forward_n<T, V, decltype(n)::value>(p, d); });
}

template <class T, int V>
LaunchStatus backward_v(const WkvBackwardProblem& p, const Scratch& sc, const Device& d) {
  if (d.algorithm == Algorithm::chunked)
    return with_head_size(p.N, chunk_kernel_name<V>(1), dtype_name<T>(),
                          [&](auto n) { return chunked_n<T, V, decltype(n)::value>(p, sc, d, true); });
  return with_head_size(p.N, rows_kernel_name<V, kSnapshots>(), dtype_name<T>(),
                        [&](auto n) { return backward_n<T, V, decltype(n)::value>(p, sc, d); });
}

template <class T>
LaunchStatus forward(const WkvProblem& p, const Scratch& sc, const Device& d) {
  if (p.num_seqs == 0 || p.H == 0) return {};
  return p.version == 7 ? forward_v<T, 7>(p, sc, d) : forward_v<T, 6>(p, sc, d);
}

template <class T>
LaunchStatus backward(const WkvBackwardProblem& p, const Scratch& sc, const Device& d) {
  if (p.num_seqs == 0 || p.H == 0) return {};
  return p.version == 7 ? backward_v<T, 7>(p, sc, d) : backward_v<T, 6>(p, sc, d);
}

}  // namespace gpu
}  // namespace arwkv

#define ARWKV_INSTANTIATE_GPU_KERNELS(T)                                                                   \
  template arwkv::gpu::LaunchStatus arwkv::gpu::forward<T>(                                                \
      const arwkv::WkvProblem&, const arwkv::gpu::Scratch&, const arwkv::gpu::Device&);                    \
  template arwkv::gpu::LaunchStatus arwkv::gpu::backward<T>(                                               \
      const arwkv::WkvBackwardProblem&, const arwkv::gpu::Scratch&, const arwkv::gpu::Device&);
