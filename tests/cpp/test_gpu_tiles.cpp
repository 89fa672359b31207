// The tensor-core tile layer (csrc/gpu/wkv_gpu_compat.h) run on the CPU by the emulator
// (gpu_emulator.h), whose warp-wide mma.sync.m16n8k16 / wave-wide v_mfma_f32_16x16x16 know the
// hardware's fragment layouts on their own: a lane map in the tile layer that disagrees with the
// hardware gives wrong products here. Built twice by CMakeLists.txt: CUDA tiles on 32-lane
// warps, and HIP tiles on 64-lane waves (ARWKV_HIP).
//  - the device self-test (csrc/gpu/wkv_gpu_tiles_selftest.cuh, the one a GPU runs through
//    torch.ops.arwkv.gpu_tile_selftest()): (row, column)-encoded products through every load,
//    plain and transposed, from 16-bit and float arrays, bf16 and fp16, onto zeros and onto an
//    encoded C, on two warps, compared exactly with plain products; in every thread order;
//  - the accumulator's per-element rows and columns, load_tile_acc and store_tile_acc;
//  - rounding of float to bf16 / fp16 as the loads do it: to nearest, ties to even, against
//    values worked out by hand;
//  - a lane that skips mma() is a deadlock, reported as a launch failure;
//  - the emulator's own summation order (the one its comment states);
//  - split operands (near-fp32 products on bf16 tiles), their bound, and the rows they never read;
//  - the emulator's count of shared-memory bank conflicts (which the GPU model reads), on access
//    patterns whose wavefronts are known, and on the tile loads at a padded and an unpadded ld.
// What this cannot see: an order of k common to A and B (say both swapped the halves of their
// registers) cancels in every product, so it is harmless here; code that reuses accumulator
// registers as operands depends on it and needs a test of its own. And the real instructions:
// the self-test on a GPU (torch.ops.arwkv.gpu_tile_selftest()) checks the same lane maps there.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "emulated_checks.h"
#include "gpu/wkv_gpu_tiles_selftest.cuh"

namespace gpu = arwkv::gpu;
namespace tiles = arwkv::gpu::tiles;

