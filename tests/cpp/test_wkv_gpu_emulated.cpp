// The GPU kernels' own source (csrc/gpu/wkv_gpu_kernels.cuh), run on the CPU by the emulator
// in gpu_emulator.h, against the CPU kernel in float64 on the same (rounded) inputs: forward and
// backward, WKV-7 and WKV-6, float32 / bf16 / fp16 inputs, every head size, wide and narrow row
// tiles, packed sequences (with an empty one), decoding (T = 1), and null initial_state,
// grad_y and grad_state. Built twice by CMakeLists.txt: CUDA tiles on 32-lane warps, and HIP
// tiles on 64-lane waves (ARWKV_HIP). Outputs and scratch start as NaN; each check reruns the
// kernels with threads and blocks in reverse and shuffled order and requires the same bits, so
// a missing barrier or a read of shared memory the block did not write shows.
//
// What this cannot see: the compilers' code for the real devices, timing, memory limits (LDS,
// registers: make check-cuda / check-hip), and races between blocks (none share data here).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "emulated_checks.h"
#include "gpu/wkv_gpu_kernels.cuh"
#include "test_problems.h"

namespace gpu = arwkv::gpu;

namespace {

using namespace emulated;  // kPlatform, checks, failures, expect

template <class T> const char* type_name();
template <> const char* type_name<float>() { return "float32"; }
template <> const char* type_name<gpu::Bf16>() { return "bf16"; }
template <> const char* type_name<gpu::F16>() { return "fp16"; }

// Half a unit in the last place, relative: the most rounding a float32 value to T may change it.
template <class T> constexpr double half_ulp();
template <> constexpr double half_ulp<float>() { return 0.0; }  // float32 outputs are not rounded
template <> constexpr double half_ulp<gpu::Bf16>() { return 0x1p-8; }
template <> constexpr double half_ulp<gpu::F16>() { return 0x1p-11; }

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

// What a check passes to the kernels besides the inputs. `num_sms` is what the launcher is told
// the device has: 1 gives the wide row tiles wherever a problem has >= 2 wide blocks, 2^20
// always the narrow ones (more blocks per head).
struct Case {
  int num_sms = 1;
  gpu::Algorithm algorithm = gpu::Algorithm::step;
  bool initial_state = true, grad_y = true, grad_state = true;  // false: null pointers
  bool misaligned = false;  // inputs one element past a 16-byte boundary (step only: chunked refuses them)
};

template <class T>
T nan_as() {
  return gpu::from_float<T>(std::nanf(""));
}

// Everything the GPU kernels wrote, as doubles, in the order y, final_state, then the gradients
// in the order of Problem::inputs(). Outputs and scratch start as NaN (torch allocates them
// uninitialised), so an element no thread writes shows.
template <class T>
std::vector<Vec> run_gpu(Problem p, const Vec& gy, const Vec& gs, const Case& c, gpu::LaunchStatus& status) {
  const int64_t plane = p.B * p.T * p.H * p.N, states = p.S() * p.H * p.N * p.N;
  std::vector<std::vector<T>> in;
  for (Vec* x : p.inputs()) {
    in.push_back(store_as<T>(*x));
    if (c.misaligned) in.back().insert(in.back().begin(), T{});  // the data then starts at [1]
  }
  const std::vector<float> s0 = cast<float>(p.s0), gs32 = cast<float>(gs);
  const std::vector<T> gy_t = store_as<T>(gy);
  const float nan = std::nanf("");
  const gpu::Device device{c.num_sms, nullptr, c.algorithm};

  WkvProblem x = problem_for(p, in, static_cast<const T*>(nullptr));
  if (c.misaligned)
    for (const void** q : {&x.r, &x.w, &x.k, &x.v, &x.a, &x.b, &x.u})
      if (*q) *q = static_cast<const T*>(*q) + 1;
  x.dtype = std::is_same_v<T, float> ? DType::f32 : std::is_same_v<T, gpu::Bf16> ? DType::bf16 : DType::f16;
  x.initial_state = c.initial_state ? s0.data() : nullptr;
  std::vector<T> y(plane, nan_as<T>());
  std::vector<float> final_state(states, nan);
  x.y = y.data(), x.final_state = final_state.data();
  // The GPU backend's scratch (on a GPU: torch allocations, uninitialised)
  const gpu::ScratchSizes fsize = gpu::scratch_sizes(x, c.algorithm, false);
  std::vector<float> forward_operands(fsize.chunk_operands, nan);
  gpu::Scratch forward_scratch;
  forward_scratch.chunk_operands = forward_operands.data();
  status = gpu::forward<T>(x, forward_scratch, device);

  WkvBackwardProblem bp;
  static_cast<WkvProblem&>(bp) = x;
  bp.y = bp.final_state = nullptr;
  std::vector<std::vector<T>> grads(p.version == 7 ? 6 : 4, std::vector<T>(plane, nan_as<T>()));
  std::vector<float> grad_s0(states, nan);
  bp.grad_y = c.grad_y ? gy_t.data() : nullptr;
  bp.grad_state = c.grad_state ? gs32.data() : nullptr;
  bp.grad_r = grads[0].data(), bp.grad_w = grads[1].data(), bp.grad_k = grads[2].data();
  bp.grad_v = grads[3].data();
  if (p.version == 7) bp.grad_a = grads[4].data(), bp.grad_b = grads[5].data();
  bp.grad_initial_state = grad_s0.data();
  const gpu::ScratchSizes size = gpu::scratch_sizes(bp, c.algorithm, true);
  std::vector<float> snapshots(size.snapshots, nan), sa(size.sa, nan), dsa(size.dsa, nan);
  std::vector<float> grad_u_partial(size.grad_u_partial, nan), state_grads(size.state_grads, nan);
  std::vector<float> operands(size.chunk_operands, nan);
  const gpu::Scratch scratch{snapshots.data(), sa.data(),          dsa.data(),
                             grad_u_partial.data(), state_grads.data(), operands.data()};
  if (status.ok()) status = gpu::backward<T>(bp, scratch, device);

  std::vector<Vec> out{values(y), values(final_state)};
  for (auto& g : grads) out.push_back(values(g));
  if (p.version == 6) {  // the GPU backend adds the sequences' grad_u up
    Vec gu(p.H * p.N, 0.0);
    for (size_t i = 0; i < grad_u_partial.size(); ++i) gu[i % gu.size()] += grad_u_partial[i];
    out.push_back(gu);
  }
  out.push_back(values(grad_s0));
  return out;
}

// Largest (|got - want| - ulp |want|) / scale over the elements: the error beyond rounding to
// within ulp of the value, in units of `scale`; NaN anywhere gives infinity.
double worst_excess(const Vec& got, const Vec& want, double ulp, double scale) {
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double e = (std::fabs(got[i] - want[i]) - ulp * std::fabs(want[i])) / scale;
    if (!(e <= worst)) worst = std::isnan(e) ? INFINITY : e;
  }
  return worst;
}

