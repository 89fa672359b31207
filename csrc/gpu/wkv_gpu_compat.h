// The one place where CUDA and HIP differ for the WKV kernels: runtime header, stream type,
// launch, lane shuffles and 16-bit float conversions. Everything else is written once, in CUDA
// spelling. No ATen here: the kernel files compile standalone (nvcc, or clang -x hip for gfx942),
// and, with ARWKV_GPU_EMULATION, as plain C++ on a CPU for the C++ tests (tests/cpp/gpu_emulator.h;
// ARWKV_HIP defined beside it picks the HIP tiles and 64-lane waves).
#pragma once

#include <stdint.h>

#include <type_traits>

#if defined(ARWKV_GPU_EMULATION)
#include "gpu_emulator.h"
#elif defined(__HIP_PLATFORM_AMD__) || defined(USE_ROCM) || defined(__HIPCC__)
#define ARWKV_HIP 1
#include <hip/hip_runtime.h>
#else
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include "wkv_gpu.h"

namespace arwkv {
namespace gpu {

#if defined(ARWKV_GPU_EMULATION)
using gpuError_t = const char*;  // null: no error
using gpuStream = void*;
inline gpuError_t gpu_last_error() { return gpu_emu::take_error(); }
inline bool gpu_ok(gpuError_t e) { return e == nullptr; }
inline const char* gpu_error_string(gpuError_t e) { return e; }
#define ARWKV_LAUNCH(kernel, grid, block, stream, ...) gpu_emu::launch(#kernel, kernel, grid, block, __VA_ARGS__)
// (the emulator notes the tile layer's memory accesses, to count shared-memory bank conflicts)
#define ARWKV_NOTED(ptr) gpu_emu::note_access((ptr), __FILE__, __LINE__)
#elif defined(ARWKV_HIP)
using gpuError_t = hipError_t;
using gpuStream = hipStream_t;
inline gpuError_t gpu_last_error() { return hipGetLastError(); }
inline bool gpu_ok(gpuError_t e) { return e == hipSuccess; }
inline const char* gpu_error_string(gpuError_t e) { return hipGetErrorString(e); }
#else
using gpuError_t = cudaError_t;
using gpuStream = cudaStream_t;
inline gpuError_t gpu_last_error() { return cudaGetLastError(); }
inline bool gpu_ok(gpuError_t e) { return e == cudaSuccess; }
inline const char* gpu_error_string(gpuError_t e) { return cudaGetErrorString(e); }
#endif
#if !defined(ARWKV_GPU_EMULATION)
#define ARWKV_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#define ARWKV_NOTED(ptr) (ptr)
#endif

// The value of lane (this lane ^ offset) of the same warp / wave; every lane must take part.
__device__ __forceinline__ float lane_xor(float x, int offset) {
#if defined(ARWKV_HIP)
  return __shfl_xor(x, offset);  // width defaults to the whole wave
#else
  return __shfl_xor_sync(0xffffffffu, x, offset);
#endif
}

// Element i of a T array in global memory, through a pointer the compiler cannot trace to a
// kernel argument (one made from an integer): on gfx942 a plain store through it would be a
// flat (generic) store, which also waits on the LDS counter; this one is a global store.
template <class T>
__device__ __forceinline__ void store_global(void* p, int64_t i, T x) {
#if defined(ARWKV_HIP) && defined(__HIP_DEVICE_COMPILE__)
  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "16- or 32-bit elements");
  if constexpr (sizeof(T) == 2)  // (structs cannot be assigned across address spaces: store bits)
    ((__attribute__((address_space(1))) uint16_t*)p)[i] = __builtin_bit_cast(uint16_t, x);
  else
    ((__attribute__((address_space(1))) uint32_t*)p)[i] = __builtin_bit_cast(uint32_t, x);
#else
  static_cast<T*>(p)[i] = x;
#endif
}

// Butterfly sum over groups of `width` adjacent lanes (width a power of two, at most 32), so it
// means the same on 32-lane warps and 64-lane waves. Every lane of the wave must take part.
template <int width>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int offset = width / 2; offset > 0; offset /= 2) x += lane_xor(x, offset);  // stays in the group
  return x;
}