namespace {

using namespace emulated;  // kPlatform, checks, failures, expect

std::string str(double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.9g", x);
  return buf;
}

// Launches kernel on one block of `warps` warps; "" or the launch error.
template <class... Params, class... Args>
std::string run(void (*kernel)(Params...), int warps, Args... args) {
  gpu_emu::launch("tiles", kernel, dim3(1), dim3(unsigned(warps * gpu::kWarpSize)), args...);
  const char* e = gpu_emu::take_error();
  return e ? e : "";
}

constexpr int kGuard = 8192;

void check_selftest() {
  std::vector<std::vector<float>> runs;
  for (auto schedule : {gpu_emu::Schedule::forward, gpu_emu::Schedule::reverse, gpu_emu::Schedule::shuffled}) {
    gpu_emu::set_schedule(schedule);
    // (a guard band after the tiles catches stores outside them)
    std::vector<float> out(tiles::kOutFloats + kGuard, std::nanf(""));
    const gpu::LaunchStatus s = tiles::tile_selftest(out.data(), gpu::Device{});
    expect(s.ok(), "self-test launch: " + gpu::describe(s));
    size_t stray = 0;
    for (size_t i = tiles::kOutFloats; i < out.size(); ++i) stray += !std::isnan(out[i]);
    expect(stray == 0, "self-test wrote " + std::to_string(stray) + " floats past its result tiles");
    runs.push_back(out);
  }
  gpu_emu::set_schedule(gpu_emu::Schedule::forward);
  const float* out = runs[0].data();
  for (int warp = 0; warp < tiles::kWarps; ++warp)
    for (int type = 0; type < 2; ++type)
      for (int c = 0; c < tiles::kCases; ++c) {
        const std::string why = tiles::tile_mismatch(out, warp, type, c);
        expect(why.empty(), "self-test " + why);
      }
  const std::string report = tiles::tile_selftest_report(out);
  expect(report == "bf16 ok, f16 ok", "self-test report reads \"" + report + "\"");
  // (bitwise: NaN == NaN here)
  for (size_t i = 1; i < runs.size(); ++i)
    expect(std::memcmp(runs[i].data(), runs[0].data(), runs[0].size() * sizeof(float)) == 0,
           std::string("self-test results depend on the order threads run in (") + (i == 1 ? "reverse" : "shuffled") +
               ")");
}

// Each warp sets its accumulator elements to 100 row + column + 1000 warp from TileAcc::row/col,
// stores it (ld 20), and round-trips a loaded tile through load_tile_acc / store_tile_acc.
constexpr int kLd = 20;
__global__ void acc_map_kernel(float* mapped, const float* src, float* copied) {
  const int warp = int(threadIdx.x) / gpu::kWarpSize;
  gpu::TileAcc c;
  for (int e = 0; e < gpu::kTileAcc; ++e)
    c.x[e] = float(100 * gpu::TileAcc::row(e) + gpu::TileAcc::col(e) + 1000 * warp);
  gpu::store_tile_acc(mapped + warp * 16 * kLd, kLd, c);
  gpu::store_tile_acc(copied + warp * 16 * kLd, kLd, gpu::load_tile_acc(src + warp * 16 * kLd, kLd));
}

void check_accumulator_access() {
  const int warps = 2;
  // (guard bands after the tiles, as above)
  std::vector<float> mapped(warps * 16 * kLd + kGuard, std::nanf("")), copied(mapped), src(mapped.size());
  for (size_t i = 0; i < src.size(); ++i) src[i] = float(i) * 0.5f;
  const std::string err =
      run(acc_map_kernel, warps, mapped.data(), static_cast<const float*>(src.data()), copied.data());
  expect(err.empty(), "accumulator kernel launch: " + err);
  for (int w = 0; w < warps; ++w) {
    std::string bad_map, bad_copy;
    for (int r = 0; r < (w + 1 == warps ? 16 + kGuard / kLd : 16); ++r)  // the last warp: its guard band too
      for (int c = 0; c < kLd; ++c) {
        const size_t i = size_t((w * 16 + r) * kLd + c);
        const bool in_tile = c < 16 && r < 16;
        const float want = float(100 * r + c + 1000 * w);
        if (bad_map.empty() && (in_tile ? mapped[i] != want : !std::isnan(mapped[i])))
          bad_map = "element (" + std::to_string(r) + ", " + std::to_string(c) + ") holds " + str(mapped[i]) +
                    (in_tile ? ", expected " + str(want) : ", outside the tile (expected untouched)");
        if (bad_copy.empty() && (in_tile ? copied[i] != src[i] : !std::isnan(copied[i])))
          bad_copy = "element (" + std::to_string(r) + ", " + std::to_string(c) + ") holds " + str(copied[i]) +
                     ", expected " + (in_tile ? str(src[i]) : "untouched");
      }
    expect(bad_map.empty(), "warp " + std::to_string(w) + " TileAcc::row/col, store_tile_acc: " + bad_map);
    expect(bad_copy.empty(), "warp " + std::to_string(w) + " load_tile_acc -> store_tile_acc: " + bad_copy);
  }
}

// Float operands rounded as the loads round them, read back through products with the identity:
// out[0] = A I with A from load_tile_a(src), out[1] = I B with B from load_tile_b(src),
// out[2] = A I with A from load_tile_a_transposed(src) (A = src^T).
template <class T>
__global__ void rounding_kernel(const float* src, const T* identity, float* out) {
  const gpu::TileAcc zero = gpu::fill_tile_acc(0.f);
  const gpu::TileB<T> id_b = gpu::load_tile_b<T>(identity, 16);
  gpu::store_tile_acc(out, 16, gpu::mma(gpu::load_tile_a<T>(src, 16), id_b, zero));
  gpu::store_tile_acc(out + 256, 16, gpu::mma(gpu::load_tile_a<T>(identity, 16), gpu::load_tile_b<T>(src, 16), zero));
  gpu::store_tile_acc(out + 512, 16, gpu::mma(gpu::load_tile_a_transposed<T>(src, 16), id_b, zero));
}

struct Rounding {
  const char* what;
  double in, want;
};

template <class T>
void check_rounding(const char* type, const std::vector<Rounding>& cases) {
  std::vector<float> src(256, 0.f), out(768, std::nanf(""));
  std::vector<T> identity(256, gpu::from_float<T>(0.f));
  for (int i = 0; i < 16; ++i) identity[i * 17] = gpu::from_float<T>(1.f);
  for (size_t j = 0; j < cases.size(); ++j) {
    src[j] = float(cases[j].in);
    expect(double(src[j]) == cases[j].in, std::string(type) + " rounding case " + cases[j].what + " is not a float");
  }
  const std::string err = run(rounding_kernel<T>, 1, static_cast<const float*>(src.data()),
                              static_cast<const T*>(identity.data()), out.data());
  expect(err.empty(), std::string(type) + " rounding kernel launch: " + err);
  const char* paths[3] = {"load_tile_a(float)", "load_tile_b(float)", "load_tile_a_transposed(float)"};
  for (int path = 0; path < 3; ++path)
    for (size_t j = 0; j < cases.size(); ++j) {
      // row 0 of src is row 0 of A and of B; of A^T it is column 0
      const double got = out[path * 256 + (path == 2 ? int(j) * 16 : int(j))];
      expect(got == cases[j].want, std::string(type) + " " + paths[path] + ": " + cases[j].what + " became " +
                                       str(got) + ", expected " + str(cases[j].want));
    }
}

// One lane of the warp skips the matrix product: the others wait for it forever.
__global__ void partial_mma_kernel(const gpu::Bf16* identity, float* out) {
  if (gpu::lane_id() == 3) return;
  const gpu::TileAcc d = gpu::mma(gpu::load_tile_a<gpu::Bf16>(identity, 16), gpu::load_tile_b<gpu::Bf16>(identity, 16),
                                  gpu::fill_tile_acc(0.f));
  gpu::store_tile_acc(out, 16, d);
}

void check_missing_lane_deadlocks() {
  std::vector<gpu::Bf16> identity(256, gpu::from_float<gpu::Bf16>(0.f));
  std::vector<float> out(256);
  const std::string err = run(partial_mma_kernel, 1, static_cast<const gpu::Bf16*>(identity.data()), out.data());
  expect(err.find("deadlock") != std::string::npos && err.find("matrix product") != std::string::npos,
         "a lane that skips mma() should fail the launch as a deadlock, got \"" + err + "\"");
}

// The emulator adds C and then the products in increasing k, in fp32: 2^24 + 1 + ... + 1 stays
// 2^24 (each + 1 is a tie, to even). The hardware may add in another order.
__global__ void order_kernel(const gpu::Bf16* a, const gpu::Bf16* b, float* out) {
  gpu::store_tile_acc(out, 16, gpu::mma(gpu::load_tile_a<gpu::Bf16>(a, 16), gpu::load_tile_b<gpu::Bf16>(b, 16),
                                        gpu::fill_tile_acc(0.f)));
}

void check_emulated_summation_order() {
  std::vector<gpu::Bf16> a(256, gpu::from_float<gpu::Bf16>(0.f)), b(a);
  for (int k = 0; k < 16; ++k) {
    a[k] = gpu::from_float<gpu::Bf16>(1.f);                          // A row 0: ones
    b[k * 16] = gpu::from_float<gpu::Bf16>(k == 0 ? 16777216.f : 1.f);  // B column 0: 2^24, 1, ..., 1
  }
  std::vector<float> out(256);
  const std::string err = run(order_kernel, 1, static_cast<const gpu::Bf16*>(a.data()),
                              static_cast<const gpu::Bf16*>(b.data()), out.data());
  expect(err.empty() && out[0] == 16777216.f,
         "emulated sum 2^24 + 15 x 1 in k order should stay 2^24, got " + str(out[0]) + " " + err);
}

// Split operands (load_split_*, mma_split): D = A B for float A, B of mixed magnitudes, each
// operand loaded plain or transposed with 11 valid stored rows (the rest hold NaN, so a read of
// them shows), against double products of the operands with those rows as zeros. Bound: hi + lo
// holds a float to 2^-17 of it and lo * lo (~2^-18) is left out, so each term is good to 2^-16
// of |a b|; the fp32 sums add ~16 * 2^-24 of the sum of |a b|.
constexpr int kValid = 11;
template <bool TA, bool TB>
__global__ void split_kernel(const float* a, const float* b, float* d) {
  const gpu::SplitA x = TA ? gpu::load_split_a_transposed(a, 16, kValid) : gpu::load_split_a(a, 16, kValid);
  const gpu::SplitB y = TB ? gpu::load_split_b_transposed(b, 16, kValid) : gpu::load_split_b(b, 16, kValid);
  gpu::store_tile_acc(d, 16, gpu::mma_split(x, y, gpu::fill_tile_acc(0.f)));
}

template <bool TA, bool TB>
void check_split_products() {
  std::vector<float> a(256), b(256), d(256, std::nanf(""));
  unsigned state = 12345;
  auto next = [&state] {  // values spread over 2^-6 .. 2^6 with both signs
    state = state * 1664525u + 1013904223u;
    const float m = float(state >> 8) / float(1u << 24);
    return (state & 1 ? -1.f : 1.f) * std::ldexp(0.5f + m, int(state >> 28) % 13 - 6);
  };
  for (int i = 0; i < 256; ++i) a[i] = i / 16 < kValid ? next() : std::nanf("");
  for (int i = 0; i < 256; ++i) b[i] = i / 16 < kValid ? next() : std::nanf("");
  const std::string err = run(split_kernel<TA, TB>, 1, static_cast<const float*>(a.data()),
                              static_cast<const float*>(b.data()), d.data());
  expect(err.empty(), "split product launch: " + err);
  // A[i][k] and B[k][j] as the loads see them (stored rows >= kValid are zeros)
  auto A = [&](int i, int k) { const int r = TA ? k : i, c = TA ? i : k; return r < kValid ? double(a[r * 16 + c]) : 0.0; };
  auto B = [&](int k, int j) { const int r = TB ? j : k, c = TB ? k : j; return r < kValid ? double(b[r * 16 + c]) : 0.0; };
  std::string bad;
  for (int i = 0; i < 16 && bad.empty(); ++i)
    for (int j = 0; j < 16 && bad.empty(); ++j) {
      double want = 0, mag = 0;
      for (int k = 0; k < 16; ++k) want += A(i, k) * B(k, j), mag += std::fabs(A(i, k) * B(k, j));
      const double got = d[i * 16 + j];
      if (!(std::fabs(got - want) <= (0x1p-16 + 16 * 0x1p-24) * mag))
        bad = "D[" + std::to_string(i) + "][" + std::to_string(j) + "] = " + str(got) + ", expected " + str(want) +
              " (sum of |terms| " + str(mag) + ")";
    }
  expect(bad.empty(), std::string("mma_split, A") + (TA ? " transposed" : "") + ", B" + (TB ? " transposed" : "") +
                          ": " + bad);
}

}  // namespace