template <class T>
void check(Problem p, const Case& c, const std::string& what) {
  const std::string name = std::string(kPlatform) + ", wkv" + std::to_string(p.version) + " N=" +
                           std::to_string(p.N) + " " + type_name<T>() +
                           (c.algorithm == gpu::Algorithm::chunked ? " chunked " : " step ") + what +
                           (c.num_sms == 1 ? " (launched as for 1 SM)" : " (launched as for 2^20 SMs)");

  // The reference sees exactly the values the GPU kernels see (zeros for a null pointer).
  for (Vec* x : p.inputs()) *x = values(store_as<T>(*x));
  p.s0 = c.initial_state ? round_to_float(p.s0) : Vec(p.s0.size(), 0.0);
  std::mt19937 gen(11);
  std::normal_distribution<double> normal;
  Vec gy(p.B * p.T * p.H * p.N, 0.0), gs(p.s0.size(), 0.0);
  if (c.grad_y)
    for (auto& e : gy) e = normal(gen);
  if (c.grad_state)
    for (auto& e : gs) e = normal(gen);
  gy = values(store_as<T>(gy)), gs = round_to_float(gs);

  std::vector<std::vector<double>> in64;
  std::vector<Vec*> xs = p.inputs();
  for (size_t i = 0; i + 1 < xs.size(); ++i) in64.push_back(*xs[i]);
  WkvProblem a64 = problem_for(p, in64, p.s0.data());
  Vec y_ref(gy.size()), s_ref(p.s0.size());
  a64.y = y_ref.data(), a64.final_state = s_ref.data();
  forward(a64, kSerial);
  a64.y = a64.final_state = nullptr;
  std::vector<Vec> want{y_ref, s_ref};
  for (Vec& g : cpu_gradients(p, a64, gy, gs, kSerial)) want.push_back(g);

  gpu::LaunchStatus status;
  gpu_emu::set_schedule(gpu_emu::Schedule::forward);
  const std::vector<Vec> got = run_gpu<T>(p, gy, gs, c, status);
  expect(status.ok(), name + ": " + gpu::describe(status));
  if (!status.ok()) return;

  std::vector<std::string> names{"y", "final_state", "grad_r", "grad_w", "grad_k", "grad_v"};
  if (p.version == 7) names.insert(names.end(), {"grad_a", "grad_b"});
  else names.push_back("grad_u");
  names.push_back("grad_initial_state");
  // Each output is a float32 value (summation order differs from float64: a few 1e-6 of the
  // tensor's RMS here), rounded to T once: to within half a unit in the last place, 2^-8 of the
  // value for bf16 and 2^-11 for fp16. Checked element by element, and as a whole.
  // The chunked kernels' products are split-bf16 tensor-core products, good to ~2^-16 (1.5e-5)
  // of each term rather than fp32's 2^-24: held to the op's float32 contract as a whole (1e-4),
  // and each element to 1e-3 of the RMS (where a sum cancels, e.g. grad_w's cumulative sums,
  // the terms' error is large next to the result). (Measured: <= 2.2e-5 as a whole, <= 2.9e-4
  // of the RMS for an element, in the strong-decay case's grad_w.)
  const bool chunked = c.algorithm == gpu::Algorithm::chunked;
  const double whole_tol = chunked ? 1e-4 : 2e-5, element_tol = chunked ? 1e-3 : 2e-5;
  for (size_t i = 0; i < names.size(); ++i) {
    // The state, its gradient and grad_u stay float32 whatever the inputs.
    const bool in_t = !(names[i] == "final_state" || names[i] == "grad_initial_state" || names[i] == "grad_u");
    const double ulp = in_t ? half_ulp<T>() : 0.0;
    const double e = rel(got[i], want[i]);
    if (std::getenv("ARWKV_EMU_VERBOSE")) std::printf("%s %s: %.3g\n", name.c_str(), names[i].c_str(), e);
    expect(e <= whole_tol + ulp, name + " " + names[i] + ": relative error " + std::to_string(e));
    double rms = 0;
    for (double v : want[i]) rms += v * v;
    rms = std::sqrt(rms / double(want[i].size())) + 1e-30;
    const double worst = worst_excess(got[i], want[i], ulp, rms);
    expect(worst <= element_tol, name + " " + names[i] + ": an element is off by " + std::to_string(worst) +
                              " of the RMS beyond rounding");
  }

  for (auto schedule : {gpu_emu::Schedule::reverse, gpu_emu::Schedule::shuffled}) {
    gpu_emu::set_schedule(schedule);
    const std::vector<Vec> again = run_gpu<T>(p, gy, gs, c, status);
    expect(status.ok() && again == got, name + ": results depend on the order threads and blocks run in (" +
                                             (schedule == gpu_emu::Schedule::reverse ? "reverse" : "shuffled") +
                                             ")" + (status.ok() ? "" : ": " + gpu::describe(status)));
  }
  gpu_emu::set_schedule(gpu_emu::Schedule::forward);
}