// 16-bit storage types (plain structs from wkv_gpu.h) to and from float. Arithmetic is always
// float: torch builds with __CUDA_NO_HALF_OPERATORS__, and the state must stay float32 anyway.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(Bf16 x) { return __uint_as_float(uint32_t(x.bits) << 16); }
__device__ __forceinline__ float to_float(F16 x) {
#if defined(ARWKV_HIP)
  return float(__builtin_bit_cast(_Float16, x.bits));
#else
  return __half2float(__ushort_as_half(x.bits));
#endif
}

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
// bf16 rounding to nearest even: one cvt instruction on sm_80 and newer; elsewhere (gfx942 has
// no such instruction, and the CPU emulator) integer arithmetic that rounds the same way (a NaN
// stays a NaN; its payload bits may differ from the instruction's).
#if !defined(ARWKV_GPU_EMULATION) && !defined(ARWKV_HIP) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define ARWKV_BF16_CVT 1
#endif
template <>
__device__ __forceinline__ Bf16 from_float<Bf16>(float x) {
#if defined(ARWKV_BF16_CVT)
  uint16_t h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
  return Bf16{h};
#else
  uint32_t u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return Bf16{uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                                // round to nearest even
  return Bf16{uint16_t(u >> 16)};
#endif
}

// Two floats rounded to bf16 (as from_float<Bf16>) in one register, lo in the low half: one
// cvt.rn.bf16x2.f32 on sm_80 and newer.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
#if defined(ARWKV_BF16_CVT)
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));  // (the first source goes high)
  return r;
#else
  return uint32_t(from_float<Bf16>(lo).bits) | uint32_t(from_float<Bf16>(hi).bits) << 16;
#endif
}
template <>
__device__ __forceinline__ F16 from_float<F16>(float x) {
#if defined(ARWKV_HIP)
  return F16{__builtin_bit_cast(uint16_t, _Float16(x))};
#else
  return F16{__half_as_ushort(__float2half_rn(x))};
#endif
}

// Element i of a T array (float, Bf16 or F16) as a float, and a float stored to one.
template <class T>
__device__ __forceinline__ float load(const void* p, int64_t i) {
  return to_float(static_cast<const T*>(p)[i]);
}
template <class T>
__device__ __forceinline__ void store(void* p, int64_t i, float x) {
  static_cast<T*>(p)[i] = from_float<T>(x);
}

// K (4 or 8) consecutive elements of a T array as floats, from 8- or 16-byte loads: p must be
// aligned to the bytes of a load (K * 2 for 16-bit T; 16 for float).
template <class T, int K>
__device__ __forceinline__ void load_vec(const T* p, float (&x)[K]) {
  static_assert(K == 4 || K == 8, "4 or 8 elements");
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int i = 0; i < K / 4; ++i) {
      const float4 v = *ARWKV_NOTED(reinterpret_cast<const float4*>(p) + i);
      x[4 * i] = v.x, x[4 * i + 1] = v.y, x[4 * i + 2] = v.z, x[4 * i + 3] = v.w;
    }
  } else {
    uint32_t w[K / 2];
    if constexpr (K == 8) {
      const float4 v = *ARWKV_NOTED(reinterpret_cast<const float4*>(p));
      w[0] = __float_as_uint(v.x), w[1] = __float_as_uint(v.y), w[2] = __float_as_uint(v.z), w[3] = __float_as_uint(v.w);
    } else {
      const float2 v = *ARWKV_NOTED(reinterpret_cast<const float2*>(p));
      w[0] = __float_as_uint(v.x), w[1] = __float_as_uint(v.y);
    }
#pragma unroll
    for (int i = 0; i < K / 2; ++i) x[2 * i] = to_float(T{uint16_t(w[i] & 0xffffu)}), x[2 * i + 1] = to_float(T{uint16_t(w[i] >> 16)});
  }
}

