// WKV-7 / WKV-6 GPU kernels for f32 inputs (one file per input type so they compile in parallel).
#include "wkv_gpu_kernels.cuh"
#include "wkv_gpu_tiles_selftest.cuh"  // the tile layer's device self-test, compiled here once

ARWKV_INSTANTIATE_GPU_KERNELS(float)
