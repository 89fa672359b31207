// C++ test of the CPU kernels without torch: forward against a naive double-precision loop,
// backward against central differences of that loop (a random directional derivative), for
// every instruction set this CPU runs, with and without packed sequences and row splits.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "cpu/wkv_cpu.h"

using namespace arwkv::cpu;
using Vec = std::vector<double>;

namespace {

void serial(void*, int64_t n, void* ctx, TaskFn fn) {
  for (int64_t i = 0; i < n; ++i) fn(ctx, i, i + 1);  // one task at a time, like many threads
}
const ParallelFor kSerial{nullptr, &serial};

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
void naive(const Problem& p, Vec& y, Vec& state) {
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

Problem make_problem(int version, int64_t B, int64_t T, int64_t H, int64_t N, std::vector<int64_t> cu,
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

template <class T>
WkvArgs args_for(const Problem& p, const std::vector<std::vector<T>>& in, const std::vector<T>& s0,
                 int threads) {
  WkvArgs a;
  a.version = p.version;
  a.dtype = sizeof(T) == 8 ? DType::f64 : DType::f32;
  a.B = p.B, a.T = p.T, a.H = p.H, a.N = p.N;
  a.cu_seqlens = p.cu.empty() ? nullptr : p.cu.data();
  a.num_seqs = p.S();
  a.r = in[0].data(), a.w = in[1].data(), a.k = in[2].data(), a.v = in[3].data();
  if (p.version == 7) a.a = in[4].data(), a.b = in[5].data();
  else a.u = in[4].data();
  a.initial_state = s0.data();
  a.num_threads = threads;
  return a;
}

double rel(const std::vector<double>& x, const Vec& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size(); ++i) num += (x[i] - ref[i]) * (x[i] - ref[i]), den += ref[i] * ref[i];
  return std::sqrt(num / (den > 0 ? den : 1));
}

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
  forward(args_for(p, in32, s32, threads), {y32.data(), f32.data()}, kSerial);
  expect(rel(cast<double>(Vec(y32.begin(), y32.end())), y_ref) < 1e-5, name + " float32 y");
  expect(rel(cast<double>(Vec(f32.begin(), f32.end())), s_ref) < 1e-5, name + " float32 state");

  // float64 forward and backward.
  std::vector<std::vector<double>> in64;
  for (size_t i = 0; i < n_in; ++i) in64.push_back(*xs[i]);
  Vec y64(y_ref.size()), f64(s_ref.size());
  const WkvArgs a64 = args_for(p, in64, p.s0, threads);
  forward(a64, {y64.data(), f64.data()}, kSerial);
  expect(rel(y64, y_ref) < 1e-12 && rel(f64, s_ref) < 1e-12, name + " float64 forward");

  std::mt19937 gen(7);
  std::normal_distribution<double> normal;
  Vec gy(y_ref.size()), gs(s_ref.size());
  for (auto& e : gy) e = normal(gen);
  for (auto& e : gs) e = normal(gen);
  const int64_t splits = row_splits(a64), plane = p.B * p.T * p.H * p.N;
  std::vector<Vec> cols(p.version == 7 ? 5 : 3, Vec(splits * plane));
  Vec gv(plane), g0(s_ref.size()), gu(splits * p.S() * p.H * p.N);
  WkvBackwardIO io;
  io.grad_y = gy.data(), io.grad_state = gs.data();
  for (size_t q = 0; q < cols.size(); ++q) io.grad_columns[q] = cols[q].data();
  io.grad_v = gv.data(), io.grad_initial_state = g0.data(), io.grad_u = gu.data();
  backward(a64, io, kSerial);
  // Gradients in the order of p.inputs(): r, w, k, v, (a, b | u), initial_state.
  std::vector<Vec> grads;
  for (size_t q = 0; q < 3; ++q) {
    Vec g(plane, 0.0);
    for (int64_t s = 0; s < splits; ++s)
      for (int64_t i = 0; i < plane; ++i) g[i] += cols[q][s * plane + i];
    grads.push_back(g);
  }
  grads.push_back(gv);
  if (p.version == 7) {
    for (size_t q = 3; q < 5; ++q) {
      Vec g(plane, 0.0);
      for (int64_t s = 0; s < splits; ++s)
        for (int64_t i = 0; i < plane; ++i) g[i] += cols[q][s * plane + i];
      grads.push_back(g);
    }
  } else {
    Vec g(p.H * p.N, 0.0);
    for (size_t i = 0; i < gu.size(); ++i) g[i % g.size()] += gu[i];
    grads.push_back(g);
  }
  grads.push_back(g0);

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
    for (int version : {7, 6})
      for (int64_t N : {16, 32, 64, 128}) {
        const std::string tag = std::string(isa_name(isa)) + " wkv" + std::to_string(version) + " N=" +
                                std::to_string(N);
        check(make_problem(version, 2, 19, 2, N, {}, 1), 1, tag + " batch");
        check(make_problem(version, 1, 23, 1, N, {0, 5, 6, 23}, 2), 8, tag + " packed+splits");
        check(make_problem(version, 3, 3, 2, N, {}, 3), 2, tag + " short");  // the decoding path
        checks += 3;
      }
  }
  std::printf("%d passed, %d failed\n", checks - failures, failures);
  return failures ? 1 : 0;
}
