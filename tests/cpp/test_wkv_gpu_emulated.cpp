// The GPU kernels' own source (csrc/gpu/wkv_gpu_kernels.cuh), run on the CPU by the emulator
// in gpu_emulator.h, against the CPU kernel in float64 on the same (rounded) inputs: forward and
// backward, WKV-7 and WKV-6, float32 / bf16 / fp16 inputs, every head size, both row tiles
// (wide and narrow), packed sequences (with an empty one), decoding (T = 1), no initial state
// and no state gradient. Built twice by CMakeLists.txt: CUDA tiles on 32-lane warps, and HIP
// tiles on 64-lane waves (ARWKV_HIP). Each check also reruns the kernels with the threads of a
// block in reverse and shuffled order and requires the same bits: a missing barrier would show.
//
// What this cannot see: the compilers' code for the real devices, timing, memory limits (LDS,
// registers: make check-cuda / check-hip), and races between blocks (none share data here).
#include <cstdio>
#include <string>
#include <vector>

#include "gpu/wkv_gpu_kernels.cuh"
#include "wkv_problem.h"

namespace gpu = arwkv::gpu;

namespace {

#if defined(ARWKV_HIP)
const char* kPlatform = "hip tiles, 64-lane waves";
#else
const char* kPlatform = "cuda tiles, 32-lane warps";
#endif

int failures = 0, checks = 0;
void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAIL %s\n", what.c_str());
  }
}

template <class T> const char* type_name();
template <> const char* type_name<float>() { return "float32"; }
template <> const char* type_name<gpu::Bf16>() { return "bf16"; }
template <> const char* type_name<gpu::F16>() { return "fp16"; }

// Storage of type T, and the values it holds as doubles.
template <class T>
std::vector<T> store_as(const Vec& x) {
  std::vector<T> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = gpu::from_float<T>(float(x[i]));
  return out;
}
template <class T>
Vec values(const std::vector<T>& x) {
  Vec out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = gpu::to_float(x[i]);
  return out;
}
Vec round_to_float(const Vec& x) { return values(cast<float>(x)); }

// Everything the GPU kernels wrote, as doubles, in the order y, final_state, then the gradients
// in the order of Problem::inputs().
template <class T>
std::vector<Vec> run_gpu(const Problem& p, const Vec& gy, const Vec& gs, bool with_state, bool with_grad_state,
                         int num_sms, std::string& error) {
  const int64_t plane = p.B * p.T * p.H * p.N, states = p.S() * p.H * p.N * p.N;
  std::vector<std::vector<T>> in;
  for (Vec* x : const_cast<Problem&>(p).inputs()) in.push_back(store_as<T>(*x));
  const std::vector<float> s0 = cast<float>(p.s0), gs32 = cast<float>(gs);
  const std::vector<T> gy_t = store_as<T>(gy);

  gpu::WkvParams x;
  x.version = p.version;
  x.B = p.B, x.T = p.T, x.H = p.H, x.N = p.N;
  x.num_seqs = p.S();
  x.r = in[0].data(), x.w = in[1].data(), x.k = in[2].data(), x.v = in[3].data();
  if (p.version == 7) x.a = in[4].data(), x.b = in[5].data();
  else x.u = in[4].data();
  x.initial_state = with_state ? s0.data() : nullptr;
  x.cu_seqlens = p.cu.empty() ? nullptr : p.cu.data();
  x.num_sms = num_sms;

  std::vector<T> y(plane);
  std::vector<float> final_state(states);
  x.y = y.data(), x.final_state = final_state.data();
  const char* err = gpu::forward<T>(x);

  std::vector<std::vector<T>> grads(p.version == 7 ? 6 : 4, std::vector<T>(plane));
  std::vector<float> grad_u_partial(p.S() * p.H * p.N), grad_s0(states);
  std::vector<float> snapshots(gpu::num_chunk_slots(x) * p.H * p.N * p.N), sa(plane), dsa(plane);
  x.grad_y = gy_t.data();
  x.grad_state = with_grad_state ? gs32.data() : nullptr;
  x.grad_r = grads[0].data(), x.grad_w = grads[1].data(), x.grad_k = grads[2].data(), x.grad_v = grads[3].data();
  if (p.version == 7) x.grad_a = grads[4].data(), x.grad_b = grads[5].data();
  else x.grad_u_partial = grad_u_partial.data();
  x.grad_initial_state = grad_s0.data();
  x.snapshots = snapshots.data(), x.sa = sa.data(), x.dsa = dsa.data();
  if (!err) err = gpu::backward<T>(x);
  error = err ? err : "";

  std::vector<Vec> out{values(y), values(final_state)};
  for (auto& g : grads) out.push_back(values(g));
  if (p.version == 6) {
    Vec gu(p.H * p.N, 0.0);
    for (size_t i = 0; i < grad_u_partial.size(); ++i) gu[i % gu.size()] += grad_u_partial[i];
    out.push_back(gu);
  }
  out.push_back(values(grad_s0));
  return out;
}

