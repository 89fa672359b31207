// CPU implementations of torch.ops.arwkv.*: check, make inputs contiguous, call the kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../wkv_checks.h"
#include "wkv_cpu.h"

namespace arwkv {
namespace {

using at::Tensor;
using std::optional;

cpu::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return cpu::DType::f64;
    case at::kBFloat16: return cpu::DType::bf16;
    case at::kHalf: return cpu::DType::f16;
    default: return cpu::DType::f32;
  }
}

void run_parallel(void*, int64_t n, void* ctx, cpu::TaskFn fn) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) { fn(ctx, begin, end); });
}
const cpu::ParallelFor kParallel{nullptr, &run_parallel};

// Contiguous copies of the inputs (kept alive here) and the kernel's view of them.
struct Prepared {
  WkvShape g;
  cpu::WkvArgs args;
  std::vector<Tensor> keep;
  const void* hold(const Tensor& t) {
    keep.push_back(t.contiguous());
    return keep.back().data_ptr();
  }
};

Prepared prepare(const char* op, int version, const Tensor& r, const Tensor& w, const Tensor& k,
                 const Tensor& v, const Tensor* a, const Tensor* b, const Tensor* u,
                 const optional<Tensor>& initial_state, const optional<Tensor>& cu_seqlens) {
  Prepared p;
  p.g = check_wkv_inputs(op, version, r, w, k, v, a, b, u, initial_state, cu_seqlens);
  cpu::WkvArgs& x = p.args;
  x.version = version;
  x.dtype = kernel_dtype(r.scalar_type());
  x.B = p.g.B, x.T = p.g.T, x.H = p.g.H, x.N = p.g.N;
  x.num_seqs = p.g.S;
  x.r = p.hold(r), x.w = p.hold(w), x.k = p.hold(k), x.v = p.hold(v);
  if (a) x.a = p.hold(*a), x.b = p.hold(*b);
  if (u) x.u = p.hold(*u);
  if (initial_state) x.initial_state = p.hold(*initial_state);
  if (cu_seqlens) {
    x.cu_seqlens = static_cast<const int64_t*>(p.hold(cu_seqlens->to(at::kLong)));
    check_cu_seqlens_values(op, p.keep.back(), p.g.T);
  }
  x.num_threads = at::get_num_threads();
  return p;
}

std::tuple<Tensor, Tensor> forward(const Prepared& p, const Tensor& r) {
  const WkvShape& g = p.g;
  Tensor y = at::empty({g.B, g.T, g.H, g.N}, r.options());
  Tensor state = at::empty({g.S, g.H, g.N, g.N}, r.options().dtype(g.state_dtype));
  cpu::forward(p.args, {y.data_ptr(), state.data_ptr()}, kParallel);
  return {y, state};
}

// Runs the backward kernel; returns grad_columns (r, w, k[, a, b]), grad_v, grad_initial_state,
// and for WKV-6 grad_u, all in the inputs' dtype except the state gradient.
struct Grads {
  std::vector<Tensor> columns;
  Tensor v, initial_state, u;
};

Grads backward(const char* op, Prepared&& p, const Tensor& r, const optional<Tensor>& grad_y,
               const optional<Tensor>& grad_state) {
  const WkvShape& g = p.g;
  check_wkv_grads(op, g, r, grad_y, grad_state);
  const auto acc = r.options().dtype(g.state_dtype);
  const int64_t splits = cpu::row_splits(p.args);
  cpu::WkvBackwardIO io;
  if (grad_y) io.grad_y = p.hold(grad_y->to(r.scalar_type()));
  if (grad_state) io.grad_state = p.hold(grad_state->to(g.state_dtype));
  Grads out;
  const int ncols = p.args.version == 7 ? 5 : 3;
  for (int q = 0; q < ncols; ++q) {
    out.columns.push_back(at::empty({splits * g.B, g.T, g.H, g.N}, acc));
    io.grad_columns[q] = out.columns.back().data_ptr();
  }
  out.v = at::empty({g.B, g.T, g.H, g.N}, acc);
  out.initial_state = at::empty({g.S, g.H, g.N, g.N}, acc);
  io.grad_v = out.v.data_ptr();
  io.grad_initial_state = out.initial_state.data_ptr();
  if (p.args.version == 6) {
    out.u = at::empty({splits * g.S, g.H, g.N}, acc);
    io.grad_u = out.u.data_ptr();
  }
  cpu::backward(p.args, io, kParallel);

  const auto dtype = r.scalar_type();
  for (auto& c : out.columns) {
    if (splits > 1) c = c.view({splits, g.B, g.T, g.H, g.N}).sum(0);
    c = c.to(dtype);
  }
  out.v = out.v.to(dtype);
  if (out.u.defined()) out.u = out.u.sum(0).to(dtype);
  return out;
}

std::tuple<Tensor, Tensor> wkv7_cpu(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v,
                                    const Tensor& a, const Tensor& b, const optional<Tensor>& initial_state,
                                    const optional<Tensor>& cu_seqlens) {
  return forward(prepare("arwkv.wkv7", 7, r, w, k, v, &a, &b, nullptr, initial_state, cu_seqlens), r);
}

std::tuple<Tensor, Tensor> wkv6_cpu(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v,
                                    const Tensor& u, const optional<Tensor>& initial_state,
                                    const optional<Tensor>& cu_seqlens) {
  return forward(prepare("arwkv.wkv6", 6, r, w, k, v, nullptr, nullptr, &u, initial_state, cu_seqlens), r);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> wkv7_backward_cpu(
    const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& a, const Tensor& b,
    const optional<Tensor>& initial_state, const optional<Tensor>& cu_seqlens,
    const optional<Tensor>& grad_y, const optional<Tensor>& grad_state) {
  const char* op = "arwkv.wkv7_backward";
  Grads d = backward(op, prepare(op, 7, r, w, k, v, &a, &b, nullptr, initial_state, cu_seqlens), r,
                     grad_y, grad_state);
  return {d.columns[0], d.columns[1], d.columns[2], d.v, d.columns[3], d.columns[4], d.initial_state};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> wkv6_backward_cpu(
    const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& u,
    const optional<Tensor>& initial_state, const optional<Tensor>& cu_seqlens,
    const optional<Tensor>& grad_y, const optional<Tensor>& grad_state) {
  const char* op = "arwkv.wkv6_backward";
  Grads d = backward(op, prepare(op, 6, r, w, k, v, nullptr, nullptr, &u, initial_state, cu_seqlens), r,
                     grad_y, grad_state);
  return {d.columns[0], d.columns[1], d.columns[2], d.v, d.u, d.initial_state};
}

}  // namespace

TORCH_LIBRARY_IMPL(arwkv, CPU, m) {
  m.impl("wkv7", &wkv7_cpu);
  m.impl("wkv6", &wkv6_cpu);
  m.impl("wkv7_backward", &wkv7_backward_cpu);
  m.impl("wkv6_backward", &wkv6_backward_cpu);
}

}  // namespace arwkv