// The problem with its log decays scaled from [-3, 0] to [-20, 0].
Problem strong_decays(Problem p) {
  for (double& w : p.w) w *= 20.0 / 3.0;
  return p;
}

// A launch that fails is reported with the kernel's name, input type and head size.
void check_launch_failure_names_kernel() {
  const Problem p = make_problem(7, 1, 5, 1, 64, {}, 1);
  const Vec gy(p.B * p.T * p.H * p.N, 1.0), gs(p.s0.size(), 1.0);
  gpu::LaunchStatus status;
  // step launches: 1 forward, 2 backward snapshots, 3 backward state gradient, 4 backward columns;
  // chunked: 1 forward (fused), 2 the fused forward's saves, 3 state gradient, 4 per-chunk gradients
  const std::tuple<gpu::Algorithm, int, std::string> cases[] = {
      {gpu::Algorithm::step, 1, "GPU kernel wkv7_forward_rows<bf16, N=64> launch failed: injected"},
      {gpu::Algorithm::step, 2, "GPU kernel wkv7_backward_snapshots<bf16, N=64> launch failed: injected"},
      {gpu::Algorithm::step, 4, "GPU kernel wkv7_backward_columns<bf16, N=64> launch failed: injected"},
      {gpu::Algorithm::chunked, 1, "GPU kernel wkv7_chunk_forward<bf16, N=64> launch failed: injected"},
      {gpu::Algorithm::chunked, 2, "GPU kernel wkv7_chunk_saves<bf16, N=64> launch failed: injected"},
      {gpu::Algorithm::chunked, 3, "GPU kernel wkv7_chunk_state_grad<bf16, N=64> launch failed: injected"},
      {gpu::Algorithm::chunked, 4, "GPU kernel wkv7_chunk_grads<bf16, N=64> launch failed: injected"}};
  for (const auto& [algorithm, n, want] : cases) {
    gpu_emu::fail_launch(n, "injected");
    Case c;
    c.algorithm = algorithm;
    run_gpu<gpu::Bf16>(p, gy, gs, c, status);
    const std::string got = status.ok() ? "(no failure)" : gpu::describe(status);
    expect(got == want, std::string(kPlatform) + ": failed launch " + std::to_string(n) + " reads \"" + got +
                            "\", expected \"" + want + "\"");
  }
  gpu_emu::fail_launch(0, "");
  // the chunked kernels take 16-byte-aligned inputs only (the op copies others): refused, not run
  Case misaligned;
  misaligned.algorithm = gpu::Algorithm::chunked, misaligned.misaligned = true;
  const std::vector<Vec> out = run_gpu<gpu::Bf16>(p, gy, gs, misaligned, status);
  const std::string want =
      "GPU kernel wkv7_chunk_forward<bf16, N=64> launch failed: inputs r, w, k (a, b) are not 16-byte aligned "
      "(the op makes aligned copies)";
  const std::string got = status.ok() ? "(no failure)" : gpu::describe(status);
  expect(got == want, std::string(kPlatform) + ": misaligned chunked inputs read \"" + got + "\"");
  expect(std::isnan(out[0][0]), std::string(kPlatform) + ": a refused launch wrote outputs");
}

