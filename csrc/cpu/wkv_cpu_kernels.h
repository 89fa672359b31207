// The CPU WKV-7 / WKV-6 kernels, written once with GCC/Clang vector extensions.
//
// Each csrc/cpu/wkv_cpu_<isa>.cpp defines ARWKV_ISA (a namespace name) and ARWKV_VEC_BYTES,
// switches the compiler's target (AVX-512, AVX2+FMA, or the x86-64 baseline) and includes
// this file, so the same source becomes three instruction sets chosen at run time.
// Everything here lives in that per-ISA namespace and uses no standard-library templates,
// so no code compiled for a wider ISA can leak into the others through the linker
// (std::index_sequence below is a compile-time type only).
//
// Forward ("lanes = rows"): the state of one head is kept transposed as a tile St[j][i]
// (j = key column, i = value row) so that one vector holds W value rows. A step then needs
// no horizontal sums:   sa += St[j] a[j];  St[j] = St[j] d[j] + sa b[j] + v k[j];  y += St[j] r[j]
// and the pass that updates step t also accumulates sa for step t+1.
//
// Backward ("lanes = keys"): the reverse recurrence, with the state recomputed chunk by chunk
// (L steps) from snapshots taken by a forward pass: it never divides by the decay, so it is
// stable for any decay in (0, 1]. Per step: phase A walks value rows (dv, d(sa) need row dot
// products), phase B walks key columns and accumulates dr, dw, dk, da, db over rows.

#ifndef ARWKV_ISA
#error "define ARWKV_ISA and ARWKV_VEC_BYTES before including wkv_cpu_kernels.h"
#endif

namespace arwkv::cpu::ARWKV_ISA {
namespace {

constexpr int kChunk = 16;     // steps per packed input chunk and per state snapshot
constexpr int kRowBlock = 16;  // value rows per backward block (divides every row split)

typedef float fvec __attribute__((vector_size(ARWKV_VEC_BYTES)));
typedef double dvec __attribute__((vector_size(ARWKV_VEC_BYTES)));
typedef int32_t ivec32 __attribute__((vector_size(ARWKV_VEC_BYTES)));
typedef int64_t ivec64 __attribute__((vector_size(ARWKV_VEC_BYTES)));

template <class A> struct VecOf;
template <> struct VecOf<float> {
  using V = fvec;
  using I = ivec32;
  static constexpr int W = ARWKV_VEC_BYTES / 4;
};
template <> struct VecOf<double> {
  using V = dvec;
  using I = ivec64;
  static constexpr int W = ARWKV_VEC_BYTES / 8;
};

template <class V> inline V vload(const void* p) {
  V x;
  __builtin_memcpy(&x, p, sizeof(V));
  return x;
}
template <class V> inline void vstore(void* p, V x) { __builtin_memcpy(p, &x, sizeof(V)); }
// Broadcast as a braced list {x, x, ..., x}: compiles to one vbroadcastss/sd, where
// `V{} + x` costs a real addition (0 + x is not x for x = -0) and an element loop may not
// be recognised.
template <class V, class A, size_t... I> inline V splat_list(A x, std::index_sequence<I...>) {
  return V{((void)I, x)...};
}
template <class V, class A> inline V splat(A x) {
  return splat_list<V>(x, std::make_index_sequence<sizeof(V) / sizeof(A)>());
}

// Horizontal sums by halving; one overload per vector width.
typedef float f2 __attribute__((vector_size(8)));
typedef float f4 __attribute__((vector_size(16)));
typedef float f8 __attribute__((vector_size(32)));
typedef float f16 __attribute__((vector_size(64)));
typedef double d2 __attribute__((vector_size(16)));
typedef double d4 __attribute__((vector_size(32)));
typedef double d8 __attribute__((vector_size(64)));
inline float hsum(f2 x) { return x[0] + x[1]; }
inline float hsum(f4 x) { return hsum(__builtin_shufflevector(x, x, 0, 1) + __builtin_shufflevector(x, x, 2, 3)); }
inline float hsum(f8 x) {
  return hsum(__builtin_shufflevector(x, x, 0, 1, 2, 3) + __builtin_shufflevector(x, x, 4, 5, 6, 7));
}
inline float hsum(f16 x) {
  return hsum(__builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
              __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15));
}
inline double hsum(d2 x) { return x[0] + x[1]; }
inline double hsum(d4 x) { return hsum(__builtin_shufflevector(x, x, 0, 1) + __builtin_shufflevector(x, x, 2, 3)); }
inline double hsum(d8 x) {
  return hsum(__builtin_shufflevector(x, x, 0, 1, 2, 3) + __builtin_shufflevector(x, x, 4, 5, 6, 7));
}

// exp for w <= 0 (and beyond, clamped to the finite range): Cody-Waite reduction and a
// Taylor polynomial on |r| <= ln2/2, accurate to about 1 ulp; no libm call, so it vectorises.
template <class A> struct ExpConsts;
template <> struct ExpConsts<float> {
  static constexpr float lo = -87.0f, hi = 88.0f, round = 12582912.0f;  // 1.5 * 2^23
  static constexpr int mant = 23, bias = 127, degree = 7;
  static constexpr float ln2_hi = 0.693145751953125f, ln2_lo = 1.428606765330187e-06f;
};
template <> struct ExpConsts<double> {
  static constexpr double lo = -708.0, hi = 709.0, round = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr int mant = 52, bias = 1023, degree = 13;
  static constexpr double ln2_hi = 0.6931471803691238, ln2_lo = 1.9082149292705877e-10;
};

template <class A> inline typename VecOf<A>::V vexp(typename VecOf<A>::V x) {
  using V = typename VecOf<A>::V;
  using I = typename VecOf<A>::I;
  using C = ExpConsts<A>;
  x = x < C::lo ? splat<V>(C::lo) : x;
  x = x > C::hi ? splat<V>(C::hi) : x;
  V n = (x * A(1.4426950408889634) + C::round) - C::round;  // round to nearest
  V r = (x - n * C::ln2_hi) - n * C::ln2_lo;
  // Horner with 1/i! coefficients.
  V p = splat<V>(A(1));
  for (int i = C::degree; i >= 1; --i) p = p * (r * (A(1) / A(i))) + A(1);
  I e = (__builtin_convertvector(n, I) + C::bias) << C::mant;
  V scale;
  __builtin_memcpy(&scale, &e, sizeof(V));
  return p * scale;
}

template <class A> inline void exp_inplace(A* x, int64_t n) {
  using V = typename VecOf<A>::V;
  constexpr int W = VecOf<A>::W;
  int64_t i = 0;
  for (; i + W <= n; i += W) vstore(x + i, vexp<A>(vload<V>(x + i)));
  if (i < n) {
    A tmp[W] = {};
    for (int64_t q = i; q < n; ++q) tmp[q - i] = x[q];
    vstore(tmp, vexp<A>(vload<V>(tmp)));
    for (int64_t q = i; q < n; ++q) x[q] = tmp[q - i];
  }
}

// ---- element conversions --------------------------------------------------------------
struct bf16 { uint16_t bits; };
struct f16h { uint16_t bits; };

inline float to_acc(float x) { return x; }
inline double to_acc(double x) { return x; }
inline float to_acc(bf16 x) {
  uint32_t u = uint32_t(x.bits) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
inline float to_acc(f16h x) {
  _Float16 h;
  __builtin_memcpy(&h, &x.bits, 2);
  return float(h);
}
inline void from_acc(float x, float* out) { *out = x; }
inline void from_acc(double x, double* out) { *out = x; }
inline void from_acc(float x, bf16* out) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  __builtin_memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    out->bits = uint16_t((u >> 16) | 0x40);
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  out->bits = uint16_t(u >> 16);
}
inline void from_acc(float x, f16h* out) {
  _Float16 h = _Float16(x);
  __builtin_memcpy(&out->bits, &h, 2);
}

template <class In, class A> inline void load_row(const In* src, A* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = A(to_acc(src[i]));
}
template <class In, class A> inline void store_row(const A* src, In* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) from_acc(src[i], dst + i);
}

