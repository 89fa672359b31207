// The chunked (matrix) form of the WKV-7 and WKV-6 recurrences on the CPU: arwkv_ext/
// chunked_reference.py is the same algorithm in PyTorch, with the derivation in its docstring;
// this file follows it step for step. Included by wkv_cpu_kernels.h inside its per-ISA
// namespace (so no headers here), after the step kernels whose helpers it reuses.
//
// A chunk of L = kChunk steps becomes a few products of [rows x N] by [N x 2L] matrices (and
// the like), run by register-blocked multiply-add tiles, where the step form reads and writes
// the whole state once per step. The work that does not touch the state (decay products, the
// L x L matrices, the triangular solves) is O(L^2 N) per chunk; at N = 64 it, the packing of the
// inputs and the writing of the gradients take about as long as the products (perf, AVX-512),
// which is why the chunked forward of WKV-7 is not faster than the step one (docs/kernels.md, "The CPU
// kernels"). Every decay factor is a running product over a sub-interval of the chunk (<= 1), never
// a quotient of cumulative decays, so the result is exact for any decay, as the step form is.
//
// Layouts, for one head and the value rows [row0, row0 + rows) of a task ("R" = rows):
//   state S [R][N]: the problem's own [row][key] layout;
//   key-side operands per step [L][N] (r, k, a, b, decay products, their gradients);
//   value-side inputs as packed [L][R] (v, dy), and what the products make of them per value
//   row [R][L] ("V^T": v, y, sa and their gradients), so every product reads its B operand
//   row-major and no state is ever transposed;
//   L x L matrices M[t][s] (row = later step t, column = earlier step s).

// ---- a register-blocked matrix product ---------------------------------------------------------
enum class Into { overwrite, add, scale_cols };

// Rows [0, MR) and vectors [0, NV) of C (op)= A B, with A(m, k) = a[m * a_rs + k * a_cs] (any
// layout: its elements are broadcast one at a time) and B, C row-major. scale_cols: C[., n] is
// first multiplied by scale[n].
template <class A, int MR, int NV>
inline void gemm_tile(int64_t K, const A* a, int64_t a_rs, int64_t a_cs, const A* b, int64_t ldb, A* c,
                      int64_t ldc, Into into, const A* scale) {
  using V = typename VecOf<A>::V;
  constexpr int W = VecOf<A>::W;
  V acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < NV; ++q) {
      if (into == Into::overwrite) {
        acc[m][q] = V{};
      } else {
        acc[m][q] = vload<V>(c + m * ldc + q * W);
        if (into == Into::scale_cols) acc[m][q] *= vload<V>(scale + q * W);
      }
    }
  for (int64_t k = 0; k < K; ++k) {
    V bv[NV];
    for (int q = 0; q < NV; ++q) bv[q] = vload<V>(b + k * ldb + q * W);
    for (int m = 0; m < MR; ++m) {
      const V am = splat<V>(a[m * a_rs + k * a_cs]);
      for (int q = 0; q < NV; ++q) acc[m][q] += am * bv[q];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < NV; ++q) vstore(c + m * ldc + q * W, acc[m][q]);
}

// Columns [q0, q0 + NV vectors) of C, every row: MR-row tiles, then single rows.
template <class A, int MR, int NV>
inline void gemm_columns(int64_t M, int64_t q0, int64_t K, const A* a, int64_t a_rs, int64_t a_cs, const A* b,
                         int64_t ldb, A* c, int64_t ldc, Into into, const A* scale) {
  constexpr int W = VecOf<A>::W;
  const int64_t col = q0 * W;
  const A* sc = scale ? scale + col : nullptr;
  int64_t m = 0;
  for (; m + MR <= M; m += MR)
    gemm_tile<A, MR, NV>(K, a + m * a_rs, a_rs, a_cs, b + col, ldb, c + m * ldc + col, ldc, into, sc);
  for (; m < M; ++m)
    gemm_tile<A, 1, NV>(K, a + m * a_rs, a_rs, a_cs, b + col, ldb, c + m * ldc + col, ldc, into, sc);
}

// C [M x ncols] (op)= A [M x K] B [K x ncols]; ncols a multiple of the vector width. The tiles
// keep MR x NV accumulators in registers: 16 of AVX-512's 32 vector registers, 8 of 16 below,
// and at least 4 rows per B vector loaded, so the multiply-adds outnumber the loads.
template <class A>
void gemm(int64_t M, int64_t ncols, int64_t K, const A* a, int64_t a_rs, int64_t a_cs, const A* b,
          int64_t ldb, A* c, int64_t ldc, Into into, const A* scale = nullptr) {
  constexpr int W = VecOf<A>::W;
  constexpr int kAcc = ARWKV_VEC_BYTES == 64 ? 16 : 8;
  const int64_t nv = ncols / W;
  int64_t q = 0;
  for (; q + 4 <= nv && kAcc >= 16; q += 4)
    gemm_columns<A, kAcc / 4, 4>(M, q, K, a, a_rs, a_cs, b, ldb, c, ldc, into, scale);
  for (; q + 2 <= nv; q += 2) gemm_columns<A, kAcc / 2, 2>(M, q, K, a, a_rs, a_cs, b, ldb, c, ldc, into, scale);
  for (; q < nv; ++q) gemm_columns<A, kAcc, 1>(M, q, K, a, a_rs, a_cs, b, ldb, c, ldc, into, scale);
}

