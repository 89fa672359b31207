// WKV-7 / WKV-6 GPU kernels for bf16 inputs (one file per input type so they compile in parallel).
#include "wkv_gpu_kernels.cuh"

ARWKV_INSTANTIATE_GPU_KERNELS(arwkv::gpu::Bf16)