// ---- Tensor-core tiles ----------------------------------------------------------------------
// D = A B + C for one 16 x 16 x 16 tile per warp (CUDA) or wave (HIP): A is 16 rows x 16 k and
// B is 16 k x 16 columns, both bf16 or fp16 (T = Bf16 or F16), C and D are fp32. CUDA runs it as
// two mma.sync.m16n8k16 (sm_80 and newer), one per 8-column half of B, C and D; gfx942 as one
// v_mfma_f32_16x16x16{bf16_1k,f16}. Every lane of the warp / wave must take part in mma().
//
// A lane holds kTileAB elements of A and of B, two to a 32-bit register (the lower element in
// the low half), and kTileAcc fp32 elements of C / D. Element e of lane l (l = threadIdx.x %
// kWarpSize: blocks are 1-D):
//  CUDA, g = l / 4, t = l % 4 (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point
//  type"; element e of A is a_e, of B and C/D element e % 4 of the (e / 4)-th m16n8k16):
//    A  row g + 8 * (e / 2 % 2),  k  2t + e % 2 + 8 * (e / 4)
//    B  k   2t + e % 2 + 8 * (e / 2 % 2),  column g + 8 * (e / 4)
//    C  row g + 8 * (e / 2 % 2),  column 2t + e % 2 + 8 * (e / 4)
//  gfx942, q = l / 16 (AMD Matrix Instruction Calculator, CDNA3, v_mfma_f32_16x16x16_{bf16,f16}):
//    A  row l % 16,  k 4q + e;   B  k 4q + e,  column l % 16;   C  row 4q + e,  column l % 16
// (So the accumulator is element for element an A operand on CUDA and a B operand on gfx942.)
// Loads take row-major arrays in shared or global memory with a leading dimension, of T or of
// float (rounded to T, to nearest even); gfx942 has no ldmatrix, so these are plain loads.
#if defined(ARWKV_HIP)
constexpr int kWarpSize = 64;
constexpr int kTileAB = 4, kTileAcc = 4;
__device__ __forceinline__ int tile_a_row(int l, int) { return l % 16; }
__device__ __forceinline__ int tile_a_k(int l, int e) { return 4 * (l / 16) + e; }
__device__ __forceinline__ int tile_b_k(int l, int e) { return 4 * (l / 16) + e; }
__device__ __forceinline__ int tile_b_col(int l, int) { return l % 16; }
__device__ __forceinline__ int tile_acc_row(int l, int e) { return 4 * (l / 16) + e; }
__device__ __forceinline__ int tile_acc_col(int l, int) { return l % 16; }
#else
constexpr int kWarpSize = 32;
constexpr int kTileAB = 8, kTileAcc = 8;
__device__ __forceinline__ int tile_a_row(int l, int e) { return l / 4 + 8 * (e / 2 % 2); }
__device__ __forceinline__ int tile_a_k(int l, int e) { return 2 * (l % 4) + e % 2 + 8 * (e / 4); }
__device__ __forceinline__ int tile_b_k(int l, int e) { return 2 * (l % 4) + e % 2 + 8 * (e / 2 % 2); }
__device__ __forceinline__ int tile_b_col(int l, int e) { return l / 4 + 8 * (e / 4); }
__device__ __forceinline__ int tile_acc_row(int l, int e) { return l / 4 + 8 * (e / 2 % 2); }
__device__ __forceinline__ int tile_acc_col(int l, int e) { return 2 * (l % 4) + e % 2 + 8 * (e / 4); }
#endif

__device__ __forceinline__ int lane_id() { return int(threadIdx.x % unsigned(kWarpSize)); }

// Which instruction a 16-bit type takes (only Bf16 and F16 have one).
template <class T> struct TileType;
template <> struct TileType<Bf16> { static constexpr bool bf16 = true; };
template <> struct TileType<F16> { static constexpr bool bf16 = false; };

