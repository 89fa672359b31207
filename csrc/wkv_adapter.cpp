// The one adapter between torch and the kernels. For every op (wkv7, wkv6 and their backward)
// and every backend (CPU, CUDA / ROCm, Meta) it checks the arguments (wkv_checks.h), makes
// contiguous copies of the inputs where they are not (16-byte aligned for the GPU kernels, which
// load float4), allocates the outputs, fills the problem description (wkv_problem.h) once, and hands
// it to the backend (wkv_backends.h). The Meta backend stops after allocating: it gives shapes,
// dtypes and argument errors to torch.compile and fake tensors without running anything.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "wkv_backends.h"
#include "wkv_checks.h"
#include "wkv_problem.h"

namespace arwkv {
namespace {

using at::Tensor;
using std::optional;

enum class Backend { cpu, gpu, meta };

#ifdef ARWKV_WITH_GPU
constexpr bool kWithGpu = true;
#else
constexpr bool kWithGpu = false;
#endif

// A CPU-only build: a GPU tensor gets one clear sentence instead of the dispatcher's list of
// backends.
[[noreturn]] void no_gpu_kernels(const Tensor& r) {
  TORCH_CHECK(false, "arwkv: this build has CPU kernels only (it was built against a CPU torch, or with "
              "ARWKV_BUILD_TARGET=cpu); r is on ", r.device(), ": reinstall arwkv against a CUDA or ROCm "
              "torch, or move the inputs to the CPU");
}

DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return DType::f64;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default: return DType::f32;
  }
}

// The arguments of one call as the op received them (a, b for WKV-7, u for WKV-6, else null).
struct Args {
  const char* op;
  int version;
  const Tensor &r, &w, &k, &v;
  const Tensor *a, *b, *u;
  const optional<Tensor>& initial_state;
  const optional<Tensor>& cu_seqlens;
};

// A problem filled from tensors, and the copies it points into, kept alive here.
template <class Problem>
struct Filled {
  WkvShape g{};
  Problem p;
  std::vector<Tensor> keep;
  bool align16 = false;  // the GPU kernels load float4; the CPU kernels need no alignment

