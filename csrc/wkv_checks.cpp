#include "wkv_checks.h"

#include <c10/util/Exception.h>

#include <string>

#include "wkv_problem.h"

namespace arwkv {
namespace {

// Names as Python users write them ("torch.float32", not c10's "Float").
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    default: return std::string("torch.") + c10::toString(t);
  }
}

void check_float(const char* op, const char* name, const at::Tensor& t) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
                   op, ": ", name, " has dtype ", dtype_name(dt),
                   "; expected float32, bfloat16, float16 or float64 (float64 on CPU only)");
}

// "16, 32, 64, 128"
std::string head_size_list() {
  std::string out;
  for (int n : kHeadSizes) out += (out.empty() ? "" : ", ") + std::to_string(n);
  return out;
}

}  // namespace

WkvShape check_wkv_inputs(const char* op, int version, const at::Tensor& r, const at::Tensor& w,
                          const at::Tensor& k, const at::Tensor& v, const at::Tensor* a,
                          const at::Tensor* b, const at::Tensor* u,
                          const std::optional<at::Tensor>& initial_state,
                          const std::optional<at::Tensor>& cu_seqlens) {
  const char* seq_names = version == 7 ? "r, w, k, v, a, b" : "r, w, k, v";
  TORCH_CHECK_VALUE(r.dim() == 4, op, ": r has shape ", r.sizes(), "; expected 4 dimensions [B, T, H, N]");
  check_float(op, "r", r);
  const auto dtype = r.scalar_type();
  TORCH_CHECK_TYPE(dtype != at::kDouble || r.device().is_cpu() || r.device().is_meta(), op,
                   ": float64 inputs are supported on CPU only, r is on ", r.device());
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);

  std::pair<const char*, const at::Tensor*> seq[] = {
      {"w", &w}, {"k", &k}, {"v", &v}, {"a", a}, {"b", b}};
  for (auto& [name, t] : seq) {
    if (!t) continue;
    TORCH_CHECK_VALUE(t->sizes() == r.sizes(), op, ": ", name, " has shape ", t->sizes(),
                      " but r has ", r.sizes(), "; ", seq_names, " must all be [B, T, H, N]");
    check_float(op, name, *t);
    TORCH_CHECK_TYPE(t->scalar_type() == dtype, op, ": ", name, " has dtype ", dtype_name(t->scalar_type()),
                     " but r has ", dtype_name(dtype), "; ", seq_names, " must share one dtype");
    TORCH_CHECK_VALUE(t->device() == r.device(), op, ": ", name, " is on ", t->device(),
                      " but r is on ", r.device(), "; all tensors must be on one device");
  }
  TORCH_CHECK_VALUE(is_supported_head_size(N), op, ": head size N = ", N,
                    " (last dimension of r) is not supported; expected one of ", head_size_list());
  TORCH_CHECK_VALUE(B >= 1 && H >= 1, op, ": r has shape ", r.sizes(), "; B and H must be at least 1");

  if (u) {
    TORCH_CHECK_VALUE(u->dim() == 2 && u->size(0) == H && u->size(1) == N, op, ": u has shape ",
                      u->sizes(), "; expected [H, N] = [", H, ", ", N, "]");
    check_float(op, "u", *u);
    TORCH_CHECK_TYPE(u->scalar_type() == dtype, op, ": u has dtype ", dtype_name(u->scalar_type()),
                     " but r has ", dtype_name(dtype), "; u must share the inputs' dtype");
    TORCH_CHECK_VALUE(u->device() == r.device(), op, ": u is on ", u->device(), " but r is on ",
                      r.device(), "; all tensors must be on one device");
  }

  int64_t S = B;
  if (cu_seqlens) {
    const auto& cu = *cu_seqlens;
    TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong, op,
                     ": cu_seqlens has dtype ", dtype_name(cu.scalar_type()), "; expected int32 or int64");
    TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, op, ": cu_seqlens has shape ", cu.sizes(),
                      "; expected [S + 1] offsets");
    TORCH_CHECK_VALUE(B == 1, op, ": cu_seqlens packs sequences along T and requires B = 1, but r has B = ", B);
    TORCH_CHECK_VALUE(cu.device() == r.device(), op, ": cu_seqlens is on ", cu.device(),
                      " but r is on ", r.device(), "; all tensors must be on one device");
    S = cu.size(0) - 1;
  }
  const auto state_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  if (initial_state) {
    const auto& s0 = *initial_state;
    TORCH_CHECK_VALUE(s0.dim() == 4 && s0.size(0) == S && s0.size(1) == H && s0.size(2) == N &&
                          s0.size(3) == N,
                      op, ": initial_state has shape ", s0.sizes(), "; expected [", S, ", ", H, ", ", N,
                      ", ", N, "] ([", cu_seqlens ? "S" : "B", ", H, N, N]",
                      cu_seqlens ? ", one state per packed sequence" : "", ")");
    TORCH_CHECK_TYPE(s0.scalar_type() == state_dtype, op, ": initial_state has dtype ", dtype_name(s0.scalar_type()),
                     "; the state is ", dtype_name(state_dtype), " for ", dtype_name(dtype), " inputs");
    TORCH_CHECK_VALUE(s0.device() == r.device(), op, ": initial_state is on ", s0.device(),
                      " but r is on ", r.device(), "; all tensors must be on one device");
  }
  return {B, T, H, N, S, state_dtype};
}

void check_wkv_grads(const char* op, const WkvShape& g, const at::Tensor& r,
                     const std::optional<at::Tensor>& grad_y,
                     const std::optional<at::Tensor>& grad_state) {
  if (grad_y)
    TORCH_CHECK_VALUE(grad_y->sizes() == r.sizes(), op, ": grad_y has shape ", grad_y->sizes(),
                      "; expected ", r.sizes());
  if (grad_state)
    TORCH_CHECK_VALUE(grad_state->dim() == 4 && grad_state->size(0) == g.S && grad_state->size(1) == g.H &&
                          grad_state->size(2) == g.N && grad_state->size(3) == g.N,
                      op, ": grad_state has shape ", grad_state->sizes(), "; expected [", g.S, ", ", g.H,
                      ", ", g.N, ", ", g.N, "]");
}

void check_cu_seqlens_values(const char* op, const at::Tensor& cu, int64_t T) {
  const int64_t* c = cu.data_ptr<int64_t>();
  const int64_t n = cu.size(0);
  TORCH_CHECK_VALUE(c[0] == 0, op, ": cu_seqlens must start at 0, got ", c[0]);
  for (int64_t i = 1; i < n; ++i)
    TORCH_CHECK_VALUE(c[i] > c[i - 1], op, ": cu_seqlens must be strictly increasing, but c[", i, "] = ",
                      c[i], " after c[", i - 1, "] = ", c[i - 1]);
  TORCH_CHECK_VALUE(c[n - 1] == T, op, ": cu_seqlens must end at T = ", T, ", got ", c[n - 1]);
}

}  // namespace arwkv