// One warp: every lane reads 4-byte word stride * lane, or 8 / 16 bytes at (bytes / 4) * lane, of a
// shared array, then (as the gathers do) meets the others at a matrix product; and it gathers a
// split A tile along rows (load_split_a) from a [16][ld] array.
constexpr int kBankWords = 64 * 32 * 4;
template <int STRIDE, int BYTES>
__global__ void strided_access_kernel(float* out) {
  __shared__ __align__(16) float words[kBankWords];
  const int l = int(threadIdx.x);
  float x = 0.f;
  if (BYTES == 4) x = *ARWKV_NOTED(&words[STRIDE * l]);
  if (BYTES == 8) x = ARWKV_NOTED(reinterpret_cast<const float2*>(words) + l)->x;
  if (BYTES == 16) x = ARWKV_NOTED(reinterpret_cast<const float4*>(words) + l)->x;
  gpu::TileAcc c = gpu::mma(gpu::TileA<gpu::Bf16>{}, gpu::TileB<gpu::Bf16>{}, gpu::fill_tile_acc(x));
  out[l] = c.x[0];
}
template <int LD>
__global__ void split_gather_kernel(float* out) {
  __shared__ __align__(16) gpu::SplitBits tile[16][LD];
  const gpu::SplitA a = gpu::load_split_a(&tile[0][0], LD);
  const gpu::TileAcc c = gpu::mma(a.hi, gpu::TileB<gpu::Bf16>{}, gpu::fill_tile_acc(0.f));
  out[threadIdx.x] = c.x[0];
}