// dst [cols][rows] = src [rows][cols]^T.
template <class A>
inline void transpose(const A* src, int64_t rows, int64_t cols, int64_t lds, A* dst, int64_t ldd) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * ldd + i] = src[i * lds + j];
}

// y += alpha x
template <class A> inline void vaxpy(A alpha, const A* x, A* y, int64_t n) {
  using V = typename VecOf<A>::V;
  constexpr int W = VecOf<A>::W;
  for (int64_t q = 0; q < n; q += W) vstore(y + q, vload<V>(y + q) + alpha * vload<V>(x + q));
}
// z = x * y (element-wise)
template <class A> inline void vmul(const A* x, const A* y, A* z, int64_t n) {
  using V = typename VecOf<A>::V;
  constexpr int W = VecOf<A>::W;
  for (int64_t q = 0; q < n; q += W) vstore(z + q, vload<V>(x + q) * vload<V>(y + q));
}
// y = x, n elements (vector stores: the compiler cannot rule out that x and y overlap)
template <class A> inline void copy_vec(const A* x, A* y, int64_t n) {
  using V = typename VecOf<A>::V;
  constexpr int W = VecOf<A>::W;
  for (int64_t q = 0; q < n; q += W) vstore(y + q, vload<V>(x + q));
}
// z += x * y (element-wise)
template <class A> inline void vfma(const A* x, const A* y, A* z, int64_t n) {
  using V = typename VecOf<A>::V;
  constexpr int W = VecOf<A>::W;
  for (int64_t q = 0; q < n; q += W) vstore(z + q, vload<V>(z + q) + vload<V>(x + q) * vload<V>(y + q));
}

// ---- what one chunk needs that does not depend on the state --------------------------------------
constexpr int64_t kL = kChunk;

// The chunk's inputs padded to L steps: steps past the segment's end are identities (decay 1,
// zero r, k, v, a, b), so a partial chunk runs the same code.
template <class In, class A>
void pack_padded(Chunk<In, A>& ch, const WkvProblem& p, int64_t batch, int64_t h, int64_t t0, int64_t n,
                 int64_t row0, const In* grad_y) {
  ch.pack(p, batch, h, t0, n, row0, grad_y);
  const int64_t N = ch.N, R = ch.rows;
  for (int64_t e = n * N; e < kL * N; ++e) {
    ch.d.p[e] = A(1);
    ch.k.p[e] = ch.r.p[e] = ch.a.p[e] = ch.b.p[e] = A(0);
  }
  for (int64_t e = n * R; e < kL * R; ++e) ch.v.p[e] = ch.gy.p[e] = A(0);
  if (!grad_y)
    for (int64_t e = 0; e < kL * R; ++e) ch.gy.p[e] = A(0);
}

