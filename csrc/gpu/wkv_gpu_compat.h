// The one place where CUDA and HIP differ for the WKV kernels: runtime header, stream type,
// launch, lane shuffles and 16-bit float conversions. Everything else is written once, in CUDA
// spelling. No ATen here: the kernel files compile standalone (nvcc, or clang -x hip for gfx942),
// and, with ARWKV_GPU_EMULATION, as plain C++ on a CPU for the C++ tests (tests/cpp/gpu_emulator.h;
// ARWKV_HIP defined beside it picks the HIP tiles and 64-lane waves).
#pragma once

#include <stdint.h>

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
#define ARWKV_LAUNCH(kernel, grid, block, stream, ...) gpu_emu::launch(kernel, grid, block, __VA_ARGS__)
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
template <>
__device__ __forceinline__ Bf16 from_float<Bf16>(float x) {
  uint32_t u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return Bf16{uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                                // round to nearest even
  return Bf16{uint16_t(u >> 16)};
}
template <>
__device__ __forceinline__ F16 from_float<F16>(float x) {
#if defined(ARWKV_HIP)
  return F16{__builtin_bit_cast(uint16_t, _Float16(x))};
#else
  return F16{__half_as_ushort(__float2half_rn(x))};
#endif
}

}  // namespace gpu
}  // namespace arwkv