// This lane's elements of an A / B operand (T: Bf16 or F16) and of an accumulator.
template <class T>
struct TileA {
  uint32_t reg[kTileAB / 2];
};
template <class T>
struct TileB {
  uint32_t reg[kTileAB / 2];
};
struct TileAcc {
  float x[kTileAcc];
  // Row and column of this lane's element e, for element-wise work (masks, scales).
  __device__ static int row(int e) { return tile_acc_row(lane_id(), e); }
  __device__ static int col(int e) { return tile_acc_col(lane_id(), e); }
};

// The bits of one operand element: a T as it is, a float rounded to T.
template <class T>
__device__ __forceinline__ uint32_t tile_bits(T x) { return x.bits; }
template <class T>
__device__ __forceinline__ uint32_t tile_bits(float x) { return from_float<T>(x).bits; }

// Registers of an operand whose element e this lane reads from p[at(lane, e)].
template <class T, class S, class At>
__device__ __forceinline__ void gather_tile(uint32_t (&reg)[kTileAB / 2], const S* p, At at) {
  const int l = lane_id();
#pragma unroll
  for (int e = 0; e < kTileAB; e += 2)
    reg[e / 2] = tile_bits<T>(p[at(l, e)]) | tile_bits<T>(p[at(l, e + 1)]) << 16;
}

// A[i][k] = p[i * ld + k]; transposed: A[i][k] = p[k * ld + i] (p holds A^T). S: T or float.
template <class T, class S>
__device__ __forceinline__ TileA<T> load_tile_a(const S* p, int ld) {
  TileA<T> a;
  gather_tile<T>(a.reg, p, [ld](int l, int e) { return tile_a_row(l, e) * ld + tile_a_k(l, e); });
  return a;
}
template <class T, class S>
__device__ __forceinline__ TileA<T> load_tile_a_transposed(const S* p, int ld) {
  TileA<T> a;
  gather_tile<T>(a.reg, p, [ld](int l, int e) { return tile_a_k(l, e) * ld + tile_a_row(l, e); });
  return a;
}
// B[k][j] = p[k * ld + j]; transposed: B[k][j] = p[j * ld + k] (p holds B^T). S: T or float.
template <class T, class S>
__device__ __forceinline__ TileB<T> load_tile_b(const S* p, int ld) {
  TileB<T> b;
  gather_tile<T>(b.reg, p, [ld](int l, int e) { return tile_b_k(l, e) * ld + tile_b_col(l, e); });
  return b;
}
template <class T, class S>
__device__ __forceinline__ TileB<T> load_tile_b_transposed(const S* p, int ld) {
  TileB<T> b;
  gather_tile<T>(b.reg, p, [ld](int l, int e) { return tile_b_col(l, e) * ld + tile_b_k(l, e); });
  return b;
}

// The accumulator: every element v, or C[i][j] = p[i * ld + j]; store D[i][j] to p[i * ld + j].
__device__ __forceinline__ TileAcc fill_tile_acc(float v) {
  TileAcc c;
#pragma unroll
  for (int e = 0; e < kTileAcc; ++e) c.x[e] = v;
  return c;
}
// (CUDA: elements e, e + 1 are adjacent columns, moved as one 8-byte pair: p and ld even)
__device__ __forceinline__ TileAcc load_tile_acc(const float* p, int ld) {
  TileAcc c;
#if defined(ARWKV_HIP)
#pragma unroll
  for (int e = 0; e < kTileAcc; ++e) c.x[e] = *ARWKV_NOTED(&p[TileAcc::row(e) * ld + TileAcc::col(e)]);
#else
#pragma unroll
  for (int e = 0; e < kTileAcc; e += 2) {
    const float2 v = *ARWKV_NOTED(reinterpret_cast<const float2*>(&p[TileAcc::row(e) * ld + TileAcc::col(e)]));
    c.x[e] = v.x, c.x[e + 1] = v.y;
  }
#endif
  return c;
}
__device__ __forceinline__ void store_tile_acc(float* p, int ld, const TileAcc& d) {
#if defined(ARWKV_HIP)
#pragma unroll
  for (int e = 0; e < kTileAcc; ++e) *ARWKV_NOTED(&p[TileAcc::row(e) * ld + TileAcc::col(e)]) = d.x[e];
#else
#pragma unroll
  for (int e = 0; e < kTileAcc; e += 2)
    *ARWKV_NOTED(reinterpret_cast<float2*>(&p[TileAcc::row(e) * ld + TileAcc::col(e)])) = float2{d.x[e], d.x[e + 1]};
#endif
}