  const void* hold(const Tensor& t) {
    Tensor c = t.contiguous();
    if (align16 && reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
    keep.push_back(c);
    return c.data_ptr();
  }

  // Checks the inputs and fills the forward part of the problem (shapes only for Meta).
  void inputs(Backend backend, const Args& x) {
    g = check_wkv_inputs(x.op, x.version, x.r, x.w, x.k, x.v, x.a, x.b, x.u, x.initial_state, x.cu_seqlens);
    p.version = x.version;
    p.dtype = kernel_dtype(x.r.scalar_type());
    p.B = g.B, p.T = g.T, p.H = g.H, p.N = g.N;
    p.num_seqs = g.S;
    if (backend == Backend::meta) return;  // no data to point at
    align16 = backend == Backend::gpu;
    p.r = hold(x.r), p.w = hold(x.w), p.k = hold(x.k), p.v = hold(x.v);
    if (x.a) p.a = hold(*x.a), p.b = hold(*x.b);
    if (x.u) p.u = hold(*x.u);
    if (x.initial_state) p.initial_state = hold(*x.initial_state);
    if (x.cu_seqlens) {
      const Tensor cu = x.cu_seqlens->to(at::kLong).contiguous();
      check_cu_seqlens_values(x.op, cu.cpu(), g.T);  // (from a GPU, a small copy: bad offsets would fault)
      keep.push_back(cu);
      p.cu_seqlens = cu.data_ptr<int64_t>();
    }
  }
};

// The inputs' device is the current one while a GPU backend prepares and launches.
struct DeviceScope {
  c10::OptionalDeviceGuard guard;
  DeviceScope(Backend backend, const Tensor& r) {
    if (backend == Backend::gpu) guard.reset_device(r.device());
  }
};

template <Backend kB>
std::tuple<Tensor, Tensor> forward(const Args& x) {
  if constexpr (kB == Backend::gpu && !kWithGpu) no_gpu_kernels(x.r);
  const DeviceScope scope(kB, x.r);
  Filled<WkvProblem> f;
  f.inputs(kB, x);
  const WkvShape& g = f.g;
  Tensor y = at::empty({g.B, g.T, g.H, g.N}, x.r.options());
  Tensor state = at::empty({g.S, g.H, g.N, g.N}, x.r.options().dtype(g.state_dtype));
  if constexpr (kB != Backend::meta) {
    f.p.y = y.data_ptr();
    f.p.final_state = state.data_ptr();
    if constexpr (kB == Backend::cpu) cpu_forward(f.p);
#ifdef ARWKV_WITH_GPU
    if constexpr (kB == Backend::gpu) gpu_forward(x.op, f.p, x.r.device());
#endif
  }
  return {y, state};
}

// Gradients in the order r, w, k, v, then a, b (WKV-7) or u (WKV-6), then initial_state: each in
// its input's dtype, the state's in the state dtype.
template <Backend kB>
std::vector<Tensor> backward(const Args& x, const optional<Tensor>& grad_y, const optional<Tensor>& grad_state) {
  if constexpr (kB == Backend::gpu && !kWithGpu) no_gpu_kernels(x.r);
  const DeviceScope scope(kB, x.r);
  Filled<WkvBackwardProblem> f;
  f.inputs(kB, x);
  const WkvShape& g = f.g;
  check_wkv_grads(x.op, g, x.r, grad_y, grad_state);

  auto like = [&] { return at::empty({g.B, g.T, g.H, g.N}, x.r.options()); };
  std::vector<Tensor> out = {like(), like(), like(), like()};
  if (x.version == 7) {
    out.push_back(like());
    out.push_back(like());
  } else {
    out.push_back(at::empty({g.H, g.N}, x.r.options()));
  }
  out.push_back(at::empty({g.S, g.H, g.N, g.N}, x.r.options().dtype(g.state_dtype)));

  if constexpr (kB != Backend::meta) {
    WkvBackwardProblem& p = f.p;
    if (grad_y) p.grad_y = f.hold(grad_y->to(x.r.scalar_type()));
    if (grad_state) p.grad_state = f.hold(grad_state->to(g.state_dtype));
    p.grad_r = out[0].data_ptr(), p.grad_w = out[1].data_ptr();
    p.grad_k = out[2].data_ptr(), p.grad_v = out[3].data_ptr();
    if (x.version == 7)
      p.grad_a = out[4].data_ptr(), p.grad_b = out[5].data_ptr();
    else
      p.grad_u = out[4].data_ptr();
    p.grad_initial_state = out.back().data_ptr();
    if constexpr (kB == Backend::cpu) cpu_backward(p);
#ifdef ARWKV_WITH_GPU
    if constexpr (kB == Backend::gpu) gpu_backward(x.op, p, x.r.device());
#endif
  }
  return out;
}

// The ops' entry points, one set for every backend.
template <Backend kB>
std::tuple<Tensor, Tensor> wkv7(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v,
                                const Tensor& a, const Tensor& b, const optional<Tensor>& initial_state,
                                const optional<Tensor>& cu_seqlens) {
  return forward<kB>({"arwkv.wkv7", 7, r, w, k, v, &a, &b, nullptr, initial_state, cu_seqlens});
}

template <Backend kB>
std::tuple<Tensor, Tensor> wkv6(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v,
                                const Tensor& u, const optional<Tensor>& initial_state,
                                const optional<Tensor>& cu_seqlens) {
  return forward<kB>({"arwkv.wkv6", 6, r, w, k, v, nullptr, nullptr, &u, initial_state, cu_seqlens});
}

template <Backend kB>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> wkv7_backward(
    const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& a, const Tensor& b,
    const optional<Tensor>& initial_state, const optional<Tensor>& cu_seqlens,
    const optional<Tensor>& grad_y, const optional<Tensor>& grad_state) {
  auto d = backward<kB>({"arwkv.wkv7_backward", 7, r, w, k, v, &a, &b, nullptr, initial_state, cu_seqlens},
                        grad_y, grad_state);
  return {d[0], d[1], d[2], d[3], d[4], d[5], d[6]};
}

template <Backend kB>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> wkv6_backward(
    const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& u,
    const optional<Tensor>& initial_state, const optional<Tensor>& cu_seqlens,
    const optional<Tensor>& grad_y, const optional<Tensor>& grad_state) {
  auto d = backward<kB>({"arwkv.wkv6_backward", 6, r, w, k, v, nullptr, nullptr, &u, initial_state, cu_seqlens},
                        grad_y, grad_state);
  return {d[0], d[1], d[2], d[3], d[4], d[5]};
}

template <Backend kB>
void register_ops(torch::Library& m) {
  m.impl("wkv7", &wkv7<kB>);
  m.impl("wkv6", &wkv6<kB>);
  m.impl("wkv7_backward", &wkv7_backward<kB>);
  m.impl("wkv6_backward", &wkv6_backward<kB>);
}

}  // namespace

TORCH_LIBRARY_IMPL(arwkv, CPU, m) { register_ops<Backend::cpu>(m); }
// CUDA is also the dispatch key of ROCm torch's GPU tensors.
TORCH_LIBRARY_IMPL(arwkv, CUDA, m) { register_ops<Backend::gpu>(m); }
TORCH_LIBRARY_IMPL(arwkv, Meta, m) { register_ops<Backend::meta>(m); }

}  // namespace arwkv
