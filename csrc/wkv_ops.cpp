// The op schemas (written once, here; wkv_adapter.cpp registers their CPU, GPU and Meta
// implementations), the small ops that tell Python about this build (head sizes, CPU code paths,
// the GPU tiles' self-test), and the empty Python module arwkv_ext._C, whose import loads this
// library: everything Python calls is a torch.ops.arwkv.* op.
#include <Python.h>

#include <torch/library.h>

#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/wkv_cpu.h"
#include "wkv_backends.h"
#include "wkv_problem.h"

namespace arwkv {

#ifdef ARWKV_WITH_GPU
std::string gpu_tile_selftest();  // csrc/gpu/wkv_gpu_backend.cpp
#endif

namespace {

// A bad environment variable or argument reads in Python as a ValueError (c10::ValueError).
template <typename F>
auto value_errors(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

std::vector<int64_t> head_sizes_op() { return {kHeadSizes, kHeadSizes + kNumHeadSizes}; }

std::string cpu_isa_op() {
  return value_errors([] { return std::string(cpu::isa_name(cpu::active_isa())); });
}

std::vector<std::string> cpu_isas_supported_op() {
  std::vector<std::string> out;
  for (cpu::Isa isa : {cpu::Isa::baseline, cpu::Isa::avx2, cpu::Isa::avx512})
    if (cpu::isa_supported(isa)) out.emplace_back(cpu::isa_name(isa));
  return out;
}

// The CPU algorithm a call of WKV-`version` (7 or 6) in `direction` ("forward" / "backward")
// uses now, for segments longer than 4 steps (ARWKV_CPU_ALGORITHM overrides the measured choice).
std::string cpu_algorithm_op(int64_t version, const std::string& direction) {
  TORCH_CHECK_VALUE(version == 7 || version == 6, "version must be 7 or 6, got ", version);
  TORCH_CHECK_VALUE(direction == "forward" || direction == "backward",
                    "direction must be 'forward' or 'backward', got '", direction, "'");
  return value_errors([&] {
    WkvProblem p;
    p.version = static_cast<int>(version);
    const auto a = direction == "backward" ? cpu::backward_algorithm(p) : cpu::forward_algorithm(p);
    return std::string(cpu::algorithm_name(a));
  });
}

std::string gpu_algorithm_op() {
  return value_errors([] { return std::string(gpu_algorithm()); });
}

// Checks the tensor-core tiles' fragment layouts on the current GPU: "bf16 ok, f16 ok", or the
// first wrong element.
std::string gpu_tile_selftest_op() {
#ifdef ARWKV_WITH_GPU
  return gpu_tile_selftest();
#else
  TORCH_CHECK(false, "arwkv was built without GPU kernels");
#endif
}

}  // namespace

TORCH_LIBRARY(arwkv, m) {
  m.def("wkv7(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, "
        "Tensor? initial_state=None, Tensor? cu_seqlens=None) -> (Tensor, Tensor)");
  m.def("wkv6(Tensor r, Tensor w, Tensor k, Tensor v, Tensor u, "
        "Tensor? initial_state=None, Tensor? cu_seqlens=None) -> (Tensor, Tensor)");
  // Gradients of every input (the state gradient in the state dtype); the state is
  // recomputed from chunk snapshots, so the forward saves nothing but its inputs.
  m.def("wkv7_backward(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, "
        "Tensor? initial_state, Tensor? cu_seqlens, Tensor? grad_y, Tensor? grad_state) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("wkv6_backward(Tensor r, Tensor w, Tensor k, Tensor v, Tensor u, "
        "Tensor? initial_state, Tensor? cu_seqlens, Tensor? grad_y, Tensor? grad_state) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // What this build can do, as ops with no tensor arguments (same on every backend).
  m.def("head_sizes() -> int[]", &head_sizes_op);
  m.def("cpu_isa() -> str", &cpu_isa_op);
  m.def("cpu_isas_supported() -> str[]", &cpu_isas_supported_op);
  m.def("cpu_algorithm(int version, str direction) -> str", &cpu_algorithm_op);
  m.def("gpu_algorithm() -> str", &gpu_algorithm_op);
  m.def("gpu_tile_selftest() -> str", &gpu_tile_selftest_op);
}

}  // namespace arwkv

// arwkv_ext._C is an empty module: importing it loads this library, whose static initialisers
// register the ops above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