// Decay products and L x L matrices of one chunk (key side only).
template <class A> struct ChunkKeySide {
  int64_t N;
  Scratch<A> to_t, before_t, to_end;  // [L][N]: E[t, -1], E[t-1, -1], E[L-1, s]
  Scratch<A> e;                       // [N]: the running product of the pair loop
  Scratch<A> mats;                    // L x L each: A_ab, A_ak, A_rb, A_rk (WKV-6: its A in A_rk)
  A* ab() { return mats.p; }
  A* ak() { return mats.p + kL * kL; }
  A* rb() { return mats.p + 2 * kL * kL; }
  A* rk() { return mats.p + 3 * kL * kL; }
  explicit ChunkKeySide(int64_t N_)
      : N(N_), to_t(kL * N_), before_t(kL * N_), to_end(kL * N_), e(N_), mats(4 * kL * kL) {}

  void decays(const A* d) {
    for (int64_t j = 0; j < N; ++j) {
      before_t.p[j] = A(1);
      to_t.p[j] = d[j];
      to_end.p[(kL - 1) * N + j] = A(1);
    }
    for (int64_t t = 1; t < kL; ++t) {
      vmul(to_t.p + (t - 1) * N, d + t * N, to_t.p + t * N, N);
      for (int64_t j = 0; j < N; ++j) before_t.p[t * N + j] = to_t.p[(t - 1) * N + j];
    }
    for (int64_t s = kL - 2; s >= 0; --s) vmul(to_end.p + (s + 1) * N, d + (s + 1) * N, to_end.p + s * N, N);
  }

  // For every pair s <= t, with e = E[t, s] = d_{s+1} ... d_t over the key channels, calls
  // visit(t, s, e). A row of a (WKV-7) or of r (WKV-6) at step t + 1 sees the same e.
  template <class F> void pairs(const A* d, F&& visit) {
    for (int64_t s = 0; s < kL; ++s) {
      for (int64_t j = 0; j < N; ++j) e.p[j] = A(1);
      for (int64_t t = s; t < kL; ++t) {
        if (t > s) vmul(e.p, d + t * N, e.p, N);
        visit(t, s, static_cast<const A*>(e.p));
      }
    }
  }

  // WKV-7: A_ab, A_ak (s < t) and, with outputs, A_rb, A_rk (s <= t) from the chunk's inputs.
  void matrices7(const A* d, const A* r, const A* k, const A* a, const A* b, bool outputs) {
    for (int64_t q = 0; q < 4 * kL * kL; ++q) mats.p[q] = A(0);
    using V = typename VecOf<A>::V;
    constexpr int W = VecOf<A>::W;
    pairs(d, [&](int64_t t, int64_t s, const A* ev) {
      const bool next = t + 1 < kL;
      if (!outputs && !next) return;
      V rb = V{}, rk = V{}, ab = V{}, ak = V{};
      const A *bs = b + s * N, *ks = k + s * N, *rt = r + t * N, *an = a + (t + 1) * N;
      for (int64_t q = 0; q < N; q += W) {
        const V ej = vload<V>(ev + q);
        const V xb = vload<V>(bs + q) * ej, xk = vload<V>(ks + q) * ej;
        if (outputs) {
          const V rq = vload<V>(rt + q);
          rb += rq * xb;
          rk += rq * xk;
        }
        if (next) {
          const V aq = vload<V>(an + q);
          ab += aq * xb;
          ak += aq * xk;
        }
      }
      if (outputs) {
        rb_at(t, s) = hsum(rb);
        rk_at(t, s) = hsum(rk);
      }
      if (next) {
        ab_at(t + 1, s) = hsum(ab);
        ak_at(t + 1, s) = hsum(ak);
      }
    });
  }
  // WKV-6: A[t, s] = sum_j r_t k_s E[t-1, s] (s < t), bonus r_t . (u k_t) on the diagonal.
  void matrices6(const A* d, const A* r, const A* k, const A* u) {
    for (int64_t q = 0; q < 4 * kL * kL; ++q) mats.p[q] = A(0);
    pairs(d, [&](int64_t t, int64_t s, const A* ev) {
      if (t + 1 >= kL) return;
      using V = typename VecOf<A>::V;
      constexpr int W = VecOf<A>::W;
      V acc = V{};
      const A *ks = k + s * N, *rn = r + (t + 1) * N;
      for (int64_t q = 0; q < N; q += W) acc += vload<V>(rn + q) * vload<V>(ks + q) * vload<V>(ev + q);
      rk_at(t + 1, s) = hsum(acc);
    });
    for (int64_t t = 0; t < kL; ++t) {
      A bonus = 0;
      for (int64_t j = 0; j < N; ++j) bonus += r[t * N + j] * u[j] * k[t * N + j];
      rk_at(t, t) = bonus;
    }
  }
  A& ab_at(int64_t t, int64_t s) { return ab()[t * kL + s]; }
  A& ak_at(int64_t t, int64_t s) { return ak()[t * kL + s]; }
  A& rb_at(int64_t t, int64_t s) { return rb()[t * kL + s]; }
  A& rk_at(int64_t t, int64_t s) { return rk()[t * kL + s]; }
};

// X [L][n] = (I - A_ab)^{-1} X, in place (unit lower-triangular: forward substitution).
template <class A> inline void solve_lower(const A* ab, A* x, int64_t ldx, int64_t n) {
  for (int64_t t = 1; t < kL; ++t)
    for (int64_t s = 0; s < t; ++s)
      if (ab[t * kL + s] != A(0)) vaxpy(ab[t * kL + s], x + s * ldx, x + t * ldx, n);
}

