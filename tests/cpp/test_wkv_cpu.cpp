// C++ test of the CPU kernels without torch: forward against a naive double-precision loop,
// backward against central differences of that loop (a random directional derivative), for
// every instruction set this CPU runs, with and without packed sequences and row splits.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "test_problems.h"

namespace {

int failures = 0;
void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s\n", what.c_str());
  }
}

void check(Problem p, int threads, const std::string& name) {
  Vec y_ref, s_ref;
  naive(p, y_ref, s_ref);
  std::vector<Vec*> xs = p.inputs();
  const size_t n_in = xs.size() - 1;  // the last is the initial state

  // float32 forward.
  std::vector<std::vector<float>> in32;
  for (size_t i = 0; i < n_in; ++i) in32.push_back(cast<float>(*xs[i]));
  std::vector<float> s32 = cast<float>(p.s0), y32(y_ref.size()), f32(s_ref.size());
  const ParallelFor pf = serial_threads(threads);
  WkvProblem a32 = problem_for(p, in32, s32.data());
  a32.y = y32.data(), a32.final_state = f32.data();
  forward(a32, pf);
  expect(rel(cast<double>(Vec(y32.begin(), y32.end())), y_ref) < 1e-5, name + " float32 y");
  expect(rel(cast<double>(Vec(f32.begin(), f32.end())), s_ref) < 1e-5, name + " float32 state");

  // float64 forward and backward.
  std::vector<std::vector<double>> in64;
  for (size_t i = 0; i < n_in; ++i) in64.push_back(*xs[i]);
  Vec y64(y_ref.size()), f64(s_ref.size());
  WkvProblem a64 = problem_for(p, in64, p.s0.data());
  a64.y = y64.data(), a64.final_state = f64.data();
  forward(a64, pf);
  a64.y = a64.final_state = nullptr;
  expect(rel(y64, y_ref) < 1e-12 && rel(f64, s_ref) < 1e-12, name + " float64 forward");

  std::mt19937 gen(7);
  std::normal_distribution<double> normal;
  Vec gy(y_ref.size()), gs(s_ref.size());
  for (auto& e : gy) e = normal(gen);
  for (auto& e : gs) e = normal(gen);
  const std::vector<Vec> grads = cpu_gradients(p, a64, gy, gs, pf);

  // Directional derivative of L = <y, gy> + <S, gs> along a random direction D.
  std::vector<Vec> dir;
  double analytic = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    Vec d(xs[i]->size());
    for (auto& e : d) e = normal(gen);
    for (size_t j = 0; j < d.size(); ++j) analytic += grads[i][j] * d[j];
    dir.push_back(d);
  }
  auto loss_at = [&](double eps) {
    Problem q = p;
    std::vector<Vec*> qx = q.inputs();
    for (size_t i = 0; i < qx.size(); ++i)
      for (size_t j = 0; j < qx[i]->size(); ++j) (*qx[i])[j] += eps * dir[i][j];
    Vec y, s;
    naive(q, y, s);
    double l = 0;
    for (size_t j = 0; j < y.size(); ++j) l += y[j] * gy[j];
    for (size_t j = 0; j < s.size(); ++j) l += s[j] * gs[j];
    return l;
  };
  const double eps = 1e-6, numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps);
  expect(std::fabs(numeric - analytic) <= 1e-6 * std::fabs(analytic) + 1e-8,
         name + " backward (directional derivative " + std::to_string(analytic) + " vs " +
             std::to_string(numeric) + ")");
}

}  // namespace

int main() {
  int checks = 0;
  for (Isa isa : {Isa::baseline, Isa::avx2, Isa::avx512}) {
    if (!isa_supported(isa)) continue;
    setenv("ARWKV_CPU_ISA", isa_name(isa), 1);
    for (Algorithm algorithm : {Algorithm::step, Algorithm::chunked})
    for (int version : {7, 6})
      for (int64_t N : arwkv::kHeadSizes) {
        setenv("ARWKV_CPU_ALGORITHM", algorithm_name(algorithm), 1);
        const std::string tag = std::string(isa_name(isa)) + " " + algorithm_name(algorithm) + " wkv" +
                                std::to_string(version) + " N=" + std::to_string(N);
        check(make_problem(version, 2, 19, 2, N, {}, 1), 1, tag + " batch");
        check(make_problem(version, 1, 23, 1, N, {0, 5, 6, 23}, 2), 8, tag + " packed+splits");
        check(make_problem(version, 3, 3, 2, N, {}, 3), 2, tag + " short");  // the decoding path
        checks += 3;
      }
  }
  std::printf("%d passed, %d failed\n", checks - failures, failures);
  return failures ? 1 : 0;
}