// D = A B + C, products and sums in fp32 (every lane of the warp / wave takes part). Only the
// innermost step differs in the emulator: there gpu_emulator.h computes it from the same
// registers, with the hardware's lane maps of its own, so a wrong map above shows in the tests.
template <class T>
__device__ __forceinline__ TileAcc mma(const TileA<T>& a, const TileB<T>& b, const TileAcc& c) {
  TileAcc d = c;
#if defined(ARWKV_HIP)
#if defined(ARWKV_GPU_EMULATION)
  gpu_emu::mfma_f32_16x16x16(TileType<T>::bf16, a.reg, b.reg, c.x, d.x);
#elif defined(__HIP_DEVICE_COMPILE__)
  typedef float f32x4 __attribute__((ext_vector_type(4)));
  const f32x4 acc = __builtin_bit_cast(f32x4, c);  // (bit casts of the structs: arrays would decay)
  f32x4 r;
  if constexpr (TileType<T>::bf16) {
    typedef short i16x4 __attribute__((ext_vector_type(4)));
    r = __builtin_amdgcn_mfma_f32_16x16x16bf16_1k(__builtin_bit_cast(i16x4, a), __builtin_bit_cast(i16x4, b), acc,
                                                  0, 0, 0);
  } else {
    typedef _Float16 f16x4 __attribute__((ext_vector_type(4)));
    r = __builtin_amdgcn_mfma_f32_16x16x16f16(__builtin_bit_cast(f16x4, a), __builtin_bit_cast(f16x4, b), acc, 0,
                                              0, 0);
  }
  d = __builtin_bit_cast(TileAcc, r);
#endif
#else
#pragma unroll
  for (int h = 0; h < 2; ++h) {  // columns 8h .. 8h + 7: B registers 2h, 2h + 1; C / D elements 4h .. 4h + 3
    const float* ch = c.x + 4 * h;
    float* dh = d.x + 4 * h;
#if defined(ARWKV_GPU_EMULATION)
    const uint32_t bh[2] = {b.reg[2 * h], b.reg[2 * h + 1]};
    gpu_emu::mma_m16n8k16(TileType<T>::bf16, a.reg, bh, ch, dh);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (TileType<T>::bf16)
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
          "{%10,%11,%12,%13};\n"
          : "=f"(dh[0]), "=f"(dh[1]), "=f"(dh[2]), "=f"(dh[3])
          : "r"(a.reg[0]), "r"(a.reg[1]), "r"(a.reg[2]), "r"(a.reg[3]), "r"(b.reg[2 * h]), "r"(b.reg[2 * h + 1]),
            "f"(ch[0]), "f"(ch[1]), "f"(ch[2]), "f"(ch[3]));
    else
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
          "{%10,%11,%12,%13};\n"
          : "=f"(dh[0]), "=f"(dh[1]), "=f"(dh[2]), "=f"(dh[3])
          : "r"(a.reg[0]), "r"(a.reg[1]), "r"(a.reg[2]), "r"(a.reg[3]), "r"(b.reg[2 * h]), "r"(b.reg[2 * h + 1]),
            "f"(ch[0]), "f"(ch[1]), "f"(ch[2]), "f"(ch[3]));
#elif defined(__CUDA_ARCH__)
    __trap();  // the tiles need sm_80 or newer
#endif
  }
#endif
  return d;
}