// The state-independent operands of one chunk, laid out as the products below take them
// (the "T" ones transposed, [N][.]), from ChunkKeySide. WKV-7:
//   RWT = [R^ | W]^T  with W = (I - A_ab)^{-1} a~ and R^ = r~ + A_rb W, so that
//                     [Y | SA] = S [R^ | W]^T + V^T [Q | P]^T, P = (I - A_ab)^{-1} A_ak, Q = A_rb P + A_rk
//   QPT = [Q^T | P^T] [L][2L];  BK = [b^; k^] [2L][N] and BKT = BK^T;  RA = [r~; a~] [2L][N];
//   Minv = (I - A_ab)^{-1} [L][L] (the backward's transposed solve as a product).
// WKV-6 uses the first halves for r' (RWT, RA) and A (QPT), and the second halves for k^ (BK, BKT).
template <class A> struct ChunkOperands {
  int64_t N;
  Scratch<A> RWT, QPT, BK, BKT, RA, Minv, gamma, tmp;
  explicit ChunkOperands(int64_t N_)
      : N(N_), RWT(2 * kL * N_), QPT(2 * kL * kL), BK(2 * kL * N_), BKT(2 * kL * N_), RA(2 * kL * N_),
        Minv(kL * kL), gamma(N_), tmp(2 * kL * N_) {}

  // What a pass needs. state (the backward's first pass, which only carries the state on): W,
  // P, b^, k^ and gamma; forward: also R^ and Q; backward: also A_rb, A_rk, Minv, BK^T, RA.
  enum class Use { state, forward, backward };
  void build7(ChunkKeySide<A>& ks, const A* d, const A* r, const A* k, const A* a, const A* b, Use use) {
    const bool outputs = use != Use::state;
    ks.decays(d);
    ks.matrices7(d, r, k, a, b, outputs);
    for (int64_t j = 0; j < N; ++j) gamma.p[j] = ks.to_t.p[(kL - 1) * N + j];
    A *Rh = tmp.p, *W = tmp.p + kL * N, *rt = RA.p, *at = RA.p + kL * N;
    vmul(a, ks.before_t.p, at, kL * N);  // a~
    for (int64_t e = 0; e < kL * N; ++e) W[e] = at[e];
    solve_lower(ks.ab(), W, N, N);
    if (outputs) vmul(r, ks.to_t.p, rt, kL * N);  // r~
    if (use == Use::forward) {
      for (int64_t e = 0; e < kL * N; ++e) Rh[e] = rt[e];
      for (int64_t t = 0; t < kL; ++t)
        for (int64_t s = 0; s <= t; ++s)
          if (ks.rb_at(t, s) != A(0)) vaxpy(ks.rb_at(t, s), W + s * N, Rh + t * N, N);
      transpose(tmp.p, 2 * kL, N, N, RWT.p, 2 * kL);
    } else {
      transpose(W, kL, N, N, RWT.p + kL, 2 * kL);
    }
    // P = (I - A_ab)^{-1} A_ak, Q = A_rk + A_rb P, Minv = (I - A_ab)^{-1}: rows of L
    A *P = tmp.p, *Q = tmp.p + kL * kL;
    for (int64_t e = 0; e < kL * kL; ++e) P[e] = ks.ak()[e];
    solve_lower(ks.ab(), P, kL, kL);
    transpose(P, kL, kL, kL, QPT.p + kL, 2 * kL);
    vmul(b, ks.to_end.p, BK.p, kL * N);
    vmul(k, ks.to_end.p, BK.p + kL * N, kL * N);
    if (use == Use::forward) {
      for (int64_t e = 0; e < kL * kL; ++e) Q[e] = ks.rk()[e];
      for (int64_t t = 0; t < kL; ++t)
        for (int64_t s = 0; s <= t; ++s)
          if (ks.rb_at(t, s) != A(0)) vaxpy(ks.rb_at(t, s), P + s * kL, Q + t * kL, kL);
      transpose(Q, kL, kL, kL, QPT.p, 2 * kL);
    } else if (use == Use::backward) {
      for (int64_t e = 0; e < kL * kL; ++e) Minv.p[e] = e % (kL + 1) == 0 ? A(1) : A(0);
      solve_lower(ks.ab(), Minv.p, kL, kL);
      transpose(BK.p, 2 * kL, N, N, BKT.p, 2 * kL);
    }
  }

  void build6(ChunkKeySide<A>& ks, const A* d, const A* r, const A* k, const A* u) {
    ks.decays(d);
    ks.matrices6(d, r, k, u);
    for (int64_t j = 0; j < N; ++j) gamma.p[j] = ks.to_t.p[(kL - 1) * N + j];
    vmul(r, ks.before_t.p, RA.p, kL * N);  // r'
    transpose(RA.p, kL, N, N, RWT.p, 2 * kL);
    transpose(ks.rk(), kL, kL, kL, QPT.p, 2 * kL);  // A^T
    vmul(k, ks.to_end.p, BK.p + kL * N, kL * N);    // k^
    transpose(BK.p + kL * N, kL, N, N, BKT.p + kL, 2 * kL);
  }
};