// Wavefronts over conflict-free wavefronts of the accesses counted while running `kernel`.
template <class Kernel>
double counted_conflicts(Kernel kernel) {
  std::vector<float> out(gpu::kWarpSize);
  gpu_emu::runtime().banks.clear();
  gpu_emu::runtime().count_banks = true;
  const std::string e = run(kernel, 1, out.data());
  gpu_emu::runtime().count_banks = false;
  expect(e.empty(), "bank count launch: " + e);
  int64_t wavefronts = 0, ideal = 0;
  for (const auto& [key, c] : gpu_emu::runtime().banks) wavefronts += c.wavefronts, ideal += c.ideal;
  return ideal ? double(wavefronts) / double(ideal) : 0.0;
}

void check_bank_conflicts() {
  const std::string where = std::string(kPlatform) + ", bank conflicts: ";
  auto check = [&](const std::string& what, double got, double want) {
    expect(got == want, where + what + " counted " + str(got) + ", expected " + str(want));
  };
  // 4-byte words 1 apart: one wavefront per 32 lanes; 32 apart: every lane in bank 0 (32 ways); 2
  // apart: 16 banks, 2 ways; 8- and 16-byte consecutive accesses: conflict-free phases
  check("stride 1", counted_conflicts(strided_access_kernel<1, 4>), 1.0);
  check("stride 32", counted_conflicts(strided_access_kernel<32, 4>), 32.0);
  check("stride 2", counted_conflicts(strided_access_kernel<2, 4>), 2.0);
  check("8-byte", counted_conflicts(strided_access_kernel<1, 8>), 1.0);
  check("16-byte", counted_conflicts(strided_access_kernel<1, 16>), 1.0);
  // The tile loads along rows from a [16][64] array: every row starts in bank 0 (CUDA: 8-byte loads,
  // 4 rows x 4 pairs a phase: 4 ways; gfx942: 16-byte loads, 8 rows a phase: 8 ways); padded by
  // the chunk kernels' kPad, none.
  check("split A, ld 64", counted_conflicts(split_gather_kernel<64>), gpu::kWarpSize == 64 ? 8.0 : 4.0);
  check("split A, ld 64 + pad", counted_conflicts(split_gather_kernel<64 + (gpu::kWarpSize == 64 ? 4 : 8)>), 1.0);
}