// ---- Split operands: near-fp32 products on 16-bit tensor cores --------------------------------
// A float x is held as hi + lo, both bf16: hi = x rounded, lo = (x - hi) rounded, so hi + lo is x
// to about 2^-17 of |x| (16 significant bits; bf16 keeps fp32's exponent range, so nothing
// overflows that fp16 would). mma_split adds lo*hi, hi*lo, then hi*hi (the small terms first)
// and leaves out lo*lo (~2^-18): products to about 2^-16 relative, for 3 tensor-core steps.
// The chunked kernels use them wherever a float32 value (the state, a decayed operand, an
// intra-chunk matrix) meets a tensor core; 16-bit inputs split with lo = 0, exactly.
struct SplitA {
  TileA<Bf16> hi, lo;
};
struct SplitB {
  TileB<Bf16> hi, lo;
};

// Element (r, c) of a row-major array p with leading dimension ld, as a float; rows >= rows_valid
// read as 0 (the padded steps past a sequence's end, never read from memory).
template <class S>
__device__ __forceinline__ float element_or_zero(const S* p, int64_t ld, int rows_valid, int r, int c) {
  return r < rows_valid ? to_float(*ARWKV_NOTED(&p[int64_t(r) * ld + c])) : 0.f;
}

// A float stored already split (the chunked kernels' per-chunk operands: split once where they
// are made, not by every warp that multiplies them): hi = x rounded to bf16 in the low half, lo =
// (x - hi) rounded in the high half. Same 4 bytes as the float; a tile load only moves halves.
struct SplitBits {
  uint32_t bits;
};
__device__ __forceinline__ float to_float(SplitBits x) {
  return __uint_as_float(x.bits << 16) + __uint_as_float(x.bits & 0xffff0000u);
}
__device__ __forceinline__ SplitBits split_bits(float x) {
  const uint32_t hi = from_float<Bf16>(x).bits;
  return SplitBits{hi | uint32_t(from_float<Bf16>(x - __uint_as_float(hi << 16)).bits) << 16};
}

// Two values split as a pair (h2: their hi halves, the first value's low; l2: their lo halves),
// regrouped per value into SplitBits words (the same bits as split_bits).
__device__ __forceinline__ void split_pair_words(uint32_t h2, uint32_t l2, uint32_t& w0, uint32_t& w1) {
#if defined(__CUDA_ARCH__)
  w0 = __byte_perm(h2, l2, 0x5410), w1 = __byte_perm(h2, l2, 0x7632);
#else
  w0 = (h2 & 0xffffu) | l2 << 16, w1 = h2 >> 16 | (l2 & 0xffff0000u);
#endif
}

// K (a multiple of 4) consecutive floats stored split at dst (16-byte aligned), two at a time: each
// pair rounded by one paired conversion per half, then its halves regrouped per element, stored
// 16 bytes at a time. upper_first (K = 8): the upper 16 bytes are stored first. A warp's 16-byte
// stores are served 8 lanes at a time; where those lanes' 32-byte groups lie 32 bytes apart along
// a row, half of them landing 128 bytes on would share banks with the other half: storing the
// upper half first in those lanes puts every lane on banks of its own.
template <int K>
__device__ __forceinline__ void store_split(SplitBits* dst, const float (&x)[K], bool upper_first = false) {
  static_assert(K % 4 == 0, "whole 16-byte stores");
  uint32_t w[K];
#pragma unroll
  for (int i = 0; i < K; i += 2) {
    const uint32_t h2 = pack_bf16x2(x[i], x[i + 1]);
    const uint32_t l2 = pack_bf16x2(x[i] - __uint_as_float(h2 << 16), x[i + 1] - __uint_as_float(h2 & 0xffff0000u));
    split_pair_words(h2, l2, w[i], w[i + 1]);
  }
  auto quad = [&](int i) {
    return make_float4(__uint_as_float(w[i]), __uint_as_float(w[i + 1]), __uint_as_float(w[i + 2]), __uint_as_float(w[i + 3]));
  };
  if constexpr (K == 8) {
    const int first = upper_first ? 4 : 0;
    const float4 lower = quad(0), upper = quad(4);
    *ARWKV_NOTED(reinterpret_cast<float4*>(dst + first)) = upper_first ? upper : lower;
    *ARWKV_NOTED(reinterpret_cast<float4*>(dst + 4 - first)) = upper_first ? lower : upper;
  } else {
#pragma unroll
    for (int i = 0; i < K; i += 4) *ARWKV_NOTED(reinterpret_cast<float4*>(dst + i)) = quad(i);
  }
}