// ---- forward ---------------------------------------------------------------------------------
// One segment, one head, value rows [row0, row0 + R), by chunks; the state S [R][N] keeps the
// problem's own [row][key] layout. Writes y (if y_out), the final state (if final_out) and, if
// snapshots, the state entering every chunk as [chunk][R][N].
template <class In, class A>
void forward_rows_chunked(const WkvProblem& p, int64_t seg, int64_t h, int64_t row0, int64_t R, In* y_out,
                          A* final_out, A* snapshots) {
  const int64_t N = p.N, H = p.H;
  const bool v7 = p.version == 7;
  const Segment sg = segment(p, seg);
  const int64_t state_base = (seg * H + h) * N * N + row0 * N;
  Scratch<A> S(R * N);
  const A* s_init = static_cast<const A*>(p.initial_state);
  for (int64_t e = 0; e < R * N; ++e) S.p[e] = s_init ? s_init[state_base + e] : A(0);

  Chunk<In, A> ch(N, R);
  ChunkKeySide<A> ks(N);
  ChunkOperands<A> ops(N);
  Scratch<A> u(N), yrow(R);
  if (!v7) load_row(static_cast<const In*>(p.u) + h * N, u.p, N);
  constexpr int64_t ld = 3 * kL;
  Scratch<A> X(R * ld);  // per value row: [y | sa | v] of the chunk's steps (WKV-6: [y | - | v])
  A *YT = X.p, *SAT = X.p + kL, *VT = X.p + 2 * kL;

  for (int64_t t0 = sg.t_begin, c = 0; t0 < sg.t_end; t0 += kL, ++c) {
    const int64_t n = sg.t_end - t0 < kL ? sg.t_end - t0 : kL;
    pack_padded(ch, p, sg.batch, h, t0, n, row0, static_cast<const In*>(nullptr));
    if (t0 + n < sg.t_end)
      ch.prefetch(p, sg.batch, h, t0 + n, sg.t_end - t0 - n < kL ? sg.t_end - t0 - n : kL, row0, nullptr);
    if (snapshots)
      for (int64_t e = 0; e < R * N; ++e) snapshots[c * R * N + e] = S.p[e];
    transpose(ch.v.p, kL, R, R, VT, ld);
    if (v7) {
      ops.build7(ks, ch.d.p, ch.r.p, ch.k.p, ch.a.p, ch.b.p,
                 y_out ? ChunkOperands<A>::Use::forward : ChunkOperands<A>::Use::state);
      // [Y | SA] = S [R^ | W]^T + V^T [Q | P]^T, then S = S diag(gamma) + [SA | V^T] [b^; k^]
      // (without y_out, as in the backward's first pass, only SA)
      const int64_t y_cols = y_out ? 0 : kL;
      gemm<A>(R, 2 * kL - y_cols, N, S.p, N, 1, ops.RWT.p + y_cols, 2 * kL, YT + y_cols, ld, Into::overwrite);
      gemm<A>(R, 2 * kL - y_cols, kL, VT, ld, 1, ops.QPT.p + y_cols, 2 * kL, YT + y_cols, ld, Into::add);
      gemm<A>(R, N, 2 * kL, SAT, ld, 1, ops.BK.p, N, S.p, N, Into::scale_cols, ops.gamma.p);
    } else {
      ops.build6(ks, ch.d.p, ch.r.p, ch.k.p, u.p);
      // Y = S r'^T + V^T A^T (the state before the update), then S = S diag(gamma) + V^T k^
      gemm<A>(R, kL, N, S.p, N, 1, ops.RWT.p, 2 * kL, YT, ld, Into::overwrite);
      gemm<A>(R, kL, kL, VT, ld, 1, ops.QPT.p, 2 * kL, YT, ld, Into::add);
      gemm<A>(R, N, kL, VT, ld, 1, ops.BK.p + kL * N, N, S.p, N, Into::scale_cols, ops.gamma.p);
    }
    if (y_out)
      for (int64_t t = 0; t < n; ++t) {
        for (int64_t i = 0; i < R; ++i) yrow.p[i] = YT[i * ld + t];
        store_row(yrow.p, y_out + offset(p, sg.batch, t0 + t, h) + row0, R);
      }
  }
  if (final_out)
    for (int64_t e = 0; e < R * N; ++e) final_out[state_base + e] = S.p[e];
}

