// The op schemas (written once, here), their Meta (fake) implementations, and the Python
// module arwkv_ext._C, which exists only so that importing it loads this library.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <exception>

#include "cpu/wkv_cpu.h"
#include "wkv_checks.h"

namespace arwkv {
namespace {

using at::Tensor;
using std::optional;

Tensor empty_like_shape(const Tensor& like, at::IntArrayRef shape, at::ScalarType dtype) {
  return at::empty(shape, like.options().dtype(dtype));
}

std::tuple<Tensor, Tensor> wkv7_meta(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v,
                                     const Tensor& a, const Tensor& b, const optional<Tensor>& initial_state,
                                     const optional<Tensor>& cu_seqlens) {
  auto g = check_wkv_inputs("arwkv.wkv7", 7, r, w, k, v, &a, &b, nullptr, initial_state, cu_seqlens);
  return {at::empty_like(r, at::MemoryFormat::Contiguous),
          empty_like_shape(r, {g.S, g.H, g.N, g.N}, g.state_dtype)};
}

std::tuple<Tensor, Tensor> wkv6_meta(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v,
                                     const Tensor& u, const optional<Tensor>& initial_state,
                                     const optional<Tensor>& cu_seqlens) {
  auto g = check_wkv_inputs("arwkv.wkv6", 6, r, w, k, v, nullptr, nullptr, &u, initial_state, cu_seqlens);
  return {at::empty_like(r, at::MemoryFormat::Contiguous),
          empty_like_shape(r, {g.S, g.H, g.N, g.N}, g.state_dtype)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> wkv7_backward_meta(
    const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& a, const Tensor& b,
    const optional<Tensor>& initial_state, const optional<Tensor>& cu_seqlens,
    const optional<Tensor>& grad_y, const optional<Tensor>& grad_state) {
  const char* op = "arwkv.wkv7_backward";
  auto g = check_wkv_inputs(op, 7, r, w, k, v, &a, &b, nullptr, initial_state, cu_seqlens);
  check_wkv_grads(op, g, r, grad_y, grad_state);
  auto like = [&] { return at::empty_like(r, at::MemoryFormat::Contiguous); };
  return {like(), like(), like(), like(), like(), like(),
          empty_like_shape(r, {g.S, g.H, g.N, g.N}, g.state_dtype)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> wkv6_backward_meta(
    const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& u,
    const optional<Tensor>& initial_state, const optional<Tensor>& cu_seqlens,
    const optional<Tensor>& grad_y, const optional<Tensor>& grad_state) {
  const char* op = "arwkv.wkv6_backward";
  auto g = check_wkv_inputs(op, 6, r, w, k, v, nullptr, nullptr, &u, initial_state, cu_seqlens);
  check_wkv_grads(op, g, r, grad_y, grad_state);
  auto like = [&] { return at::empty_like(r, at::MemoryFormat::Contiguous); };
  return {like(), like(), like(), like(), empty_like_shape(r, {g.H, g.N}, r.scalar_type()),
          empty_like_shape(r, {g.S, g.H, g.N, g.N}, g.state_dtype)};
}

#ifndef ARWKV_WITH_GPU
// A CPU-only build: a GPU tensor gets one clear sentence instead of the dispatcher's list of
// backends.
template <class... Args>
std::tuple<Tensor, Tensor> no_gpu_kernels(const Tensor& r, const Args&...) {
  TORCH_CHECK(false, "arwkv: this build has CPU kernels only (it was built against a CPU torch, or with "
              "ARWKV_BUILD_TARGET=cpu); r is on ", r.device(), ": reinstall arwkv against a CUDA or ROCm "
              "torch, or move the inputs to the CPU");
}
#endif

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
}

#ifndef ARWKV_WITH_GPU  // otherwise csrc/gpu/wkv_gpu_ops.cpp registers the GPU kernels
TORCH_LIBRARY_IMPL(arwkv, CUDA, m) {
  m.impl("wkv7", &no_gpu_kernels<Tensor, Tensor, Tensor, Tensor, Tensor, optional<Tensor>, optional<Tensor>>);
  m.impl("wkv6", &no_gpu_kernels<Tensor, Tensor, Tensor, Tensor, optional<Tensor>, optional<Tensor>>);
}
#endif

TORCH_LIBRARY_IMPL(arwkv, Meta, m) {
  m.impl("wkv7", &wkv7_meta);
  m.impl("wkv6", &wkv6_meta);
  m.impl("wkv7_backward", &wkv7_backward_meta);
  m.impl("wkv6_backward", &wkv6_backward_meta);
}

}  // namespace arwkv

extern "C" {

static PyObject* arwkv_cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(arwkv::cpu::isa_name(arwkv::cpu::active_isa()));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

static PyObject* arwkv_cpu_isas_supported(PyObject*, PyObject*) {
  using arwkv::cpu::Isa;
  PyObject* out = PyList_New(0);
  for (Isa isa : {Isa::baseline, Isa::avx2, Isa::avx512}) {
    if (!arwkv::cpu::isa_supported(isa)) continue;
    PyObject* name = PyUnicode_FromString(arwkv::cpu::isa_name(isa));
    PyList_Append(out, name);
    Py_DECREF(name);
  }
  return out;
}

static PyMethodDef kMethods[] = {
    {"cpu_isa", arwkv_cpu_isa, METH_NOARGS,
     "Instruction set the CPU kernels use now (ARWKV_CPU_ISA overrides the best supported)."},
    {"cpu_isas_supported", arwkv_cpu_isas_supported, METH_NOARGS,
     "Instruction sets compiled into this build that this CPU can run."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, kMethods,
                                     nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
}