// hi and lo registers of an operand whose element e this lane reads at stored (row, column)
// rc(lane, e) of p. A bf16 source is exact: its bits are its hi, its lo is 0. (Through the
// conversion instead, the sm_90 grads kernel once avoided a spill; its products now take split
// operands and it has none either way, so every target takes the bits.) ALONG_ROWS: a lane's
// elements are consecutive columns of one row (2 on CUDA, 4 on gfx942: the k of an A operand, or
// of a B operand stored transposed), so 4-byte ones (split or float) load together, 8 or 16 bytes
// at a time (p and ld even; fewer instructions, and with a padded ld no bank conflicts).
template <bool ALONG_ROWS, class S, class RowCol>
__device__ __forceinline__ void gather_split(uint32_t (&hi)[kTileAB / 2], uint32_t (&lo)[kTileAB / 2], const S* p,
                                             int64_t ld, int rows_valid, RowCol rc) {
  constexpr bool kWords = std::is_same_v<S, SplitBits> || std::is_same_v<S, float>;
  const int l = lane_id();
#if defined(ARWKV_HIP)
  [[maybe_unused]] float4 row4;  // ALONG_ROWS, 4-byte elements: the lane's four, one 16-byte load
  if constexpr (ALONG_ROWS && kWords) {
    int r, c;
    rc(l, 0, r, c);
    row4 = r < rows_valid ? *ARWKV_NOTED(reinterpret_cast<const float4*>(p + int64_t(r) * ld + c))
                          : float4{0.f, 0.f, 0.f, 0.f};
  }
#endif
#pragma unroll
  for (int e = 0; e < kTileAB; e += 2) {
    int r0, c0, r1, c1;
    rc(l, e, r0, c0);
    rc(l, e + 1, r1, c1);
    if constexpr (kWords) {
      uint32_t x0, x1;  // the two elements' 4-byte words
      if constexpr (ALONG_ROWS) {
#if defined(ARWKV_HIP)
        x0 = __float_as_uint(e ? row4.z : row4.x), x1 = __float_as_uint(e ? row4.w : row4.y);
#else
        // (one statement: the machine code puts the load on the line of its use, where the model
        // looks up the conflicts the emulator noted)
        const float2* pair = reinterpret_cast<const float2*>(&p[int64_t(r0) * ld + c0]);
        const bool in = r0 < rows_valid;
        x0 = in ? __float_as_uint(ARWKV_NOTED(pair)->x) : 0u, x1 = in ? __float_as_uint(pair->y) : 0u;
#endif
      } else {
        x0 = r0 < rows_valid ? *ARWKV_NOTED(reinterpret_cast<const uint32_t*>(&p[int64_t(r0) * ld + c0])) : 0u;
        x1 = r1 < rows_valid ? *ARWKV_NOTED(reinterpret_cast<const uint32_t*>(&p[int64_t(r1) * ld + c1])) : 0u;
      }
      if constexpr (std::is_same_v<S, SplitBits>) {  // halves moved, nothing rounded
#if defined(__CUDA_ARCH__)
        hi[e / 2] = __byte_perm(x0, x1, 0x5410), lo[e / 2] = __byte_perm(x0, x1, 0x7632);  // one PRMT each
#else
        hi[e / 2] = (x0 & 0xffffu) | x1 << 16, lo[e / 2] = x0 >> 16 | (x1 & 0xffff0000u);
#endif
      } else {
        const float f0 = __uint_as_float(x0), f1 = __uint_as_float(x1);
        const uint32_t h2 = pack_bf16x2(f0, f1);
        hi[e / 2] = h2;
        lo[e / 2] = pack_bf16x2(f0 - __uint_as_float(h2 << 16), f1 - __uint_as_float(h2 & 0xffff0000u));
      }
    } else if constexpr (std::is_same_v<S, Bf16>) {
      const uint32_t x0 = r0 < rows_valid ? ARWKV_NOTED(&p[int64_t(r0) * ld + c0])->bits : 0u;
      const uint32_t x1 = r1 < rows_valid ? ARWKV_NOTED(&p[int64_t(r1) * ld + c1])->bits : 0u;
      hi[e / 2] = x0 | x1 << 16, lo[e / 2] = 0u;
    } else {
      const float x0 = element_or_zero(p, ld, rows_valid, r0, c0);
      const float x1 = element_or_zero(p, ld, rows_valid, r1, c1);
      const uint32_t h2 = pack_bf16x2(x0, x1);
      hi[e / 2] = h2;
      lo[e / 2] = pack_bf16x2(x0 - __uint_as_float(h2 << 16), x1 - __uint_as_float(h2 & 0xffff0000u));
    }
  }
}