// ---- backward --------------------------------------------------------------------------------
// The gradients of one chunk that live on the key side, from the L x L matrices' gradients dM
// (the same layout as ChunkKeySide::mats) and the decayed operands' gradients, into the raw
// inputs' gradients gr, ga, gb, gk and gw [L][N] (WKV-6: only gr, gk, gw; bonus terms excluded).
template <class A>
void key_side_backward(int64_t N, bool v7, ChunkKeySide<A>& ks, const A* d, const A* r, const A* k, const A* a,
                       const A* b, const A* dM, const A* dr_dec, const A* da_dec, const A* db_dec,
                       const A* dk_dec, const A* dgamma, A* gr, A* ga, A* gb, A* gk, A* gw, A* scratch) {
  using V = typename VecOf<A>::V;
  constexpr int W = VecOf<A>::W;
  const A *dab = dM, *dak = dM + kL * kL, *drb = dM + 2 * kL * kL, *drk = dM + 3 * kL * kL;
  // the decayed operands back to their raw inputs: r~ = r E[t,-1], a~ = a E[t-1,-1] (WKV-6's r'
  // too), b^ = b E[L-1,s], k^ = k E[L-1,s]; gb, gk hold only these "to the chunk end" parts now
  if (v7) {
    vmul(dr_dec, ks.to_t.p, gr, kL * N);
    vmul(da_dec, ks.before_t.p, ga, kL * N);
    vmul(db_dec, ks.to_end.p, gb, kL * N);
  } else {
    vmul(dr_dec, ks.before_t.p, gr, kL * N);
  }
  vmul(dk_dec, ks.to_end.p, gk, kL * N);
  // dG_{L-1} gets the decay-to-the-end parts: dgamma gamma + sum_s (gk_s k_s + gb_s b_s)
  A* dG = scratch;  // [L][N]
  for (int64_t e = 0; e < kL * N; ++e) dG[e] = A(0);
  A* last = dG + (kL - 1) * N;
  for (int64_t j = 0; j < N; ++j) last[j] = dgamma[j] * ks.to_t.p[(kL - 1) * N + j];
  for (int64_t s = 0; s < kL; ++s)
    for (int64_t q = 0; q < N; q += W) {
      V x = vload<V>(gk + s * N + q) * vload<V>(k + s * N + q);
      if (v7) x += vload<V>(gb + s * N + q) * vload<V>(b + s * N + q);
      vstore(last + q, vload<V>(last + q) + x);
    }
  // the L x L matrices back to their operands, pair by pair with e = E[t, s]
  ks.pairs(d, [&](int64_t t, int64_t s, const A* ev) {
    const bool next = t + 1 < kL;
    if (v7) {
      const A rb = drb[t * kL + s], rk = drk[t * kL + s];
      const A ab = next ? dab[(t + 1) * kL + s] : A(0), ak = next ? dak[(t + 1) * kL + s] : A(0);
      for (int64_t q = 0; q < N; q += W) {
        const V ej = vload<V>(ev + q);
        const V xb = vload<V>(b + s * N + q) * ej, xk = vload<V>(k + s * N + q) * ej;
        const V xr = vload<V>(r + t * N + q) * ej;
        vstore(gr + t * N + q, vload<V>(gr + t * N + q) + rb * xb + rk * xk);
        V gbs = vload<V>(gb + s * N + q) + rb * xr, gks = vload<V>(gk + s * N + q) + rk * xr;
        if (next) {
          const V xa = vload<V>(a + (t + 1) * N + q) * ej;
          vstore(ga + (t + 1) * N + q, vload<V>(ga + (t + 1) * N + q) + ab * xb + ak * xk);
          gbs += ab * xa;
          gks += ak * xa;
        }
        vstore(gb + s * N + q, gbs);
        vstore(gk + s * N + q, gks);
      }
    } else if (next) {  // WKV-6: A[t+1, s] with e = E[t, s]
      const A m = drk[(t + 1) * kL + s];
      for (int64_t q = 0; q < N; q += W) {
        const V ej = vload<V>(ev + q);
        vstore(gr + (t + 1) * N + q, vload<V>(gr + (t + 1) * N + q) + m * vload<V>(k + s * N + q) * ej);
        vstore(gk + s * N + q, vload<V>(gk + s * N + q) + m * vload<V>(r + (t + 1) * N + q) * ej);
      }
    }
  });
  // dG_t += gr_t r_t - gk_t k_t - gb_t b_t + ga_{t+1} a_{t+1}  (WKV-6: gr_{t+1} r_{t+1} - gk_t k_t)
  for (int64_t t = 0; t < kL; ++t)
    for (int64_t q = 0; q < N; q += W) {
      const int64_t o = t * N + q;
      V x = vload<V>(dG + o) - vload<V>(gk + o) * vload<V>(k + o);
      if (v7) {
        x += vload<V>(gr + o) * vload<V>(r + o) - vload<V>(gb + o) * vload<V>(b + o);
        if (t + 1 < kL) x += vload<V>(ga + o + N) * vload<V>(a + o + N);
      } else if (t + 1 < kL) {
        x += vload<V>(gr + o + N) * vload<V>(r + o + N);
      }
      vstore(dG + o, x);
    }
  // dw_u = sum over t >= u of dG_t
  for (int64_t j = 0; j < N; ++j) gw[(kL - 1) * N + j] = dG[(kL - 1) * N + j];
  for (int64_t t = kL - 2; t >= 0; --t)
    for (int64_t q = 0; q < N; q += W)
      vstore(gw + t * N + q, vload<V>(gw + (t + 1) * N + q) + vload<V>(dG + t * N + q));
}