// --banks: the shared-memory bank conflicts of the chunked kernels' tile-layer accesses (see
// gpu_emulator.h), one JSON object a line per (version, N, kernel, source line), for the GPU
// performance model (tools/gpu_model). One bf16 call and its backward per version and head size,
// three chunks of which one padded: the access pattern depends on N and the lane maps, not on B,
// T or H.
int report_bank_conflicts() {
  for (int version : {7, 6})
    for (int64_t N : arwkv::kHeadSizes) {
      const Problem p = make_problem(version, 1, 40, 1, N, {}, 5);
      const Vec gy(p.B * p.T * p.H * p.N, 0.5), gs(p.s0.size(), 0.25);
      gpu_emu::runtime().banks.clear();
      gpu_emu::runtime().count_banks = true;
      gpu::LaunchStatus status;
      run_gpu<gpu::Bf16>(p, gy, gs, Case{1, gpu::Algorithm::chunked}, status);
      gpu_emu::runtime().count_banks = false;
      if (!status.ok()) {
        std::fprintf(stderr, "%s\n", gpu::describe(status).c_str());
        return 1;
      }
      for (const auto& [key, c] : gpu_emu::runtime().banks)
        std::printf("{\"platform\": \"%s\", \"version\": %d, \"N\": %lld, \"kernel\": \"%s\", \"file\": \"%s\", "
                    "\"line\": %d, \"accesses\": %lld, \"wavefronts\": %lld, \"ideal\": %lld}\n",
                    kPlatform, version, static_cast<long long>(N), std::get<0>(key).c_str(), std::get<1>(key).c_str(),
                    std::get<2>(key), static_cast<long long>(c.accesses), static_cast<long long>(c.wavefronts),
                    static_cast<long long>(c.ideal));
    }
  return 0;
}

}  // namespace

// Which checks a run makes (the first argument): all of them (none given); --part=fast, every
// check at every head size but the largest, and at the largest each check once, the four
// algorithm x version pairs taking turns (so every check, algorithm, version, input type and
// head size, and every pair of check and head size, is seen; in 45% of the time, the largest
// head size taking three quarters of it); --part=slow, the rest. ctest runs both, the slow part
// labelled slow (make test-full).
enum class Part { all, fast, slow };