int main() {
  check_selftest();
  check_bank_conflicts();
  check_accumulator_access();
  const double p8 = 0x1p-8, p11 = 0x1p-11;
  check_rounding<gpu::Bf16>(
      "bf16", {{"1 + 2^-8 (tie)", 1 + p8, 1},
               {"1 + 3 2^-8 (tie)", 1 + 3 * p8, 1 + 0x1p-6},
               {"1 + 2^-8 + 2^-16 (past the tie)", 1 + p8 + 0x1p-16, 1 + 0x1p-7},
               {"1 + 2^-8 - 2^-16 (short of the tie)", 1 + p8 - 0x1p-16, 1},
               {"-(1 + 2^-8) (tie)", -(1 + p8), -1},
               {"-(1 + 3 2^-8) (tie)", -(1 + 3 * p8), -(1 + 0x1p-6)},
               {"257 (tie)", 257, 256},
               {"259 (tie)", 259, 260},
               {"2^-10 (1 + 2^-8) (tie)", 0x1p-10 * (1 + p8), 0x1p-10},
               {"0.1f", double(0.1f), 0.10009765625},
               {"1/3f", double(1.f / 3.f), 0.333984375},
               {"-7.5", -7.5, -7.5},
               {"1.75 + 2^-7 (exact)", 1.75 + 0x1p-7, 1.75 + 0x1p-7}});
  check_rounding<gpu::F16>(
      "f16", {{"1 + 2^-11 (tie)", 1 + p11, 1},
              {"1 + 3 2^-11 (tie)", 1 + 3 * p11, 1 + 0x1p-9},
              {"1 + 2^-11 + 2^-20 (past the tie)", 1 + p11 + 0x1p-20, 1 + 0x1p-10},
              {"1 + 2^-11 - 2^-20 (short of the tie)", 1 + p11 - 0x1p-20, 1},
              {"-(1 + 3 2^-11) (tie)", -(1 + 3 * p11), -(1 + 0x1p-9)},
              {"2049 (tie)", 2049, 2048},
              {"2051 (tie)", 2051, 2052},
              {"0.1f", double(0.1f), 0.0999755859375},
              {"1/3f", double(1.f / 3.f), 0.333251953125},
              {"1.5 2^-24 (subnormal tie)", 1.5 * 0x1p-24, 0x1p-23},
              {"65504 (largest)", 65504, 65504}});
  check_missing_lane_deadlocks();
  check_emulated_summation_order();
  check_split_products<false, false>();
  check_split_products<true, false>();
  check_split_products<false, true>();
  check_split_products<true, true>();
  std::printf("%s: %d passed, %d failed (tile layer)\n", kPlatform, checks - failures, failures);
  return failures ? 1 : 0;
}
