// Shared by the C++ kernel tests: random WKV problems, the naive double-precision recurrence,
// the kernels' problem description (csrc/wkv_problem.h) filled from them, and the CPU kernel's
// gradients (the yardstick of the emulated GPU kernels).
#pragma once

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "cpu/wkv_cpu.h"
#include "wkv_problem.h"

using namespace arwkv::cpu;
using arwkv::DType;
using arwkv::WkvBackwardProblem;
using arwkv::WkvProblem;
using Vec = std::vector<double>;

inline void serial(void*, int64_t n, void* ctx, TaskFn fn) {
  for (int64_t i = 0; i < n; ++i) fn(ctx, i, i + 1);  // one task at a time, like many threads
}
// One task at a time, as if on `threads` threads (which decides the backward's row splits).
inline ParallelFor serial_threads(int threads) { return {nullptr, &serial, threads}; }
inline const ParallelFor kSerial = serial_threads(1);

struct Problem {
  int version;
  int64_t B, T, H, N;
  std::vector<int64_t> cu;  // empty: no packing
  Vec r, w, k, v, a, b, u, s0;
  int64_t S() const { return cu.empty() ? B : int64_t(cu.size()) - 1; }
  std::vector<Vec*> inputs() {
    std::vector<Vec*> x{&r, &w, &k, &v};
    if (version == 7) x.push_back(&a), x.push_back(&b);
    else x.push_back(&u);
    x.push_back(&s0);
    return x;
  }
};

// Naive WKV recurrences in double; returns y and the final state.
inline void naive(const Problem& p, Vec& y, Vec& state) {
  const int64_t N = p.N, H = p.H;
  y.assign(p.B * p.T * H * N, 0.0);
  state = p.s0;
  for (int64_t s = 0; s < p.S(); ++s) {
    const int64_t batch = p.cu.empty() ? s : 0;
    const int64_t t0 = p.cu.empty() ? 0 : p.cu[s], t1 = p.cu.empty() ? p.T : p.cu[s + 1];
    for (int64_t h = 0; h < H; ++h) {
      double* S = &state[(s * H + h) * N * N];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t o = ((batch * p.T + t) * H + h) * N;
        std::vector<double> sa(N, 0.0);
        if (p.version == 7) {
          for (int64_t i = 0; i < N; ++i)
            for (int64_t j = 0; j < N; ++j) sa[i] += S[i * N + j] * p.a[o + j];
        } else {
          double ruk = 0;
          for (int64_t j = 0; j < N; ++j) ruk += p.r[o + j] * p.u[h * N + j] * p.k[o + j];
          for (int64_t i = 0; i < N; ++i) {
            double acc = ruk * p.v[o + i];
            for (int64_t j = 0; j < N; ++j) acc += S[i * N + j] * p.r[o + j];
            y[o + i] = acc;
          }
        }
        for (int64_t i = 0; i < N; ++i)
          for (int64_t j = 0; j < N; ++j) {
            double& x = S[i * N + j];
            x = x * std::exp(p.w[o + j]) + p.v[o + i] * p.k[o + j];
            if (p.version == 7) x += sa[i] * p.b[o + j];
          }
        if (p.version == 7)
          for (int64_t i = 0; i < N; ++i) {
            double acc = 0;
            for (int64_t j = 0; j < N; ++j) acc += S[i * N + j] * p.r[o + j];
            y[o + i] = acc;
          }
      }
    }
  }
}

inline Problem make_problem(int version, int64_t B, int64_t T, int64_t H, int64_t N, std::vector<int64_t> cu,
                     unsigned seed) {
  Problem p{version, B, T, H, N, std::move(cu), {}, {}, {}, {}, {}, {}, {}, {}};
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> uniform(-1.0, 0.0);
  const int64_t n = B * T * H * N;
  auto fill = [&](Vec& x, int64_t count, double scale) {
    x.resize(count);
    for (auto& e : x) e = normal(gen) * scale;
  };
  fill(p.r, n, 1.0), fill(p.k, n, 0.3), fill(p.v, n, 1.0), fill(p.s0, p.S() * H * N * N, 0.3);
  p.w.resize(n);
  for (auto& e : p.w) e = 3.0 * uniform(gen);  // decays from e^-3 to 1
  if (version == 7) {
    fill(p.a, n, 1.0), fill(p.b, n, 1.0);
    for (int64_t row = 0; row < n / N; ++row) {  // a = -kk, b = kk * 0.5, kk unit norm
      double norm = 0;
      for (int64_t j = 0; j < N; ++j) norm += p.a[row * N + j] * p.a[row * N + j];
      for (int64_t j = 0; j < N; ++j) {
        p.a[row * N + j] /= -std::sqrt(norm);
        p.b[row * N + j] = -0.5 * p.a[row * N + j];
      }
    }
  } else {
    fill(p.u, H * N, 0.5);
  }
  return p;
}

template <class T> std::vector<T> cast(const Vec& x) { return std::vector<T>(x.begin(), x.end()); }

// The kernels' view of a problem whose inputs are stored as T (float or double; in the order of
// Problem::inputs() without the state) and whose initial state is s0 (null: zeros). Outputs unset.
template <class T>
WkvProblem problem_for(const Problem& p, const std::vector<std::vector<T>>& in, const T* s0) {
  WkvProblem a;
  a.version = p.version;
  a.dtype = sizeof(T) == 8 ? DType::f64 : DType::f32;
  a.B = p.B, a.T = p.T, a.H = p.H, a.N = p.N;
  a.cu_seqlens = p.cu.empty() ? nullptr : p.cu.data();
  a.num_seqs = p.S();
  a.r = in[0].data(), a.w = in[1].data(), a.k = in[2].data(), a.v = in[3].data();
  if (p.version == 7) a.a = in[4].data(), a.b = in[5].data();
  else a.u = in[4].data();
  a.initial_state = s0;
  return a;
}

inline double rel(const std::vector<double>& x, const Vec& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size(); ++i) num += (x[i] - ref[i]) * (x[i] - ref[i]), den += ref[i] * ref[i];
  return std::sqrt(num / (den > 0 ? den : 1));
}

// The CPU kernel's gradients of L = <y, gy> + <final state, gs> for a float64 problem, in the
// order of Problem::inputs(): r, w, k, v, (a, b | u), initial_state.
inline std::vector<Vec> cpu_gradients(const Problem& p, const WkvProblem& a64, const Vec& gy, const Vec& gs,
                                      const ParallelFor& pf) {
  const int64_t plane = p.B * p.T * p.H * p.N;
  std::vector<Vec> grads(p.version == 7 ? 7 : 6);  // r, w, k, v, (a, b | u), initial_state
  for (size_t i = 0; i + 1 < grads.size(); ++i) grads[i].assign(i == 4 && p.version == 6 ? p.H * p.N : plane, NAN);
  grads.back().assign(gs.size(), NAN);
  WkvBackwardProblem bp;
  static_cast<WkvProblem&>(bp) = a64;
  bp.grad_y = gy.data(), bp.grad_state = gs.data();
  bp.grad_r = grads[0].data(), bp.grad_w = grads[1].data(), bp.grad_k = grads[2].data();
  bp.grad_v = grads[3].data();
  if (p.version == 7) bp.grad_a = grads[4].data(), bp.grad_b = grads[5].data();
  else bp.grad_u = grads[4].data();
  bp.grad_initial_state = grads.back().data();
  backward(bp, pf);
  return grads;
}