// 64-byte aligned scratch memory owned by one task.
template <class A> struct Scratch {
  A* p = nullptr;
  explicit Scratch(int64_t n) {
    void* q = nullptr;
    size_t bytes = (size_t(n > 0 ? n : 1) * sizeof(A) + 63) / 64 * 64;
    if (posix_memalign(&q, 64, bytes) != 0) throw std::bad_alloc();
    p = static_cast<A*>(q);
  }
  ~Scratch() { free(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// ---- problem geometry -----------------------------------------------------------------
struct Segment {
  int64_t batch, t_begin, t_end;
};
inline Segment segment(const WkvProblem& p, int64_t s) {
  if (p.cu_seqlens) return {0, p.cu_seqlens[s], p.cu_seqlens[s + 1]};
  return {s, 0, p.T};
}
// Offset of element (batch, t, h, 0) in a [B, T, H, N] tensor.
inline int64_t offset(const WkvProblem& p, int64_t batch, int64_t t, int64_t h) {
  return ((batch * p.T + t) * p.H + h) * p.N;
}

// Inputs of one chunk of steps, converted to the accumulation type: per step, N key-side
// values (decay d = exp(w), k, a, b, r) and the value-row slice of v (and grad y).
template <class In, class A> struct Chunk {
  int64_t N, rows;
  Scratch<A> d, k, a, b, r, v, gy;
  Chunk(int64_t N_, int64_t rows_)
      : N(N_), rows(rows_), d(kChunk * N_), k(kChunk * N_), a(kChunk * N_), b(kChunk * N_),
        r(kChunk * N_), v(kChunk * rows_), gy(kChunk * rows_) {
    // WKV-6 packs no a, b; zeros keep the shared code paths finite.
    for (int64_t i = 0; i < kChunk * N_; ++i) a.p[i] = b.p[i] = A(0);
  }

  void pack(const WkvProblem& p, int64_t batch, int64_t h, int64_t t0, int64_t n, int64_t row0,
            const In* grad_y) {
    const In* rin = static_cast<const In*>(p.r);
    const In* win = static_cast<const In*>(p.w);
    const In* kin = static_cast<const In*>(p.k);
    const In* vin = static_cast<const In*>(p.v);
    for (int64_t t = 0; t < n; ++t) {
      int64_t o = offset(p, batch, t0 + t, h);
      load_row(win + o, d.p + t * N, N);
      load_row(kin + o, k.p + t * N, N);
      load_row(rin + o, r.p + t * N, N);
      load_row(vin + o + row0, v.p + t * rows, rows);
      if (p.version == 7) {
        load_row(static_cast<const In*>(p.a) + o, a.p + t * N, N);
        load_row(static_cast<const In*>(p.b) + o, b.p + t * N, N);
      }
      if (grad_y) load_row(grad_y + o + row0, gy.p + t * rows, rows);
    }
    exp_inplace(d.p, n * N);
  }

  // Rows of one head are H * N elements apart, so each step's inputs sit on another page,
  // where hardware prefetchers stop: ask for the next chunk while this one is computed.
  void prefetch(const WkvProblem& p, int64_t batch, int64_t h, int64_t t0, int64_t n, int64_t row0,
                const In* grad_y) const {
    const In* inputs[] = {static_cast<const In*>(p.r), static_cast<const In*>(p.w),
                          static_cast<const In*>(p.k), static_cast<const In*>(p.a),
                          static_cast<const In*>(p.b)};
    const int64_t line = 64 / sizeof(In);
    for (int64_t t = 0; t < n; ++t) {
      const int64_t o = offset(p, batch, t0 + t, h);
      for (const In* x : inputs)
        if (x)
          for (int64_t j = 0; j < N; j += line) __builtin_prefetch(x + o + j);
      for (int64_t i = 0; i < rows; i += line) {
        __builtin_prefetch(static_cast<const In*>(p.v) + o + row0 + i);
        if (grad_y) __builtin_prefetch(grad_y + o + row0 + i);
      }
    }
  }
};

// ---- forward ----------------------------------------------------------------------------
// One WKV-7 step for RV vectors of value rows: St is the [N][RV*W] tile of those rows.
// sa holds S_{t-1} a_t on entry; with NEXT it leaves holding S_t a_{t+1}. The five scalars of
// a key column are broadcast once and shared by the RV row vectors.
template <class A, int RV, bool NEXT>
inline void step7(A* St, int64_t N, const A* d, const A* k, const A* b, const A* r, const A* a_next,
                  const A* vrow, A* yrow, typename VecOf<A>::V (&sa)[RV]) {
  using V = typename VecOf<A>::V;
  constexpr int W = VecOf<A>::W, RW = RV * W;
  V vv[RV], y[RV], nsa[RV];
  for (int q = 0; q < RV; ++q) {
    vv[q] = vload<V>(vrow + q * W);
    y[q] = nsa[q] = V{};
  }
  for (int64_t j = 0; j < N; ++j) {
    A* col = St + j * RW;
    const V dj = splat<V>(d[j]), bj = splat<V>(b[j]), kj = splat<V>(k[j]), rj = splat<V>(r[j]);
    const V aj = NEXT ? splat<V>(a_next[j]) : V{};
    for (int q = 0; q < RV; ++q) {
      const V s = vload<V>(col + q * W) * dj + sa[q] * bj + vv[q] * kj;
      vstore(col + q * W, s);
      y[q] += s * rj;
      if (NEXT) nsa[q] += s * aj;
    }
  }
  for (int q = 0; q < RV; ++q) {
    vstore(yrow + q * W, y[q]);
    if (NEXT) sa[q] = nsa[q];
  }
}

// One WKV-6 step: y = S_{t-1} r + v (r . u k), then S = S diag(d) + v k^T.
template <class A, int RV>
inline void step6(A* St, int64_t N, const A* d, const A* k, const A* r, A ruk, const A* vrow,
                  A* yrow) {
  using V = typename VecOf<A>::V;
  constexpr int W = VecOf<A>::W, RW = RV * W;
  V vv[RV], y[RV];
  for (int q = 0; q < RV; ++q) {
    vv[q] = vload<V>(vrow + q * W);
    y[q] = V{};
  }
  for (int64_t j = 0; j < N; ++j) {
    A* col = St + j * RW;
    const V dj = splat<V>(d[j]), kj = splat<V>(k[j]), rj = splat<V>(r[j]);
    for (int q = 0; q < RV; ++q) {
      const V s = vload<V>(col + q * W);
      y[q] += s * rj;
      vstore(col + q * W, s * dj + vv[q] * kj);
    }
  }
  for (int q = 0; q < RV; ++q) vstore(yrow + q * W, y[q] + vv[q] * ruk);
}

// Runs the forward recurrence of one segment, one head, value rows [row0, row0 + rows).
// Writes y (if y_out), the final state (if final_out) and, if snapshots, the state at the
// start of every chunk as [chunk][row][key].
template <class In, class A, int RV>
void forward_rows(const WkvProblem& p, int64_t seg, int64_t h, int64_t row0, int64_t rows, In* y_out,
                  A* final_out, A* snapshots) {
  using V = typename VecOf<A>::V;
  constexpr int W = VecOf<A>::W, RW = RV * W;
  const int64_t N = p.N, H = p.H;
  const Segment sg = segment(p, seg);
  const int64_t blocks = rows / RW;
  Scratch<A> St(N * rows);  // [block][j][RW]
  const A* s_init = static_cast<const A*>(p.initial_state);
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (int64_t j = 0; j < N; ++j)
      for (int64_t i = 0; i < RW; ++i)
        St.p[(blk * N + j) * RW + i] =
            s_init ? s_init[((seg * H + h) * N + row0 + blk * RW + i) * N + j] : A(0);

  Chunk<In, A> ch(N, rows);
  A yrow[RW];
  const In* u_in = static_cast<const In*>(p.u);
  Scratch<A> u(N);
  if (p.version == 6) load_row(u_in + h * N, u.p, N);

  for (int64_t t0 = sg.t_begin, c = 0; t0 < sg.t_end; t0 += kChunk, ++c) {
    const int64_t n = sg.t_end - t0 < kChunk ? sg.t_end - t0 : kChunk;
    ch.pack(p, sg.batch, h, t0, n, row0, nullptr);
    if (t0 + n < sg.t_end)
      ch.prefetch(p, sg.batch, h, t0 + n, sg.t_end - t0 - n < kChunk ? sg.t_end - t0 - n : kChunk, row0,
                  nullptr);
    for (int64_t blk = 0; blk < blocks; ++blk) {
      A* tile = St.p + blk * N * RW;
      if (snapshots) {
        A* snap = snapshots + (c * rows + blk * RW) * N;
        for (int64_t j = 0; j < N; ++j)
          for (int64_t i = 0; i < RW; ++i) snap[i * N + j] = tile[j * RW + i];
      }
      V sa[RV] = {};
      if (p.version == 7) {
        for (int64_t j = 0; j < N; ++j)
          for (int q = 0; q < RV; ++q) sa[q] += vload<V>(tile + j * RW + q * W) * ch.a.p[j];
      }
      for (int64_t t = 0; t < n; ++t) {
        const A* vrow = ch.v.p + t * rows + blk * RW;
        const A* d = ch.d.p + t * N;
        const A* k = ch.k.p + t * N;
        const A* r = ch.r.p + t * N;
        if (p.version == 7) {
          const A* b = ch.b.p + t * N;
          if (t + 1 < n)
            step7<A, RV, true>(tile, N, d, k, b, r, ch.a.p + (t + 1) * N, vrow, yrow, sa);
          else
            step7<A, RV, false>(tile, N, d, k, b, r, nullptr, vrow, yrow, sa);
        } else {
          A ruk = 0;
          for (int64_t j = 0; j < N; ++j) ruk += r[j] * u.p[j] * k[j];
          step6<A, RV>(tile, N, d, k, r, ruk, vrow, yrow);
        }
        if (y_out) store_row(yrow, y_out + offset(p, sg.batch, t0 + t, h) + row0 + blk * RW, RW);
      }
    }
  }
  if (final_out)
    for (int64_t blk = 0; blk < blocks; ++blk)
      for (int64_t j = 0; j < N; ++j)
        for (int64_t i = 0; i < RW; ++i)
          final_out[((seg * H + h) * N + row0 + blk * RW + i) * N + j] = St.p[(blk * N + j) * RW + i];
}

// A few steps (decoding): update the state in place in its own [row][key] layout. This skips
// the two transposes of the tile path, which cost more than these steps' row dot products.
constexpr int64_t kShortSegment = 4;

template <class In, class A>
void forward_rows_short(const WkvProblem& p, int64_t seg, int64_t h, int64_t row0, int64_t rows, In* y_out,
                        A* final_out, A* snapshots) {
  using V = typename VecOf<A>::V;
  constexpr int W = VecOf<A>::W;
  const int64_t N = p.N, NV = N / W;
  const Segment sg = segment(p, seg);
  const int64_t len = sg.t_end - sg.t_begin;
  const int64_t state_offset = ((seg * p.H + h) * N + row0) * N;
  Scratch<A> S(rows * N);
  const A* s_init = static_cast<const A*>(p.initial_state);
  for (int64_t e = 0; e < rows * N; ++e) S.p[e] = s_init ? s_init[state_offset + e] : A(0);
  if (snapshots && len > 0)  // one chunk: its snapshot is the initial state
    for (int64_t e = 0; e < rows * N; ++e) snapshots[e] = S.p[e];

  Chunk<In, A> ch(N, rows);
  ch.pack(p, sg.batch, h, sg.t_begin, len, row0, nullptr);
  Scratch<A> u(N), yrow(rows);
  if (p.version == 6) load_row(static_cast<const In*>(p.u) + h * N, u.p, N);
  for (int64_t t = 0; t < len; ++t) {
    const A *d = ch.d.p + t * N, *k = ch.k.p + t * N, *a = ch.a.p + t * N, *b = ch.b.p + t * N,
            *r = ch.r.p + t * N, *v = ch.v.p + t * rows;
    A ruk = 0;
    if (p.version == 6)
      for (int64_t j = 0; j < N; ++j) ruk += r[j] * u.p[j] * k[j];
    for (int64_t i = 0; i < rows; ++i) {
      A* s = S.p + i * N;
      V acc = V{};
      if (p.version == 7) {
        for (int64_t q = 0; q < NV; ++q) acc += vload<V>(s + q * W) * vload<V>(a + q * W);
        const A sa = hsum(acc);
        acc = V{};
        for (int64_t q = 0; q < NV; ++q) {
          const V x = vload<V>(s + q * W) * vload<V>(d + q * W) + sa * vload<V>(b + q * W) +
                      v[i] * vload<V>(k + q * W);
          vstore(s + q * W, x);
          acc += x * vload<V>(r + q * W);
        }
        yrow.p[i] = hsum(acc);
      } else {
        for (int64_t q = 0; q < NV; ++q) {
          const V x = vload<V>(s + q * W);
          acc += x * vload<V>(r + q * W);
          vstore(s + q * W, x * vload<V>(d + q * W) + v[i] * vload<V>(k + q * W));
        }
        yrow.p[i] = hsum(acc) + v[i] * ruk;
      }
    }
    if (y_out) store_row(yrow.p, y_out + offset(p, sg.batch, sg.t_begin + t, h) + row0, rows);
  }
  if (final_out)
    for (int64_t e = 0; e < rows * N; ++e) final_out[state_offset + e] = S.p[e];
}

template <class In, class A>
void forward_rows_any(const WkvProblem& p, int64_t seg, int64_t h, int64_t row0, int64_t rows, In* y,
                      A* final_out, A* snapshots) {
  constexpr int W = VecOf<A>::W;
  const Segment sg = segment(p, seg);
  if (sg.t_end - sg.t_begin <= kShortSegment)
    return forward_rows_short<In, A>(p, seg, h, row0, rows, y, final_out, snapshots);
  if (rows % (2 * W) == 0)
    forward_rows<In, A, 2>(p, seg, h, row0, rows, y, final_out, snapshots);
  else
    forward_rows<In, A, 1>(p, seg, h, row0, rows, y, final_out, snapshots);
}

// ---- backward ---------------------------------------------------------------------------
// Where one call's backward tasks write: the per-split partial column sums and grad_u, and
// grad_v and grad_initial_state, all in the accumulation type. backward_typed() below adds the
// partial sums up (and converts them) into the problem's gradients.
template <class A> struct Partials {
  A* columns[5] = {};           // r, w, k and (WKV-7) a, b: each [splits, B, T, H, N]
  A* v = nullptr;               // [B, T, H, N]
  A* u = nullptr;               // WKV-6: [splits, S, H, N]
  A* initial_state = nullptr;   // [S, H, N, N]
};

template <class In, class A>
void backward_rows(const WkvBackwardProblem& p, const Partials<A>& io, int64_t seg, int64_t h, int64_t split,
                   int64_t rows) {
  using V = typename VecOf<A>::V;
  constexpr int W = VecOf<A>::W;
  const int64_t N = p.N, H = p.H, NV = N / W, row0 = split * rows;
  const bool v7 = p.version == 7;
  const Segment sg = segment(p, seg);
  const int64_t len = sg.t_end - sg.t_begin;
  const int64_t chunks = (len + kChunk - 1) / kChunk;
  const int64_t plane = p.B * p.T * p.H * p.N;  // one [B, T, H, N] gradient
  A* gcol[5] = {};  // this split's partial column gradients: r, w, k, a, b
  for (int q = 0; q < (v7 ? 5 : 3); ++q) gcol[q] = io.columns[q] + split * plane;
  A* gv = io.v;

  Scratch<A> snaps(chunks * rows * N);
  forward_rows_any<In, A>(p, seg, h, row0, rows, nullptr, nullptr, snaps.p);

  // dS = d loss / d S_t, rows [row0, row0 + rows) of this head, [row][key].
  Scratch<A> dS(rows * N);
  const A* gs = static_cast<const A*>(p.grad_state);
  for (int64_t i = 0; i < rows * N; ++i) dS.p[i] = gs ? gs[(seg * H + h) * N * N + row0 * N + i] : A(0);

  Chunk<In, A> ch(N, rows);
  Scratch<A> states((kChunk + 1) * rows * N);  // S_{t0-1 .. t0+n-1} of the chunk, [step][row][key]
  Scratch<A> sa(kChunk * rows), dsa(rows), colacc(5 * N);
  Scratch<A> u(N);
  Scratch<A> du(N);
  for (int64_t j = 0; j < N; ++j) du.p[j] = 0;
  if (!v7) load_row(static_cast<const In*>(p.u) + h * N, u.p, N);
  const In* gy_in = static_cast<const In*>(p.grad_y);

  for (int64_t c = chunks - 1; c >= 0; --c) {
    const int64_t t0 = sg.t_begin + c * kChunk;
    const int64_t n = sg.t_end - t0 < kChunk ? sg.t_end - t0 : kChunk;
    ch.pack(p, sg.batch, h, t0, n, row0, gy_in);
    if (c > 0) ch.prefetch(p, sg.batch, h, t0 - kChunk, kChunk, row0, gy_in);
    if (!gy_in)
      for (int64_t i = 0; i < n * rows; ++i) ch.gy.p[i] = 0;
    // Recompute the chunk's states from its snapshot, two value rows at a time (they share
    // the loads of the step's key-side vectors).
    for (int64_t i = 0; i < rows * N; ++i) states.p[i] = snaps.p[c * rows * N + i];
    for (int64_t t = 0; t < n; ++t) {
      const A *d = ch.d.p + t * N, *k = ch.k.p + t * N, *a = ch.a.p + t * N, *b = ch.b.p + t * N;
      for (int64_t i = 0; i < rows; i += 2) {
        const A* x0 = states.p + (t * rows + i) * N;  // rows i, i + 1 of S_{t-1}
        const A* x1 = x0 + N;
        A* z0 = states.p + ((t + 1) * rows + i) * N;  // rows i, i + 1 of S_t
        A* z1 = z0 + N;
        const A v0 = ch.v.p[t * rows + i], v1 = ch.v.p[t * rows + i + 1];
        A sa0 = 0, sa1 = 0;
        if (v7) {
          V acc0 = V{}, acc1 = V{};
          for (int64_t q = 0; q < NV; ++q) {
            const V aq = vload<V>(a + q * W);
            acc0 += vload<V>(x0 + q * W) * aq;
            acc1 += vload<V>(x1 + q * W) * aq;
          }
          sa0 = hsum(acc0), sa1 = hsum(acc1);
          sa.p[t * rows + i] = sa0, sa.p[t * rows + i + 1] = sa1;
        }
        for (int64_t q = 0; q < NV; ++q) {
          const V dq = vload<V>(d + q * W), bq = vload<V>(b + q * W), kq = vload<V>(k + q * W);
          vstore(z0 + q * W, vload<V>(x0 + q * W) * dq + sa0 * bq + v0 * kq);
          vstore(z1 + q * W, vload<V>(x1 + q * W) * dq + sa1 * bq + v1 * kq);
        }
      }
    }
    for (int64_t t = n - 1; t >= 0; --t) {
      const A *d = ch.d.p + t * N, *k = ch.k.p + t * N, *a = ch.a.p + t * N, *b = ch.b.p + t * N,
              *r = ch.r.p + t * N;
      const A* vr = ch.v.p + t * rows;
      const A* gy = ch.gy.p + t * rows;
      const A* sat = sa.p + t * rows;
      const A* S0 = states.p + t * rows * N;        // S_{t-1}
      const A* S1 = states.p + (t + 1) * rows * N;  // S_t
      const int64_t o = offset(p, sg.batch, t0 + t, h);
      A ruk = 0, gyv = 0;  // WKV-6 bonus terms
      if (!v7) {
        for (int64_t j = 0; j < N; ++j) ruk += r[j] * u.p[j] * k[j];
        for (int64_t i = 0; i < rows; ++i) gyv += gy[i] * vr[i];
      }
      for (int64_t j = 0; j < 5 * N; ++j) colacc.p[j] = 0;
      // Blocks of kRowBlock rows keep dS, S_{t-1} and S_t of the block in L1 while phase B
      // walks its key columns.
      for (int64_t rb = 0; rb < rows; rb += kRowBlock) {
        // Phase A, per row pair: WKV-7 first adds dy r^T (y_t = S_t r_t) to dS, then
        // dv = dS k and d(sa) = dS b; WKV-6 only needs dv = dS k + dy (r . u k).
        for (int64_t i = rb; i < rb + kRowBlock; i += 2) {
          A* g0 = dS.p + i * N;
          A* g1 = g0 + N;
          V kv0 = V{}, kv1 = V{}, bv0 = V{}, bv1 = V{};
          for (int64_t q = 0; q < NV; ++q) {
            V x0 = vload<V>(g0 + q * W), x1 = vload<V>(g1 + q * W);
            const V kq = vload<V>(k + q * W);
            if (v7) {
              const V rq = vload<V>(r + q * W), bq = vload<V>(b + q * W);
              x0 += gy[i] * rq;
              x1 += gy[i + 1] * rq;
              vstore(g0 + q * W, x0);
              vstore(g1 + q * W, x1);
              bv0 += x0 * bq;
              bv1 += x1 * bq;
            }
            kv0 += x0 * kq;
            kv1 += x1 * kq;
          }
          gv[o + row0 + i] = hsum(kv0) + (v7 ? A(0) : gy[i] * ruk);
          gv[o + row0 + i + 1] = hsum(kv1) + (v7 ? A(0) : gy[i + 1] * ruk);
          if (v7) dsa.p[i] = hsum(bv0), dsa.p[i + 1] = hsum(bv1);
        }
        // Phase B, per key-column vector: the column gradients summed over the block's rows,
        // and dS -> dS_{t-1}.
        for (int64_t q = 0; q < NV; ++q) {
          V gr = V{}, gw = V{}, gk = V{}, ga = V{}, gb = V{};
          const V dq = vload<V>(d + q * W), aq = vload<V>(a + q * W), rq = vload<V>(r + q * W);
          for (int64_t i = rb; i < rb + kRowBlock; ++i) {
            A* g = dS.p + i * N + q * W;
            const V x = vload<V>(g);
            const V s0 = vload<V>(S0 + i * N + q * W);
            gk += x * vr[i];
            gw += x * s0;
            if (v7) {
              gr += vload<V>(S1 + i * N + q * W) * gy[i];
              gb += x * sat[i];
              ga += s0 * dsa.p[i];
              vstore(g, x * dq + dsa.p[i] * aq);
            } else {
              gr += s0 * gy[i];
              vstore(g, x * dq + gy[i] * rq);
            }
          }
          A* acc = colacc.p + q * W;
          vstore(acc, vload<V>(acc) + gr);
          vstore(acc + N, vload<V>(acc + N) + gw);
          vstore(acc + 2 * N, vload<V>(acc + 2 * N) + gk);
          if (v7) {
            vstore(acc + 3 * N, vload<V>(acc + 3 * N) + ga);
            vstore(acc + 4 * N, vload<V>(acc + 4 * N) + gb);
          }
        }
      }
      for (int64_t q = 0; q < NV; ++q) {
        const A* acc = colacc.p + q * W;
        const V dq = vload<V>(d + q * W), rq = vload<V>(r + q * W), kq = vload<V>(k + q * W);
        V gr = vload<V>(acc), gk = vload<V>(acc + 2 * N);
        if (!v7) {  // the bonus y_t += v_t (r . u k) touches r, k and u
          const V uq = vload<V>(u.p + q * W);
          gr += uq * kq * gyv;
          gk += rq * uq * gyv;
          vstore(du.p + q * W, vload<V>(du.p + q * W) + rq * kq * gyv);
        }
        vstore(gcol[0] + o + q * W, gr);
        vstore(gcol[1] + o + q * W, vload<V>(acc + N) * dq);
        vstore(gcol[2] + o + q * W, gk);
        if (v7) {
          vstore(gcol[3] + o + q * W, vload<V>(acc + 3 * N));
          vstore(gcol[4] + o + q * W, vload<V>(acc + 4 * N));
        }
      }
    }
  }
  A* g0 = io.initial_state + (seg * H + h) * N * N + row0 * N;
  for (int64_t i = 0; i < rows * N; ++i) g0[i] = dS.p[i];
  if (!v7) {
    A* gu = io.u + ((split * p.num_seqs + seg) * H + h) * N;
    for (int64_t j = 0; j < N; ++j) gu[j] = du.p[j];
  }
}

#include "wkv_cpu_chunked.h"

// ---- entry points -----------------------------------------------------------------------
// Flush denormals to zero while a task runs: a decayed state or gradient can sink below
// float32's normal range, where x86 arithmetic is ~100x slower; the values lost are < 1e-38.
struct FlushDenormals {
#if defined(__x86_64__) || defined(_M_X64)
  unsigned saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040u); }  // FTZ | DAZ
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// The tasks of one call: (segment, head, row split) triples, run by the caller's threads.
template <class In, class A, bool kBackward> struct Tasks {
  const WkvProblem* p;
  const Partials<A>* io;  // backward only
  int64_t splits;
  Algorithm algorithm;

  static void run(void* ctx, int64_t begin, int64_t end) {
    const Tasks& ts = *static_cast<const Tasks*>(ctx);
    const WkvProblem& p = *ts.p;
    const int64_t rows = p.N / ts.splits;
    FlushDenormals ftz;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seg = task / (p.H * ts.splits), h = task / ts.splits % p.H, split = task % ts.splits;
      const Segment sg = segment(p, seg);
      const bool chunked = ts.algorithm == Algorithm::chunked && sg.t_end - sg.t_begin > kShortSegment;
      if constexpr (kBackward) {
        const auto& bp = static_cast<const WkvBackwardProblem&>(p);
        if (chunked) backward_rows_chunked<In, A>(bp, *ts.io, seg, h, split, rows);
        else backward_rows<In, A>(bp, *ts.io, seg, h, split, rows);
      } else if (chunked) {
        forward_rows_chunked<In, A>(p, seg, h, split * rows, rows, static_cast<In*>(p.y),
                                    static_cast<A*>(p.final_state), nullptr);
      } else {
        forward_rows_any<In, A>(p, seg, h, split * rows, rows, static_cast<In*>(p.y),
                                static_cast<A*>(p.final_state), nullptr);
      }
    }
  }
};

template <class X, class Y> struct SameType { static constexpr bool value = false; };
template <class X> struct SameType<X, X> { static constexpr bool value = true; };

// out[i] = sum over s < terms of src[s * stride + i], converted to In, for i in [0, n): the
// row splits' partial sums added up in split order, in the accumulation type.
template <class In, class A> struct SumTerms {
  const A* src;
  In* out;
  int64_t n, stride, terms;
  static constexpr int64_t kBlock = 4096;  // elements per task

  static void run(void* ctx, int64_t begin, int64_t end) {
    const SumTerms& st = *static_cast<const SumTerms*>(ctx);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t i1 = (blk + 1) * kBlock < st.n ? (blk + 1) * kBlock : st.n;
      for (int64_t i = blk * kBlock; i < i1; ++i) {
        A acc = st.src[i];
        for (int64_t s = 1; s < st.terms; ++s) acc += st.src[s * st.stride + i];
        from_acc(acc, st.out + i);
      }
    }
  }
  void operator()(const ParallelFor& pf) {
    if (n > 0) pf((n + kBlock - 1) / kBlock, this, &SumTerms::run);
  }
};