// A[i][k] = p[i * ld + k]; transposed: A[i][k] = p[k * ld + i]. B[k][j] = p[k * ld + j];
// transposed: B[k][j] = p[j * ld + k]. S: float, Bf16 or F16; stored rows >= rows_valid are 0.
template <class S>
__device__ __forceinline__ SplitA load_split_a(const S* p, int64_t ld, int rows_valid = 16) {
  SplitA a;
  gather_split<true>(a.hi.reg, a.lo.reg, p, ld, rows_valid, [](int l, int e, int& r, int& c) { r = tile_a_row(l, e), c = tile_a_k(l, e); });
  return a;
}
template <class S>
__device__ __forceinline__ SplitA load_split_a_transposed(const S* p, int64_t ld, int rows_valid = 16) {
  SplitA a;
  gather_split<false>(a.hi.reg, a.lo.reg, p, ld, rows_valid, [](int l, int e, int& r, int& c) { r = tile_a_k(l, e), c = tile_a_row(l, e); });
  return a;
}
template <class S>
__device__ __forceinline__ SplitB load_split_b(const S* p, int64_t ld, int rows_valid = 16) {
  SplitB b;
  gather_split<false>(b.hi.reg, b.lo.reg, p, ld, rows_valid, [](int l, int e, int& r, int& c) { r = tile_b_k(l, e), c = tile_b_col(l, e); });
  return b;
}
template <class S>
__device__ __forceinline__ SplitB load_split_b_transposed(const S* p, int64_t ld, int rows_valid = 16) {
  SplitB b;
  gather_split<true>(b.hi.reg, b.lo.reg, p, ld, rows_valid, [](int l, int e, int& r, int& c) { r = tile_b_col(l, e), c = tile_b_k(l, e); });
  return b;
}

// An accumulator tile as a split operand, register for register, with no data movement: where the
// operand's lane map is the accumulator's own. On CUDA (m16n8k16) that is the A operand (element e
// at row tile_acc_row, k tile_acc_col); on gfx942 (16x16x16) the B operand (k tile_acc_row, column
// tile_acc_col). A product can thus take the previous one's result where that operand stands.
#if defined(ARWKV_HIP)
using AccOperand = SplitB;
#else
using AccOperand = SplitA;
#endif
__device__ __forceinline__ AccOperand split_acc(const TileAcc& c) {
  AccOperand o;
#pragma unroll
  for (int e = 0; e < kTileAcc; e += 2) {
    const uint32_t h2 = pack_bf16x2(c.x[e], c.x[e + 1]);
    o.hi.reg[e / 2] = h2;
    o.lo.reg[e / 2] = pack_bf16x2(c.x[e] - __uint_as_float(h2 << 16), c.x[e + 1] - __uint_as_float(h2 & 0xffff0000u));
  }
  return o;
}

// D = A B + C with split operands (3 tensor-core steps, every lane of the warp / wave).
__device__ __forceinline__ TileAcc mma_split(const SplitA& a, const SplitB& b, TileAcc c) {
  c = mma(a.lo, b.hi, c);
  c = mma(a.hi, b.lo, c);
  return mma(a.hi, b.hi, c);
}

}  // namespace gpu
}  // namespace arwkv