int main(int argc, char** argv) {
  const std::string arg = argc > 1 ? argv[1] : "";
  if (argc > 2 || !(arg.empty() || arg == "--part=fast" || arg == "--part=slow" || arg == "--banks")) {
    std::fprintf(stderr, "usage: %s [--part=fast|--part=slow|--banks]\n", argv[0]);
    return 2;
  }
  if (arg == "--banks") return report_bank_conflicts();
  const Part part = arg.empty() ? Part::all : arg == "--part=fast" ? Part::fast : Part::slow;
  const int64_t largest = *std::max_element(std::begin(arwkv::kHeadSizes), std::end(arwkv::kHeadSizes));
  if (part != Part::slow) check_launch_failure_names_kernel();
  int pair = 0;  // the algorithm x version pair, 0 to 3
  for (gpu::Algorithm algorithm : {gpu::Algorithm::step, gpu::Algorithm::chunked}) {
    const Case many_blocks{1, algorithm}, few_sms_per_block{1 << 20, algorithm};
    Case no_state = many_blocks, decoding = few_sms_per_block, no_grad_y = many_blocks;
    no_state.initial_state = no_state.grad_state = false;
    decoding.grad_state = false;
    no_grad_y.grad_y = false;
    no_grad_y.misaligned = algorithm == gpu::Algorithm::step;  // (the chunked kernels refuse them)
    for (int version : {7, 6}) {
      for (int64_t N : arwkv::kHeadSizes) {
        unsigned seed = unsigned(version * 1000 + N);
        // Check number `kind` (0 to 7) runs in this part? (Its problem is drawn either way, so
        // that each check sees the same numbers whatever the part.)
        auto runs = [&](int kind) {
          const bool fast = N != largest || kind % 4 == pair;
          return part == Part::all || fast == (part == Part::fast);
        };
        Problem batch = make_problem(version, 2, 19, 2, N, {}, seed++);
        if (runs(0)) check<float>(batch, many_blocks, "batch");
        Problem empty_sequence = make_problem(version, 1, 23, 1, N, {0, 5, 5, 6, 23}, seed++);
        if (runs(1)) check<float>(empty_sequence, few_sms_per_block, "cu_seqlens with an empty sequence");
        Problem one_step = make_problem(version, 3, 1, 2, N, {}, seed++);
        if (runs(2)) check<float>(one_step, decoding, "decoding T=1");
        Problem short_one = make_problem(version, 1, 9, 1, N, {}, seed++);
        if (runs(3)) check<float>(short_one, no_state, "no state in or out");
        Problem two = make_problem(version, 2, 11, 1, N, {}, seed++);
        if (runs(4)) check<float>(two, no_grad_y, "no grad_y (step: misaligned inputs)");
        Problem strong = strong_decays(make_problem(version, 1, 37, 1, N, {0, 16, 37}, seed++));
        if (runs(5)) check<float>(strong, many_blocks, "log decays to -20, cu_seqlens");
        Problem bf16 = make_problem(version, 1, 13, 2, N, {}, seed++);
        if (runs(6)) check<gpu::Bf16>(bf16, many_blocks, "batch");
        Problem fp16 = make_problem(version, 1, 13, 2, N, {0, 4, 13}, seed++);
        if (runs(7)) check<gpu::F16>(fp16, few_sms_per_block, "cu_seqlens");
      }
      ++pair;
    }
  }
  // The op's long-sequence contracts, for the chunked kernels (minutes in the emulator, so only
  // on request: ARWKV_EMU_LONG=1): float32 at T = 4096 with log decays down to -20, and bf16
  // inputs at T = 16384, both against float64 (the whole-tensor check is the op's 1e-4 for
  // float32; bf16 outputs add their rounding).
  if (part != Part::fast && std::getenv("ARWKV_EMU_LONG")) {
    Case chunked{1, gpu::Algorithm::chunked};
    for (int version : {7, 6}) {
      check<float>(strong_decays(make_problem(version, 1, 4096, 1, 64, {}, 77)), chunked, "T=4096, log decays to -20");
      check<gpu::Bf16>(make_problem(version, 1, 16384, 1, 64, {}, 78), chunked, "T=16384");
    }
  }
  std::printf("%s: %d passed, %d failed (%lld fiber switches)\n", kPlatform, checks - failures, failures,
              static_cast<long long>(gpu_emu::runtime().switches));
  return failures ? 1 : 0;
}