template <class In, class A>
void forward_typed(const WkvProblem& p, const ParallelFor& pf, Algorithm algorithm) {
  Tasks<In, A, false> ts{&p, nullptr, row_splits(p, pf.num_threads), algorithm};
  pf(p.num_seqs * p.H * ts.splits, &ts, &Tasks<In, A, false>::run);
}

template <class In, class A>
void backward_typed(const WkvBackwardProblem& p, const ParallelFor& pf, Algorithm algorithm) {
  const int64_t splits = row_splits(p, pf.num_threads);
  const int64_t plane = p.B * p.T * p.H * p.N, hn = p.H * p.N;
  const int ncols = p.version == 7 ? 5 : 3;
  void* const grads[5] = {p.grad_r, p.grad_w, p.grad_k, p.grad_a, p.grad_b};
  // With one split and float32 / float64 inputs, the tasks write the gradients themselves.
  constexpr bool kSame = SameType<In, A>::value;
  const bool direct = kSame && splits == 1;
  Scratch<A> columns(direct ? 0 : ncols * splits * plane), gv(kSame ? 0 : plane);
  Scratch<A> gu(p.version == 6 ? splits * p.num_seqs * hn : 0);
  Partials<A> io;
  for (int q = 0; q < ncols; ++q)
    io.columns[q] = direct ? static_cast<A*>(grads[q]) : columns.p + q * splits * plane;
  io.v = kSame ? static_cast<A*>(p.grad_v) : gv.p;
  io.u = gu.p;
  io.initial_state = static_cast<A*>(p.grad_initial_state);
  Tasks<In, A, true> ts{&p, &io, splits, algorithm};
  pf(p.num_seqs * p.H * splits, &ts, &Tasks<In, A, true>::run);

  if (!direct)
    for (int q = 0; q < ncols; ++q)
      SumTerms<In, A>{io.columns[q], static_cast<In*>(grads[q]), plane, plane, splits}(pf);
  if (!kSame) SumTerms<In, A>{io.v, static_cast<In*>(p.grad_v), plane, plane, 1}(pf);
  if (p.version == 6) SumTerms<In, A>{io.u, static_cast<In*>(p.grad_u), hn, hn, splits * p.num_seqs}(pf);
}

}  // namespace

void forward(const WkvProblem& p, const ParallelFor& pf, Algorithm a) {
  switch (p.dtype) {
    case DType::f32: return forward_typed<float, float>(p, pf, a);
    case DType::f64: return forward_typed<double, double>(p, pf, a);
    case DType::bf16: return forward_typed<bf16, float>(p, pf, a);
    case DType::f16: return forward_typed<f16h, float>(p, pf, a);
  }
}

void backward(const WkvBackwardProblem& p, const ParallelFor& pf, Algorithm a) {
  switch (p.dtype) {
    case DType::f32: return backward_typed<float, float>(p, pf, a);
    case DType::f64: return backward_typed<double, double>(p, pf, a);
    case DType::bf16: return backward_typed<bf16, float>(p, pf, a);
    case DType::f16: return backward_typed<f16h, float>(p, pf, a);
  }
}

}  // namespace arwkv::cpu::ARWKV_ISA
