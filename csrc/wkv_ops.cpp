// The op schemas (written once, here; wkv_adapter.cpp registers their CPU, GPU and Meta
// implementations), and the Python module arwkv_ext._C: importing it loads this library, and it
// tells Python the head sizes and CPU instruction sets, and runs the GPU tiles' self-test.
#include <Python.h>

#include <torch/library.h>

#include <exception>
#include <string>

#include "cpu/wkv_cpu.h"
#include "wkv_backends.h"
#include "wkv_problem.h"

namespace arwkv {

#ifdef ARWKV_WITH_GPU
std::string gpu_tile_selftest();  // csrc/gpu/wkv_gpu_backend.cpp
#endif

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

// The CPU algorithm a call of `op` (7 or 6) in `direction` ("forward" / "backward") uses now.
static PyObject* arwkv_cpu_algorithm(PyObject*, PyObject* args) {
  int version = 7;
  const char* direction = "forward";
  if (!PyArg_ParseTuple(args, "|is", &version, &direction)) return nullptr;
  try {
    arwkv::WkvProblem p;
    p.version = version;
    const bool backward = std::string(direction) == "backward";
    if (!backward && std::string(direction) != "forward")
      throw std::invalid_argument(std::string("direction must be 'forward' or 'backward', got '") + direction + "'");
    const auto a = backward ? arwkv::cpu::backward_algorithm(p) : arwkv::cpu::forward_algorithm(p);
    return PyUnicode_FromString(arwkv::cpu::algorithm_name(a));
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

// The GPU algorithm (ARWKV_GPU_ALGORITHM) a call on a GPU uses now: "step" or "chunked".
static PyObject* arwkv_gpu_algorithm(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(arwkv::gpu_algorithm());
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  }
  return nullptr;
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

static PyObject* arwkv_head_sizes(PyObject*, PyObject*) {
  PyObject* out = PyTuple_New(arwkv::kNumHeadSizes);
  if (!out) return nullptr;
  for (int i = 0; i < arwkv::kNumHeadSizes; ++i) PyTuple_SET_ITEM(out, i, PyLong_FromLong(arwkv::kHeadSizes[i]));
  return out;
}

static PyObject* arwkv_gpu_tile_selftest(PyObject*, PyObject*) {
#ifdef ARWKV_WITH_GPU
  try {
    return PyUnicode_FromString(arwkv::gpu_tile_selftest().c_str());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
#else
  PyErr_SetString(PyExc_RuntimeError, "arwkv was built without GPU kernels");
#endif
  return nullptr;
}

static PyMethodDef kMethods[] = {
    {"head_sizes", arwkv_head_sizes, METH_NOARGS, "The head sizes N the kernels support, as a tuple."},
    {"cpu_isa", arwkv_cpu_isa, METH_NOARGS,
     "Instruction set the CPU kernels use now (ARWKV_CPU_ISA overrides the best supported)."},
    {"cpu_algorithm", arwkv_cpu_algorithm, METH_VARARGS,
     "cpu_algorithm(version=7, direction='forward'): the algorithm (step or chunked) the CPU kernels "
     "use now for such a call of segments longer than 4 steps (ARWKV_CPU_ALGORITHM overrides)."},
    {"gpu_algorithm", arwkv_gpu_algorithm, METH_NOARGS,
     "gpu_algorithm(): the algorithm (step or chunked) the GPU kernels use now (ARWKV_GPU_ALGORITHM)."},
    {"cpu_isas_supported", arwkv_cpu_isas_supported, METH_NOARGS,
     "Instruction sets compiled into this build that this CPU can run."},
    {"gpu_tile_selftest", arwkv_gpu_tile_selftest, METH_NOARGS,
     "Checks the tensor-core tiles' fragment layouts on the current GPU: 'bf16 ok, f16 ok', or the "
     "first wrong element."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, kMethods,
                                     nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
}
