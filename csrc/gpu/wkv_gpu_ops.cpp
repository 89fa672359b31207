// GPU (CUDA / ROCm) implementations of torch.ops.arwkv.*: check, make inputs contiguous,
// allocate outputs and scratch, launch on the current stream under a device guard.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "../wkv_checks.h"
#include "wkv_gpu.h"

namespace arwkv {
namespace {

using at::Tensor;
using std::optional;

// Contiguous, 16-byte aligned copies of the inputs (kept alive here) and the kernels' view.
struct Prepared {
  WkvShape g;
  gpu::WkvParams params;
  at::ScalarType dtype;
  std::vector<Tensor> keep;
  Tensor cu_seqlens;  // int64 on the device
  const void* hold(const Tensor& t) {
    Tensor c = t.contiguous();
    if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();  // float4 loads
    keep.push_back(c);
    return c.data_ptr();
  }
};

Prepared prepare(const char* op, int version, const Tensor& r, const Tensor& w, const Tensor& k,
                 const Tensor& v, const Tensor* a, const Tensor* b, const Tensor* u,
                 const optional<Tensor>& initial_state, const optional<Tensor>& cu_seqlens) {
  Prepared p;
  p.g = check_wkv_inputs(op, version, r, w, k, v, a, b, u, initial_state, cu_seqlens);
  p.dtype = r.scalar_type();
  gpu::WkvParams& x = p.params;
  x.version = version;
  x.B = p.g.B, x.T = p.g.T, x.H = p.g.H, x.N = p.g.N;
  x.num_seqs = p.g.S;
  x.r = p.hold(r), x.w = p.hold(w), x.k = p.hold(k), x.v = p.hold(v);
  if (a) x.a = p.hold(*a), x.b = p.hold(*b);
  if (u) x.u = p.hold(*u);
  if (initial_state) x.initial_state = static_cast<const float*>(p.hold(*initial_state));
  if (cu_seqlens) {
    p.cu_seqlens = cu_seqlens->to(at::kLong).contiguous();
    check_cu_seqlens_values(op, p.cu_seqlens.cpu(), p.g.T);  // a small copy; bad offsets would fault
    x.cu_seqlens = p.cu_seqlens.data_ptr<int64_t>();
  }
  x.num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  x.stream = at::cuda::getCurrentCUDAStream().stream();
  return p;
}

void check_launch(const char* op, const char* error) {
  TORCH_CHECK(error == nullptr, op, ": GPU kernel launch failed: ", error);
}

const char* run_forward(at::ScalarType dtype, const gpu::WkvParams& p) {
  switch (dtype) {
    case at::kBFloat16: return gpu::forward<gpu::Bf16>(p);
    case at::kHalf: return gpu::forward<gpu::F16>(p);
    default: return gpu::forward<float>(p);
  }
}

const char* run_backward(at::ScalarType dtype, const gpu::WkvParams& p) {
  switch (dtype) {
    case at::kBFloat16: return gpu::backward<gpu::Bf16>(p);
    case at::kHalf: return gpu::backward<gpu::F16>(p);
    default: return gpu::backward<float>(p);
  }
}

std::tuple<Tensor, Tensor> forward(const char* op, Prepared&& p, const Tensor& r) {
  const WkvShape& g = p.g;
  Tensor y = at::empty({g.B, g.T, g.H, g.N}, r.options());
  Tensor state = at::empty({g.S, g.H, g.N, g.N}, r.options().dtype(at::kFloat));
  p.params.y = y.data_ptr();
  p.params.final_state = state.data_ptr<float>();
  check_launch(op, run_forward(p.dtype, p.params));
  return {y, state};
}

// Gradients in the order r, w, k, v, then a, b (WKV-7) or u (WKV-6), then initial_state.
std::vector<Tensor> backward(const char* op, Prepared&& p, const Tensor& r, const optional<Tensor>& grad_y,
                             const optional<Tensor>& grad_state) {
  const WkvShape& g = p.g;
  check_wkv_grads(op, g, r, grad_y, grad_state);
  gpu::WkvParams& x = p.params;
  if (grad_y) x.grad_y = p.hold(grad_y->to(p.dtype));
  if (grad_state) x.grad_state = static_cast<const float*>(p.hold(grad_state->to(at::kFloat)));

  const auto f32 = r.options().dtype(at::kFloat);
  auto like = [&] { return at::empty({g.B, g.T, g.H, g.N}, r.options()); };
  std::vector<Tensor> out = {like(), like(), like(), like()};
  x.grad_r = out[0].data_ptr(), x.grad_w = out[1].data_ptr();
  x.grad_k = out[2].data_ptr(), x.grad_v = out[3].data_ptr();
  Tensor grad_u_partial;
  if (x.version == 7) {
    out.push_back(like());
    out.push_back(like());
    x.grad_a = out[4].data_ptr(), x.grad_b = out[5].data_ptr();
  } else {
    grad_u_partial = at::empty({g.S, g.H, g.N}, f32);
    x.grad_u_partial = grad_u_partial.data_ptr<float>();
  }
  Tensor grad_initial_state = at::empty({g.S, g.H, g.N, g.N}, f32);
  x.grad_initial_state = grad_initial_state.data_ptr<float>();

  // Scratch: one snapshot per chunk, and (WKV-7) S a_t and its gradient per step.
  Tensor snapshots = at::empty({gpu::num_chunk_slots(x), g.H, g.N, g.N}, f32);
  x.snapshots = snapshots.data_ptr<float>();
  Tensor sa, dsa;
  if (x.version == 7) {
    sa = at::empty({g.B * g.T, g.H, g.N}, f32);
    dsa = at::empty({g.B * g.T, g.H, g.N}, f32);
    x.sa = sa.data_ptr<float>();
    x.dsa = dsa.data_ptr<float>();
  }
  check_launch(op, run_backward(p.dtype, x));

  if (x.version == 6) out.push_back(grad_u_partial.sum(0).to(p.dtype));
  out.push_back(grad_initial_state);
  return out;
}

std::tuple<Tensor, Tensor> wkv7_gpu(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v,
                                    const Tensor& a, const Tensor& b, const optional<Tensor>& initial_state,
                                    const optional<Tensor>& cu_seqlens) {
  const char* op = "arwkv.wkv7";
  const c10::cuda::CUDAGuard guard(r.device());
  return forward(op, prepare(op, 7, r, w, k, v, &a, &b, nullptr, initial_state, cu_seqlens), r);
}

std::tuple<Tensor, Tensor> wkv6_gpu(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v,
                                    const Tensor& u, const optional<Tensor>& initial_state,
                                    const optional<Tensor>& cu_seqlens) {
  const char* op = "arwkv.wkv6";
  const c10::cuda::CUDAGuard guard(r.device());
  return forward(op, prepare(op, 6, r, w, k, v, nullptr, nullptr, &u, initial_state, cu_seqlens), r);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> wkv7_backward_gpu(
    const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& a, const Tensor& b,
    const optional<Tensor>& initial_state, const optional<Tensor>& cu_seqlens,
    const optional<Tensor>& grad_y, const optional<Tensor>& grad_state) {
  const char* op = "arwkv.wkv7_backward";
  const c10::cuda::CUDAGuard guard(r.device());
  auto d = backward(op, prepare(op, 7, r, w, k, v, &a, &b, nullptr, initial_state, cu_seqlens), r, grad_y,
                    grad_state);
  return {d[0], d[1], d[2], d[3], d[4], d[5], d[6]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> wkv6_backward_gpu(
    const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& u,
    const optional<Tensor>& initial_state, const optional<Tensor>& cu_seqlens,
    const optional<Tensor>& grad_y, const optional<Tensor>& grad_state) {
  const char* op = "arwkv.wkv6_backward";
  const c10::cuda::CUDAGuard guard(r.device());
  auto d = backward(op, prepare(op, 6, r, w, k, v, nullptr, nullptr, &u, initial_state, cu_seqlens), r, grad_y,
                    grad_state);
  return {d[0], d[1], d[2], d[3], d[4], d[5]};
}

}  // namespace

TORCH_LIBRARY_IMPL(arwkv, CUDA, m) {
  m.impl("wkv7", &wkv7_gpu);
  m.impl("wkv6", &wkv6_gpu);
  m.impl("wkv7_backward", &wkv7_backward_gpu);
  m.impl("wkv6_backward", &wkv6_backward_gpu);
}

}  // namespace arwkv