template <class In, class A>
void backward_rows_chunked(const WkvBackwardProblem& p, const Partials<A>& io, int64_t seg, int64_t h,
                           int64_t split, int64_t R) {
  const int64_t N = p.N, H = p.H, row0 = split * R;
  const bool v7 = p.version == 7;
  const Segment sg = segment(p, seg);
  const int64_t len = sg.t_end - sg.t_begin;
  const int64_t chunks = (len + kL - 1) / kL;
  const int64_t plane = p.B * p.T * p.H * p.N;
  A* gcol[5] = {};  // this split's partial column gradients: r, w, k, a, b
  for (int q = 0; q < (v7 ? 5 : 3); ++q) gcol[q] = io.columns[q] + split * plane;

  Scratch<A> snaps(chunks * R * N);
  forward_rows_chunked<In, A>(p, seg, h, row0, R, nullptr, nullptr, snaps.p);

  const int64_t state_base = (seg * H + h) * N * N + row0 * N;
  Scratch<A> dS(R * N);  // d loss / d (the state leaving the chunk), [R][N]
  const A* gs = static_cast<const A*>(p.grad_state);
  for (int64_t e = 0; e < R * N; ++e) dS.p[e] = gs ? gs[state_base + e] : A(0);

  Chunk<In, A> ch(N, R);
  ChunkKeySide<A> ks(N);
  ChunkOperands<A> ops(N);
  Scratch<A> u(N), du(N);
  for (int64_t j = 0; j < N; ++j) du.p[j] = A(0);
  if (!v7) load_row(static_cast<const In*>(p.u) + h * N, u.p, N);
  constexpr int64_t ld = 2 * kL;
  Scratch<A> SV(R * ld);   // per value row: [sa | v] of the chunk's steps
  Scratch<A> DSV(R * ld);  // per value row: [d sa | d v]
  Scratch<A> DZ(R * kL);   // per value row: d z = the gradient through the triangular solve
  Scratch<A> dec(4 * kL * N);  // d r~, d a~, d b^, d k^ (WKV-6: d r', -, -, d k^), [L][N] each
  Scratch<A> G2(2 * kL * ld), dM(4 * kL * kL), dgamma(N);
  Scratch<A> grads(5 * kL * N), dG(kL * N);  // gr, gw, gk, ga, gb [L][N]
  A *SAT = SV.p, *VT = SV.p + kL, *dSAT = DSV.p, *dVT = DSV.p + kL;
  A *dr_dec = dec.p, *da_dec = dec.p + kL * N, *db_dec = dec.p + 2 * kL * N, *dk_dec = dec.p + 3 * kL * N;
  const In* gy_in = static_cast<const In*>(p.grad_y);

  for (int64_t c = chunks - 1; c >= 0; --c) {
    const int64_t t0 = sg.t_begin + c * kL;
    const int64_t n = sg.t_end - t0 < kL ? sg.t_end - t0 : kL;
    pack_padded(ch, p, sg.batch, h, t0, n, row0, gy_in);
    if (c > 0) ch.prefetch(p, sg.batch, h, t0 - kL, kL, row0, gy_in);
    const A* S = snaps.p + c * R * N;
    const A *dY = ch.gy.p, *Vr = ch.v.p;  // [L][R]: as A operands, read row- or column-wise
    transpose(Vr, kL, R, R, VT, ld);
    if (v7) {
      ops.build7(ks, ch.d.p, ch.r.p, ch.k.p, ch.a.p, ch.b.p, ChunkOperands<A>::Use::backward);
      // SA = S W^T + V^T P^T
      gemm<A>(R, kL, N, S, N, 1, ops.RWT.p + kL, 2 * kL, SAT, ld, Into::overwrite);
      gemm<A>(R, kL, kL, VT, ld, 1, ops.QPT.p + kL, 2 * kL, SAT, ld, Into::add);
      // [d SA | dV] = dS [b^; k^]^T + dY^T [A_rb | A_rk]; dZ = d SA (I - A_ab)^{-1}; dV += dZ A_ak
      gemm<A>(R, 2 * kL, N, dS.p, N, 1, ops.BKT.p, 2 * kL, dSAT, ld, Into::overwrite);
      gemm<A>(R, kL, kL, dY, 1, R, ks.rb(), kL, dSAT, ld, Into::add);
      gemm<A>(R, kL, kL, dY, 1, R, ks.rk(), kL, dVT, ld, Into::add);
      gemm<A>(R, kL, kL, dSAT, ld, 1, ops.Minv.p, kL, DZ.p, kL, Into::overwrite);
      gemm<A>(R, kL, kL, DZ.p, kL, 1, ks.ak(), kL, dVT, ld, Into::add);
      // key side, summed over this task's rows: d r~ = dY S, d a~ = dZ^T S, d b^ = SA^T dS, d k^ = V dS
      gemm<A>(kL, N, R, dY, R, 1, S, N, dr_dec, N, Into::overwrite);
      gemm<A>(kL, N, R, DZ.p, 1, kL, S, N, da_dec, N, Into::overwrite);
      gemm<A>(kL, N, R, SAT, 1, ld, dS.p, N, db_dec, N, Into::overwrite);
      gemm<A>(kL, N, R, Vr, R, 1, dS.p, N, dk_dec, N, Into::overwrite);
      // the L x L matrices: [dA_rb | dA_rk] = dY [SA | V]^T, [dA_ab | dA_ak] = dZ^T [SA | V]^T
      gemm<A>(kL, ld, R, dY, R, 1, SV.p, ld, G2.p, ld, Into::overwrite);
      gemm<A>(kL, ld, R, DZ.p, 1, kL, SV.p, ld, G2.p + kL * ld, ld, Into::overwrite);
    } else {
      ops.build6(ks, ch.d.p, ch.r.p, ch.k.p, u.p);
      // dV = dS k^T + dY^T A;  d r' = dY S, d k^ = V dS;  dA = dY V^T
      gemm<A>(R, kL, N, dS.p, N, 1, ops.BKT.p + kL, 2 * kL, dVT, ld, Into::overwrite);
      gemm<A>(R, kL, kL, dY, 1, R, ks.rk(), kL, dVT, ld, Into::add);
      gemm<A>(kL, N, R, dY, R, 1, S, N, dr_dec, N, Into::overwrite);
      gemm<A>(kL, N, R, Vr, R, 1, dS.p, N, dk_dec, N, Into::overwrite);
      gemm<A>(kL, kL, R, dY, R, 1, VT, ld, G2.p, ld, Into::overwrite);
    }
    for (int64_t j = 0; j < N; ++j) dgamma.p[j] = A(0);
    for (int64_t i = 0; i < R; ++i) vfma(S + i * N, dS.p + i * N, dgamma.p, N);
    for (int64_t q = 0; q < 4 * kL * kL; ++q) dM.p[q] = A(0);
    for (int64_t t = 0; t < kL; ++t)
      for (int64_t s = 0; s <= t; ++s) {
        if (v7) {
          dM.p[2 * kL * kL + t * kL + s] = G2.p[t * ld + s];       // rb
          dM.p[3 * kL * kL + t * kL + s] = G2.p[t * ld + kL + s];  // rk
          if (s < t) {
            dM.p[t * kL + s] = G2.p[(kL + t) * ld + s];                  // ab
            dM.p[kL * kL + t * kL + s] = G2.p[(kL + t) * ld + kL + s];   // ak
          }
        } else {
          dM.p[3 * kL * kL + t * kL + s] = G2.p[t * ld + s];
        }
      }
    // dS entering the chunk = dS diag(gamma) + dY^T r~ + dZ a~   (WKV-6: dY^T r')
    gemm<A>(R, N, kL, dY, 1, R, ops.RA.p, N, dS.p, N, Into::scale_cols, ops.gamma.p);
    if (v7) gemm<A>(R, N, kL, DZ.p, kL, 1, ops.RA.p + kL * N, N, dS.p, N, Into::add);

    A *gr = grads.p, *gw = grads.p + kL * N, *gk = grads.p + 2 * kL * N, *ga = grads.p + 3 * kL * N,
      *gb = grads.p + 4 * kL * N;
    key_side_backward<A>(N, v7, ks, ch.d.p, ch.r.p, ch.k.p, ch.a.p, ch.b.p, dM.p, dr_dec, da_dec, db_dec, dk_dec,
                         dgamma.p, gr, ga, gb, gk, gw, dG.p);
    if (!v7)  // the bonus y_t += v_t (r_t . u k_t): dA[t, t] reaches r, k and u, no decay
      for (int64_t t = 0; t < n; ++t) {
        const A m = dM.p[3 * kL * kL + t * kL + t];
        for (int64_t j = 0; j < N; ++j) {
          const A rj = ch.r.p[t * N + j], kj = ch.k.p[t * N + j];
          gr[t * N + j] += m * u.p[j] * kj;
          gk[t * N + j] += m * u.p[j] * rj;
          du.p[j] += m * rj * kj;
        }
      }
    const A* per_step[5] = {gr, gw, gk, ga, gb};
    for (int64_t t = 0; t < n; ++t) {
      const int64_t o = offset(p, sg.batch, t0 + t, h);
      for (int q = 0; q < (v7 ? 5 : 3); ++q) copy_vec(per_step[q] + t * N, gcol[q] + o, N);
      for (int64_t i = 0; i < R; ++i) io.v[o + row0 + i] = dVT[i * ld + t];
    }
  }
  A* g0 = io.initial_state + state_base;
  for (int64_t e = 0; e < R * N; ++e) g0[e] = dS.p[e];
  if (!v7) {
    A* gu = io.u + ((split * p.num_seqs + seg) * H + h) * N;
    for (int64_t j = 0; j < N; ++j) gu[j] = du.p[j];
  }
}
