// A device self-test of the tensor-core tile layer (wkv_gpu_compat.h): one block of two warps /
// waves runs (row, column)-encoded products through every load path, for bf16 and fp16, and
// the host compares each result tile with the plain product. Products with the identity show an
// operand's fragment element by element (a value tells which element of A or B it is), so a
// wrong lane map names the element it misplaces.
//
// The same code runs on the CPU in the emulator test (tests/cpp/test_gpu_tiles.cpp) and on a
// GPU through torch.ops.arwkv.gpu_tile_selftest() (wkv_gpu_backend.cpp). Its entry points are
// plain functions: include this file in one kernel file only (wkv_gpu_f32.cu).
#pragma once

#include <stdint.h>
#include <stdio.h>

#include <string>

#include "wkv_gpu_compat.h"

namespace arwkv {
namespace gpu {
namespace tiles {

constexpr int kWarps = 2;  // the second warp checks that lanes are counted within their warp
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kCases = 12;
constexpr int kTileFloats = 16 * 16;
// Result tiles: [warp][type: bf16, fp16][case][16][16].
constexpr int64_t kOutFloats = int64_t(kWarps) * 2 * kCases * kTileFloats;

// Where an operand comes from.
enum Source {
  kIdentity,      // a 16-bit identity matrix, plain load
  kPlain16,       // the encoded operand in a 16-bit array, plain load
  kTransposed16,  // its transpose in a 16-bit array, transposed load
  kPlainFloat,    // the encoded operand plus rounding probes in a float array, plain load
  kTransposedFloat,
};
struct Case {
  int a, b;  // Source of A and of B
  bool c;    // accumulate onto an encoded C (else onto zeros)
};
// Float sources only meet the identity, so that every product below is exact in fp32.
__host__ __device__ inline Case case_of(int i) {
  switch (i) {
    case 0: return {kPlain16, kIdentity, false};
    case 1: return {kTransposed16, kIdentity, false};
    case 2: return {kPlainFloat, kIdentity, false};
    case 3: return {kTransposedFloat, kIdentity, false};
    case 4: return {kIdentity, kPlain16, false};
    case 5: return {kIdentity, kTransposed16, false};
    case 6: return {kIdentity, kPlainFloat, false};
    case 7: return {kIdentity, kTransposedFloat, false};
    case 8: return {kPlain16, kPlain16, true};
    case 9: return {kTransposed16, kTransposed16, true};
    case 10: return {kPlain16, kTransposed16, true};
    default: return {kTransposed16, kPlain16, true};
  }
}

// The encodings, exact in bf16 (8 significant bits) and fp16: A[i][k] = i + k/16,
// B[k][j] = -(k + j/16), C[i][j] = 64 + i + j/16. Every partial sum of A B + C is a multiple of
// 2^-8 below 2^13, exact in fp32 whatever the order of summation.
__host__ __device__ inline float encode_a(int i, int k) { return float(i) + float(k) / 16.f; }
__host__ __device__ inline float encode_b(int k, int j) { return -(float(k) + float(j) / 16.f); }
__host__ __device__ inline float encode_c(int i, int j) { return 64.f + float(i) + float(j) / 16.f; }

// x moved by a fraction of its unit in the last place at p significant bits (bf16 8, fp16 11):
// none, exactly half (a tie: to even), minus half, a quarter, three quarters, just past half.
__host__ __device__ inline float rounding_probe(float x, int p, int which) {
  if (x == 0.f) return x;
  const float ax = x < 0.f ? -x : x;
  float u = 1.f;
  while (u > ax) u *= 0.5f;
  while (u * 2.f <= ax) u *= 2.f;
  for (int i = 1; i < p; ++i) u *= 0.5f;
  float step;  // (a switch, not a table: a table indexed at run time would live in scratch memory)
  switch (which % 6) {
    case 0: step = 0.f; break;
    case 1: step = 0.5f * u; break;
    case 2: step = -0.5f * u; break;
    case 3: step = 0.25f * u; break;
    case 4: step = 0.75f * u; break;
    default: step = 0.5f * u + u / 64.f; break;
  }
  return x < 0.f ? x - step : x + step;
}

// Operand element (r, c) (A: row, k; B: k, column) as the source holds it, before any rounding.
__host__ __device__ inline float operand_value(bool is_a, int source, int p, int r, int c) {
  if (source == kIdentity) return r == c ? 1.f : 0.f;
  const float x = is_a ? encode_a(r, c) : encode_b(r, c);
  return source == kPlainFloat || source == kTransposedFloat ? rounding_probe(x, p, 3 * r + c + (is_a ? 0 : 1)) : x;
}

template <class T> constexpr int precision();  // significant bits
template <> constexpr int precision<Bf16>() { return 8; }
template <> constexpr int precision<F16>() { return 11; }

// Shared-memory staging: leading dimensions and a column offset, so that a load that ignores
// either reads the wrong elements.
constexpr int kLd16 = 24, kLdFloat = 20, kCol0 = 4;

template <class T, class S>
__device__ __forceinline__ TileA<T> load_a_from(int source, const S* p, int ld) {
  return source == kTransposed16 || source == kTransposedFloat ? load_tile_a_transposed<T>(p, ld)
                                                               : load_tile_a<T>(p, ld);
}
template <class T, class S>
__device__ __forceinline__ TileB<T> load_b_from(int source, const S* p, int ld) {
  return source == kTransposed16 || source == kTransposedFloat ? load_tile_b_transposed<T>(p, ld)
                                                               : load_tile_b<T>(p, ld);
}

// out: this type's [warp][case][16][16] block of the result tiles is at out + type * kCases * 256
// within each warp's stretch (see tile_index).
__host__ __device__ inline int64_t tile_index(int warp, int type, int c) {
  return ((int64_t(warp) * 2 + type) * kCases + c) * kTileFloats;
}

template <class T>
__global__ void __launch_bounds__(kThreads) tile_selftest_kernel(float* out) {
  constexpr int type = TileType<T>::bf16 ? 0 : 1, p = precision<T>();
  __shared__ T a16[16 * kLd16], b16[16 * kLd16];
  __shared__ float af[16 * kLdFloat], bf[16 * kLdFloat];
  const int warp = int(threadIdx.x) / kWarpSize;
  for (int ci = 0; ci < kCases; ++ci) {
    const Case k = case_of(ci);
    float* tile = out + tile_index(warp, type, ci);
    // Array element (r, c) holds operand element (r, c), or (c, r) for a transposed load.
    for (int idx = threadIdx.x; idx < kTileFloats; idx += kThreads) {
      const int r = idx / 16, c = idx % 16;
      const bool ta = k.a == kTransposed16 || k.a == kTransposedFloat;
      const bool tb = k.b == kTransposed16 || k.b == kTransposedFloat;
      const float x = ta ? operand_value(true, k.a, p, c, r) : operand_value(true, k.a, p, r, c);
      const float y = tb ? operand_value(false, k.b, p, c, r) : operand_value(false, k.b, p, r, c);
      a16[r * kLd16 + kCol0 + c] = from_float<T>(x);  // (exact: 16-bit sources hold 16-bit values)
      af[r * kLdFloat + kCol0 + c] = x;
      b16[r * kLd16 + kCol0 + c] = from_float<T>(y);
      bf[r * kLdFloat + kCol0 + c] = y;
    }
    // C in this warp's result tile (global memory), read back through load_tile_acc
    for (int idx = lane_id(); idx < kTileFloats; idx += kWarpSize)
      tile[idx] = k.c ? encode_c(idx / 16, idx % 16) : 0.f;
    __syncthreads();
    const bool fa = k.a == kPlainFloat || k.a == kTransposedFloat;
    const bool fb = k.b == kPlainFloat || k.b == kTransposedFloat;
    const TileA<T> a = fa ? load_a_from<T>(k.a, af + kCol0, kLdFloat) : load_a_from<T>(k.a, a16 + kCol0, kLd16);
    const TileB<T> b = fb ? load_b_from<T>(k.b, bf + kCol0, kLdFloat) : load_b_from<T>(k.b, b16 + kCol0, kLd16);
    const TileAcc d = mma(a, b, load_tile_acc(tile, 16));
    store_tile_acc(tile, 16, d);
    __syncthreads();  // before the next case restages the arrays
  }
}

// The entry points (wkv_gpu_backend.cpp declares them): the floats of device memory the
// self-test writes, the launches, and the host's verdict on what they wrote.
int64_t tile_selftest_floats() { return kOutFloats; }

LaunchStatus tile_selftest(float* out, [[maybe_unused]] const Device& d) {  // (the emulator has no streams)
  const auto bf16_kernel = tile_selftest_kernel<Bf16>;
  ARWKV_LAUNCH(bf16_kernel, dim3(1), dim3(kThreads), static_cast<gpuStream>(d.stream), out);
  gpuError_t e = gpu_last_error();
  if (!gpu_ok(e)) return {gpu_error_string(e), "tile_selftest", "bf16", 16};
  const auto f16_kernel = tile_selftest_kernel<F16>;
  ARWKV_LAUNCH(f16_kernel, dim3(1), dim3(kThreads), static_cast<gpuStream>(d.stream), out);
  e = gpu_last_error();
  if (!gpu_ok(e)) return {gpu_error_string(e), "tile_selftest", "f16", 16};
  return {};
}

// ---- Host side: the expected tiles ----------------------------------------------------------

// x rounded to p significant bits, to nearest, ties to even: plain arithmetic, independent of
// the bit tricks (from_float) and hardware conversions the kernels use.
inline double round_to_bits(double x, int p) {
  if (x == 0) return 0;
  const double ax = x < 0 ? -x : x;
  double u = 1;
  while (u > ax) u /= 2;
  while (u * 2 <= ax) u *= 2;
  for (int i = 1; i < p; ++i) u /= 2;
  const double q = ax / u;  // below 2^p: exact
  double n = double(int64_t(q));
  if (q - n > 0.5 || (q - n == 0.5 && int64_t(n) % 2 == 1)) n += 1;
  return (x < 0 ? -n : n) * u;
}

// The operand element as the tile must hold it (A: row, k; B: k, column).
inline double expected_operand(bool is_a, int source, int p, int r, int c) {
  return round_to_bits(operand_value(is_a, source, p, r, c), p);
}

inline double expected_result(int ci, int p, int i, int j) {
  const Case k = case_of(ci);
  double d = k.c ? encode_c(i, j) : 0.0;
  for (int kk = 0; kk < 16; ++kk) d += expected_operand(true, k.a, p, i, kk) * expected_operand(false, k.b, p, kk, j);
  return d;  // exact in double
}

inline const char* source_name(bool is_a, int s) {
  switch (s) {
    case kIdentity: return "I";
    case kPlain16: return is_a ? "load_tile_a" : "load_tile_b";
    case kTransposed16: return is_a ? "load_tile_a_transposed" : "load_tile_b_transposed";
    case kPlainFloat: return is_a ? "load_tile_a(float)" : "load_tile_b(float)";
    default: return is_a ? "load_tile_a_transposed(float)" : "load_tile_b_transposed(float)";
  }
}

inline std::string case_name(int ci) {
  const Case k = case_of(ci);
  return std::string(source_name(true, k.a)) + " x " + source_name(false, k.b) + (k.c ? " + C" : "");
}

// "" when the tile is right, else its first wrong element and what it holds instead.
inline std::string tile_mismatch(const float* out, int warp, int type, int ci) {
  const int p = type == 0 ? 8 : 11;
  const float* tile = out + tile_index(warp, type, ci);
  int wrong = 0, first = -1;
  for (int idx = 0; idx < kTileFloats; ++idx) {
    if (double(tile[idx]) == expected_result(ci, p, idx / 16, idx % 16)) continue;  // (NaN: wrong)
    if (wrong++ == 0) first = idx;
  }
  if (wrong == 0) return "";
  const int i = first / 16, j = first % 16;
  const double got = tile[first], want = expected_result(ci, p, i, j);
  // After a product with the identity a value tells which operand element landed where.
  const Case k = case_of(ci);
  const bool a_shown = k.b == kIdentity && (k.a == kPlain16 || k.a == kTransposed16);
  const bool b_shown = k.a == kIdentity && (k.b == kPlain16 || k.b == kTransposed16);
  auto element = [&](double v) -> std::string {
    const double code = a_shown ? v * 16 : -v * 16;  // 16 row + column of the element
    if (!(a_shown || b_shown) || !(code >= 0 && code < 256) || code != double(int(code))) return "";
    return std::string(" = ") + (a_shown ? "A[" : "B[") + std::to_string(int(code) / 16) + "][" +
           std::to_string(int(code) % 16) + "]";
  };
  char buf[256];
  snprintf(buf, sizeof buf, "%s %s (warp %d): D[%d][%d] = %.9g%s, expected %.9g%s", type == 0 ? "bf16" : "f16",
           case_name(ci).c_str(), warp, i, j, got, element(got).c_str(), want, element(want).c_str());
  const std::string why = buf;
  return why + " (" + std::to_string(wrong) + " of 256 elements wrong)";
}

// "bf16 ok, f16 ok", or for a type the first wrong tile and element.
std::string tile_selftest_report(const float* out) {
  std::string report;
  for (int type = 0; type < 2; ++type) {
    std::string first;
    for (int warp = 0; warp < kWarps && first.empty(); ++warp)
      for (int ci = 0; ci < kCases && first.empty(); ++ci) first = tile_mismatch(out, warp, type, ci);
    report += (type ? ", " : "") + (first.empty() ? std::string(type == 0 ? "bf16 ok" : "f16 ok") : first);
  }
  return report;
}

}  // namespace tiles
}  // namespace gpu
}  // namespace arwkv