// `tile`: "wide" (enough blocks: many per multiprocessor) or "narrow" (few: more blocks per head).
template <class T>
void check(Problem p, const std::string& tile, bool with_state, bool with_grad_state, const std::string& what) {
  const std::string name = std::string(kPlatform) + ", wkv" + std::to_string(p.version) + " N=" +
                           std::to_string(p.N) + " " + type_name<T>() + " " + what + " (" + tile + " rows)";
  const int num_sms = tile == "wide" ? 1 : 1 << 20;

  // The reference sees exactly the values the GPU kernels see.
  for (Vec* x : p.inputs()) *x = values(store_as<T>(*x));
  p.s0 = with_state ? round_to_float(p.s0) : Vec(p.s0.size(), 0.0);
  std::mt19937 gen(11);
  std::normal_distribution<double> normal;
  Vec gy(p.B * p.T * p.H * p.N), gs(p.s0.size(), 0.0);
  for (auto& e : gy) e = normal(gen);
  if (with_grad_state)
    for (auto& e : gs) e = normal(gen);
  gy = values(store_as<T>(gy)), gs = round_to_float(gs);

  std::vector<std::vector<double>> in64;
  std::vector<Vec*> xs = p.inputs();
  for (size_t i = 0; i + 1 < xs.size(); ++i) in64.push_back(*xs[i]);
  const WkvArgs a64 = args_for(p, in64, p.s0, 1);
  Vec y_ref(gy.size()), s_ref(p.s0.size());
  forward(a64, {y_ref.data(), s_ref.data()}, kSerial);
  std::vector<Vec> want{y_ref, s_ref};
  for (Vec& g : cpu_gradients(p, a64, gy, gs)) want.push_back(g);

  std::string error;
  gpu_emu::set_schedule(gpu_emu::Schedule::forward);
  const std::vector<Vec> got = run_gpu<T>(p, gy, gs, with_state, with_grad_state, num_sms, error);
  expect(error.empty(), name + ": launch failed: " + error);
  if (!error.empty()) return;

  // float32: summation order only. 16-bit outputs are rounded once (bf16: 2^-9 relative).
  const double tol = sizeof(T) == 4 ? 2e-5 : type_name<T>()[0] == 'b' ? 4e-3 : 5e-4;
  std::vector<std::string> names{"y", "final_state", "grad_r", "grad_w", "grad_k", "grad_v"};
  if (p.version == 7) names.insert(names.end(), {"grad_a", "grad_b"});
  else names.push_back("grad_u");
  names.push_back("grad_initial_state");
  for (size_t i = 0; i < names.size(); ++i) {
    // The state and its gradient stay float32 whatever the inputs.
    const double t = names[i] == "final_state" || names[i] == "grad_initial_state" || names[i] == "grad_u"
                         ? 2e-5 : tol;
    const double e = rel(got[i], want[i]);
    expect(e <= t, name + " " + names[i] + ": relative error " + std::to_string(e) + " > " + std::to_string(t));
  }

  for (auto schedule : {gpu_emu::Schedule::reverse, gpu_emu::Schedule::shuffled}) {
    gpu_emu::set_schedule(schedule);
    const std::vector<Vec> again = run_gpu<T>(p, gy, gs, with_state, with_grad_state, num_sms, error);
    expect(error.empty() && again == got, name + ": results depend on the order threads run in (" +
                                              (schedule == gpu_emu::Schedule::reverse ? "reverse" : "shuffled") +
                                              ")" + (error.empty() ? "" : ": " + error));
  }
  gpu_emu::set_schedule(gpu_emu::Schedule::forward);
}

}  // namespace

int main() {
  for (int version : {7, 6})
    for (int64_t N : {16, 32, 64, 128}) {
      unsigned seed = unsigned(version * 1000 + N);
      check<float>(make_problem(version, 2, 19, 2, N, {}, seed++), "wide", true, true, "batch");
      check<float>(make_problem(version, 1, 23, 1, N, {0, 5, 5, 6, 23}, seed++), "narrow", true, true,
                   "cu_seqlens with an empty sequence");
      check<float>(make_problem(version, 3, 1, 2, N, {}, seed++), "narrow", true, false, "decoding T=1");
      check<float>(make_problem(version, 1, 9, 1, N, {}, seed++), "wide", false, false, "no state in or out");
      check<gpu::Bf16>(make_problem(version, 1, 13, 2, N, {}, seed++), "wide", true, true, "batch");
      check<gpu::F16>(make_problem(version, 1, 13, 2, N, {0, 4, 13}, seed++), "narrow", true, true, "cu_seqlens");
    }
  std::printf("%s: %d passed, %d failed (%lld fiber switches)\n", kPlatform, checks - failures, failures,
              static_cast<long long>(gpu_emu::runtime().switches));
  return failures ? 1 : 0;
}
