// The torch side of the GPU backend (CUDA / ROCm): the stream and multiprocessor count of the
// current device, the algorithm (ARWKV_GPU_ALGORITHM), the kernels' scratch (torch allocations),
// the launches (wkv_gpu.h), the sum of grad_u over sequences or chunks, and the tensor-core
// tiles' self-test.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include <cmath>
#include <cstring>
#include <string>

#include "../wkv_backends.h"
#include "wkv_gpu.h"

namespace arwkv {
namespace gpu::tiles {
// wkv_gpu_tiles_selftest.cuh (compiled in wkv_gpu_f32.cu)
int64_t tile_selftest_floats();
LaunchStatus tile_selftest(float* out, const Device& d);
std::string tile_selftest_report(const float* out);
}  // namespace gpu::tiles

namespace {

gpu::Device current_device() {
  return {at::cuda::getCurrentDeviceProperties()->multiProcessorCount, at::cuda::getCurrentCUDAStream().stream(),
          std::strcmp(gpu_algorithm(), "chunked") == 0 ? gpu::Algorithm::chunked : gpu::Algorithm::step};
}

void check_launch(const char* op, const gpu::LaunchStatus& status) {
  TORCH_CHECK(status.ok(), op, ": ", gpu::describe(status));
}

float* data_or_null(const at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

}  // namespace

// The kernels' scratch as torch allocations (uninitialised: the kernels write all they read).
struct ScratchTensors {
  at::Tensor snapshots, sa, dsa, grad_u_partial, state_grads, chunk_operands;
  gpu::Scratch pointers() const {
    return {data_or_null(snapshots), data_or_null(sa),          data_or_null(dsa),
            data_or_null(grad_u_partial), data_or_null(state_grads), data_or_null(chunk_operands)};
  }
};
ScratchTensors allocate_scratch(const WkvProblem& p, const gpu::Device& device, bool backward, at::Device where) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(where);
  const gpu::ScratchSizes n = gpu::scratch_sizes(p, device.algorithm, backward);
  return {at::empty({n.snapshots}, f32),      at::empty({n.sa}, f32),          at::empty({n.dsa}, f32),
          at::empty({n.grad_u_partial}, f32), at::empty({n.state_grads}, f32), at::empty({n.chunk_operands}, f32)};
}

void gpu_forward(const char* op, const WkvProblem& p, at::Device where) {
  const gpu::Device device = current_device();
  const ScratchTensors scratch = allocate_scratch(p, device, false, where);
  switch (p.dtype) {
    case DType::bf16: return check_launch(op, gpu::forward<gpu::Bf16>(p, scratch.pointers(), device));
    case DType::f16: return check_launch(op, gpu::forward<gpu::F16>(p, scratch.pointers(), device));
    default: return check_launch(op, gpu::forward<float>(p, scratch.pointers(), device));
  }
}

void gpu_backward(const char* op, const WkvBackwardProblem& p, at::Device where) {
  const gpu::Device device = current_device();
  // Step: one snapshot per chunk, (WKV-7) S a_t and its gradient per step, (WKV-6) grad_u per
  // sequence. Chunked: also the state gradient per chunk and each chunk's operands; grad_u per chunk.
  const ScratchTensors scratch = allocate_scratch(p, device, true, where);
  switch (p.dtype) {
    case DType::bf16: check_launch(op, gpu::backward<gpu::Bf16>(p, scratch.pointers(), device)); break;
    case DType::f16: check_launch(op, gpu::backward<gpu::F16>(p, scratch.pointers(), device)); break;
    default: check_launch(op, gpu::backward<float>(p, scratch.pointers(), device)); break;
  }
  if (p.version == 6) {
    at::Tensor grad_u = at::from_blob(p.grad_u, {p.H, p.N}, at::TensorOptions().dtype(scalar_type(p.dtype)).device(where));
    grad_u.copy_(scratch.grad_u_partial.view({-1, p.H, p.N}).sum(0));
  }
}

// The tile layer's fragment layouts checked on the current device: (row, column)-encoded
// products through every load, bf16 and fp16; "bf16 ok, f16 ok" or the first wrong element.
std::string gpu_tile_selftest() {
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, at::cuda::current_device());
  const at::Tensor out = at::full({gpu::tiles::tile_selftest_floats()}, NAN, f32);  // NaN where no lane stores
  check_launch("gpu_tile_selftest", gpu::tiles::tile_selftest(out.data_ptr<float>(), current_device()));
  return gpu::tiles::tile_selftest_report(out.cpu().data_ptr<float>());
}

}  // namespace arwkv
