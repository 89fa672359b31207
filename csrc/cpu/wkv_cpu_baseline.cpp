// The CPU kernels compiled for the baseline instruction set (see wkv_cpu_kernels.h).
#include <cstdint>
#include <cstdlib>
#include <new>
#include <utility>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

#include "wkv_cpu.h"

#define ARWKV_ISA baseline
#define ARWKV_VEC_BYTES 16
#include "wkv_cpu_kernels.h"
