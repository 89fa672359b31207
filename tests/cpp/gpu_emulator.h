// A CPU stand-in for the small part of the CUDA / HIP runtime the WKV kernels use, so that the
// C++ tests run the GPU kernel source itself (csrc/gpu/wkv_gpu_kernels.cuh) on a machine with
// no GPU. Included by wkv_gpu_compat.h when ARWKV_GPU_EMULATION is defined; never part of the
// Python package.
//
// Every thread of a block is a fiber on one OS thread; blocks run one after another,
// so `__shared__` is a function-local static. A fiber runs until it reaches __syncthreads(), a
// lane shuffle or a matrix product, then the next one runs. What it checks that a real GPU would
// not report:
//  - a barrier that not every thread of the block reaches (or a shuffle or matrix product that
//    not every lane of the warp takes part in) is a deadlock here: the launch fails with a message;
//  - the order in which threads run between two barriers, and blocks run, is forward, reverse
//    or shuffled (set_schedule; shuffled also lets warps drift apart), so a missing barrier, or
//    shared memory read before this block wrote it, shows up as results that depend on the
//    order.
// What it does not model: a shuffle here also acts as a barrier of the whole warp, so code that
// needs a __syncwarp between shared-memory accesses of one warp would pass (the kernels have none).
// Warp width: 32 (CUDA), or 64 when ARWKV_HIP is defined (the kernels then pick their HIP tiles).
// Tensor cores: the tile layer's innermost step (wkv_gpu_compat.h, mma()) is the warp-wide
// mma.sync.m16n8k16 on 32 lanes, or the wave-wide v_mfma_f32_16x16x16 on 64 lanes, emulated here
// from the lanes' registers with the hardware's fragment layouts (written out below on their own,
// not taken from the tile layer).
#pragma once

#include <math.h>  // expf, fmaf in the global namespace, as in device code
// The hand-written switch below follows the System V x86-64 ABI (Linux, ELF); elsewhere ucontext.
#if defined(__x86_64__) && defined(__ELF__)
#define ARWKV_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- CUDA spellings -------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline int min(int a, int b) { return a < b ? a : b; }

// 16-bit floats, both spellings: CUDA's __half helpers and HIP's _Float16.
using __half = _Float16;
inline float __half2float(__half x) { return float(x); }
inline __half __float2half_rn(float x) { return __half(x); }
inline __half __ushort_as_half(uint16_t u) { return __builtin_bit_cast(__half, u); }
inline uint16_t __half_as_ushort(__half x) { return __builtin_bit_cast(uint16_t, x); }

namespace gpu_emu {

#if defined(ARWKV_HIP)
constexpr unsigned kWarp = 64;
#else
constexpr unsigned kWarp = 32;
#endif

// Fiber switching. On x86-64 a few instructions: swapcontext would also save the signal mask
// with a system call on every switch, and the kernels switch at every shuffle (~10^8 times
// in the test), which made the test several times slower.
#if defined(ARWKV_EMU_ASM_SWITCH)
struct Context {
  void* sp = nullptr;
};
extern "C" void arwkv_emu_switch(void** save_sp, void* load_sp);
// Saves the callee-saved registers on the current stack, stores its pointer in *save_sp, and
// continues on the stack load_sp with the registers saved there. (The SSE/x87 control words
// are the same in every fiber, so they need no saving.)
asm(R"(
  .pushsection .text
  .p2align 4
arwkv_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .popsection
)");
inline void switch_context(Context& from, Context& to) { arwkv_emu_switch(&from.sp, to.sp); }
// A stack whose first switch "returns" into entry, aligned as if entry had been called.
inline void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top) - 8;  // 6 registers, entry, a slot for entry's "return"
  for (int i = 0; i < 6; ++i) sp[i] = nullptr;
  sp[6] = reinterpret_cast<void*>(entry);
  sp[7] = nullptr;
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

enum class Schedule { forward, reverse, shuffled };

// One lane's operand registers of a matrix instruction: 16-bit elements two to a register, the
// lower-numbered one in the low half (CUDA: A 4 registers, B 2; gfx942: A 2, B 2).
struct MatrixRegs {
  uint32_t a[4] = {}, b[4] = {};
};

enum class Wait { none, warp, block, done };

// ---- Shared-memory bank conflicts ---------------------------------------------------------------
// The tile layer passes the address of each of its loads and stores through ARWKV_NOTED
// (wkv_gpu_compat.h); with runtime().count_banks set, those in shared memory (a `__shared__` is a
// static: its address lies in the program image, where no heap or stack does) are noted per lane.
// When the lanes of a warp meet (a shuffle, a matrix product, a barrier, the end of the block),
// the accesses its lanes made at one source line are matched in order, lane with lane, and each
// warp-wide access is counted as the hardware serves it: in phases of 128 bytes' worth of lanes
// (32 lanes of 4-byte accesses, 16 of 8, 8 of 16), each phase taking as many wavefronts as the
// most distinct 4-byte words any one of the 32 banks holds. `ideal` counts a wavefront per phase.
struct Access {
  const char* file;
  int line;
  uintptr_t addr;
  int bytes;
};
struct BankCount {
  int64_t accesses = 0, wavefronts = 0, ideal = 0;
};

struct Fiber {
  Context context;
  Wait wait = Wait::none;
};

// State of the block being run (one at a time).
struct Runtime {
  std::vector<Fiber> fibers;
  std::vector<std::vector<char>> stacks;
  std::vector<float> exchange;  // one slot per thread, for shuffles
  std::vector<MatrixRegs> matrix;  // one slot per thread, for matrix products
  std::vector<int> order;
  std::vector<char> held;  // warps held back this round
  Context scheduler;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  Schedule schedule = Schedule::forward;
  std::mt19937 random{12345};
  std::string error;  // the first launch failure, reported by take_error()
  int64_t switches = 0;
  int fail_countdown = 0;  // > 0: the launch that brings it to 0 fails with fail_message
  std::string fail_message;
  // shared-memory bank conflicts, counted while count_banks is set (see note_access)
  bool count_banks = false;
  std::string kernel;  // the launch being run, as the launcher names it
  std::vector<std::vector<Access>> notes;  // per thread, since its warp last met
  std::map<std::tuple<std::string, std::string, int>, BankCount> banks;  // (kernel, file, line)
};
inline Runtime& runtime() {
  static Runtime r;
  return r;
}

inline void set_schedule(Schedule s) { runtime().schedule = s; }

// Makes the n-th launch from now on fail with `message` (as a real launch may, e.g. for want of
// resources), to test what the launchers report.
inline void fail_launch(int n, const char* message) {
  runtime().fail_countdown = n;
  runtime().fail_message = message;
}

// Puts items (threads, blocks) in the order of the schedule.
template <class T>
void arrange(std::vector<T>& items) {
  Runtime& rt = runtime();
  if (rt.schedule == Schedule::reverse) std::reverse(items.begin(), items.end());
  if (rt.schedule == Schedule::shuffled) std::shuffle(items.begin(), items.end(), rt.random);
}

}  // namespace gpu_emu

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace gpu_emu {

inline Fiber& current() { return runtime().fibers[threadIdx.x]; }

extern "C" char __executable_start[], _end[];  // the program image (the linker's symbols)

template <class P>
inline P* note_access(P* p, const char* file, int line) {
  Runtime& rt = runtime();
  const auto at = reinterpret_cast<const char*>(p);
  if (rt.count_banks && at >= __executable_start && at < _end) {
    const char* base = std::strrchr(file, '/');
    rt.notes[threadIdx.x].push_back({base ? base + 1 : file, line, uintptr_t(at), int(sizeof(P))});
  }
  return p;
}

// Counts the accesses the lanes of warp [w0, w1) noted since it last met, and forgets them.
inline void count_warp_accesses(unsigned w0, unsigned w1) {
  Runtime& rt = runtime();
  if (!rt.count_banks) return;
  // (file, line, n): the n-th access a lane made at that line -> (lane, address, bytes)
  std::map<std::tuple<const char*, int, int>, std::vector<std::tuple<unsigned, uintptr_t, int>>> warp_wide;
  for (unsigned t = w0; t < w1; ++t) {
    std::map<std::pair<const char*, int>, int> seen;
    for (const Access& a : rt.notes[t])
      warp_wide[{a.file, a.line, seen[{a.file, a.line}]++}].emplace_back(t - w0, a.addr, a.bytes);
    rt.notes[t].clear();
  }
  for (const auto& [key, lanes] : warp_wide) {
    const unsigned per_phase = 128u / unsigned(std::max(4, std::get<2>(lanes.front())));
    std::map<unsigned, std::map<unsigned, std::vector<uintptr_t>>> phases;  // phase -> bank -> words
    for (const auto& [lane, addr, bytes] : lanes)
      for (uintptr_t word = addr / 4; word <= (addr + uintptr_t(bytes) - 1) / 4; ++word) {
        std::vector<uintptr_t>& words = phases[lane / per_phase][unsigned(word % 32)];
        if (std::find(words.begin(), words.end(), word) == words.end()) words.push_back(word);
      }
    BankCount& c = rt.banks[{rt.kernel, std::get<0>(key), std::get<1>(key)}];
    ++c.accesses;
    for (const auto& [phase, banks] : phases) {
      size_t most = 1;
      for (const auto& [bank, words] : banks) most = std::max(most, words.size());
      c.wavefronts += int64_t(most), ++c.ideal;
    }
  }
}

inline void wait(Wait why) {
  Runtime& rt = runtime();
  Fiber& f = current();
  f.wait = why;
  ++rt.switches;
  switch_context(f.context, rt.scheduler);
}

[[noreturn]] inline void fiber_entry() {
  Runtime& rt = runtime();
  rt.body(rt.body_arg);
  Fiber& f = current();
  f.wait = Wait::done;
  switch_context(f.context, rt.scheduler);  // never resumed
  std::abort();
}

// Lane `threadIdx.x ^ mask` of the same warp; every lane of the warp must call it.
inline float shuffle_xor(float x, unsigned mask) {
  Runtime& rt = runtime();
  const unsigned t = threadIdx.x, lane = t % kWarp;
  if ((lane ^ mask) >= kWarp) {
    std::fprintf(stderr, "gpu emulator: shuffle mask %u leaves the warp\n", mask);
    std::abort();
  }
  rt.exchange[t] = x;
  wait(Wait::warp);  // every lane has written
  const float y = rt.exchange[t ^ mask];
  wait(Wait::warp);  // every lane has read before anyone writes again
  return y;
}

// ---- Matrix instructions ---------------------------------------------------------------------
// Operands are 16-bit values already (the tile layer rounds when it loads); their products are
// exact in fp32 (8 x 8 or 11 x 11 significant bits, barring over- or underflow), and D = C + the
// 16 products added one by one in fp32, in increasing k. The hardware adds in an order (and, on
// NVIDIA, with an internal alignment) of its own, so sums that round may differ in the last bits
// from this; sums whose partial sums are all exact in fp32 (as in the tests) agree bit for bit.

// Element i (low to high) of a register array of 16-bit values, as a float.
inline float matrix_element(const uint32_t* regs, int i, bool bf16) {
  const uint16_t bits = uint16_t(regs[i / 2] >> (16 * (i % 2)));
  if (bf16) {
    float x;
    const uint32_t u = uint32_t(bits) << 16;
    std::memcpy(&x, &u, 4);
    return x;
  }
  return float(__builtin_bit_cast(_Float16, bits));
}

// Every lane of the warp deposits its registers; returns the warp's lane 0 slot (a collective:
// every lane must call it, then matrix_done()).
inline const MatrixRegs* matrix_gather(const uint32_t* a, int na, const uint32_t* b, int nb) {
  Runtime& rt = runtime();
  MatrixRegs& mine = rt.matrix[threadIdx.x];
  for (int r = 0; r < na; ++r) mine.a[r] = a[r];
  for (int r = 0; r < nb; ++r) mine.b[r] = b[r];
  wait(Wait::warp);  // every lane has written
  return &rt.matrix[threadIdx.x - threadIdx.x % kWarp];
}
inline void matrix_done() { wait(Wait::warp); }  // every lane has read before anyone writes again

inline float dot16(float c, const float (&a)[16], const float* b, int stride) {
  for (int k = 0; k < 16; ++k) c += a[k] * b[k * stride];  // (exact products: fused or not, the same)
  return c;
}

#if !defined(ARWKV_HIP)
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: d = A B + c for the calling lane's 4
// elements of C / D. Lane layouts as the PTX ISA gives them ("Matrix Fragments for mma.m16n8k16
// with floating point type"), groupID = lane >> 2, threadID_in_group = lane % 4:
//   A (16 x 16) a0..a7: row groupID for a0, a1, a4, a5, else groupID + 8;
//                       col threadID_in_group * 2 + (i & 1), + 8 for a4..a7
//   B (16 x 8)  b0..b3: row threadID_in_group * 2 + (i & 1), + 8 for b2, b3;  col groupID
//   C, D (16 x 8) c0..c3: row groupID for c0, c1, else groupID + 8;  col threadID_in_group * 2 + (i & 1)
inline void mma_m16n8k16(bool bf16, const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  const MatrixRegs* warp = matrix_gather(a, 4, b, 2);
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int group = lane >> 2, tig = lane % 4;
    for (int i = 0; i < 8; ++i) {
      const int row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
      const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = matrix_element(warp[lane].a, i, bf16);
    }
    for (int i = 0; i < 4; ++i) B[tig * 2 + (i & 1) + (i >= 2 ? 8 : 0)][group] = matrix_element(warp[lane].b, i, bf16);
  }
  const int lane = int(threadIdx.x % kWarp), group = lane >> 2, tig = lane % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = i < 2 ? group : group + 8, col = tig * 2 + (i & 1);
    out[i] = dot16(c[i], A[row], &B[0][col], 8);
  }
  matrix_done();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}
#else
// v_mfma_f32_16x16x16bf16_1k / v_mfma_f32_16x16x16f16 on a 64-lane wave: d = A B + c for the
// calling lane's 4 elements of C / D. Layouts as AMD's Matrix Instruction Calculator prints them
// for CDNA3 (--register-layout), element to (lane, item), item i of a lane being bits
// [16 i % 32 + 15 : 16 i % 32] of its register i / 2 for A and B, its register i for C / D:
//   A[m][k]: lane m + 16 * (k / 4), item k % 4
//   B[k][n]: lane n + 16 * (k / 4), item k % 4
//   C[m][n], D[m][n]: lane n + 16 * (m / 4), item m % 4
inline void mfma_f32_16x16x16(bool bf16, const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  const MatrixRegs* wave = matrix_gather(a, 2, b, 2);
  float A[16][16], B[16][16];
  for (int m = 0; m < 16; ++m)
    for (int k = 0; k < 16; ++k) {
      A[m][k] = matrix_element(wave[m + 16 * (k / 4)].a, k % 4, bf16);
      B[k][m] = matrix_element(wave[m + 16 * (k / 4)].b, k % 4, bf16);  // (here m is the column n)
    }
  const int lane = int(threadIdx.x % kWarp);
  float out[4];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n)
      if (lane == n + 16 * (m / 4)) out[m % 4] = dot16(c[m % 4], A[m], &B[0][n], 16);
  matrix_done();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}
#endif

// Runs one block of `threads` fibers to completion; returns false (with runtime().error) on a
// deadlock: threads waiting on a barrier that the others never reach.
inline bool run_block(unsigned threads) {
  Runtime& rt = runtime();
  constexpr size_t kStack = 256 * 1024;
  if (rt.stacks.size() < threads) rt.stacks.resize(threads, std::vector<char>(kStack));
  rt.fibers.assign(threads, Fiber{});
  rt.exchange.assign(threads, 0.f);
  rt.matrix.assign(threads, MatrixRegs{});
  rt.notes.assign(threads, {});
  rt.order.resize(threads);
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = rt.fibers[t];
    make_context(f.context, rt.stacks[t].data(), kStack, fiber_entry);
  }
  for (;;) {
    for (unsigned t = 0; t < threads; ++t) rt.order[t] = int(t);
    arrange(rt.order);
    // Shuffled: besides the order, each round holds back a random half of the warps, so warps
    // drift apart as they may on a GPU (where only a barrier keeps them together).
    std::vector<char>& held = rt.held;
    held.assign((threads + kWarp - 1) / kWarp, 0);
    if (rt.schedule == Schedule::shuffled) {
      bool any_runs = false;
      for (unsigned t = 0; t < threads; t += kWarp) {
        held[t / kWarp] = rt.random() % 2;
        for (unsigned l = t; l < std::min(threads, t + kWarp); ++l)
          any_runs = any_runs || (!held[t / kWarp] && rt.fibers[l].wait == Wait::none);
      }
      if (!any_runs) held.assign(held.size(), 0);
    }
    for (int t : rt.order) {
      if (rt.fibers[t].wait != Wait::none || held[t / kWarp]) continue;
      threadIdx = dim3(unsigned(t));
      switch_context(rt.scheduler, rt.fibers[t].context);
    }
    // Release the barriers every participant has reached.
    unsigned done = 0, at_block = 0;
    for (unsigned w0 = 0; w0 < threads; w0 += kWarp) {
      const unsigned w1 = std::min(threads, w0 + kWarp);
      bool all_at_warp = true;
      for (unsigned t = w0; t < w1; ++t) {
        const Wait x = rt.fibers[t].wait;
        done += x == Wait::done, at_block += x == Wait::block;
        all_at_warp = all_at_warp && x == Wait::warp;
      }
      if (all_at_warp) {
        count_warp_accesses(w0, w1);
        for (unsigned t = w0; t < w1; ++t) rt.fibers[t].wait = Wait::none;
      }
    }
    if (done == threads || at_block == threads)
      for (unsigned w0 = 0; w0 < threads; w0 += kWarp) count_warp_accesses(w0, std::min(threads, w0 + kWarp));
    if (done == threads) return true;
    if (at_block == threads)
      for (auto& f : rt.fibers) f.wait = Wait::none;
    bool runnable = false;
    for (auto& f : rt.fibers) runnable = runnable || f.wait == Wait::none;
    if (!runnable) {
      rt.error = "deadlock in block (" + std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) +
                 ", " + std::to_string(blockIdx.z) + "): " + std::to_string(done) + " of " +
                 std::to_string(threads) + " threads exited, " + std::to_string(at_block) +
                 " wait at __syncthreads, the rest at a shuffle or matrix product";
      return false;
    }
  }
}

// kernel<<<grid, block>>>(args...): every block in turn, its threads as fibers (`name`: what the
// launcher calls it, for the bank-conflict counts).
template <class... Params, class... Args>
void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) {
  Runtime& rt = runtime();
  rt.kernel = name;
  if (!rt.error.empty()) return;
  if (rt.fail_countdown > 0 && --rt.fail_countdown == 0) {
    rt.error = rt.fail_message;
    return;
  }
  if (block.y != 1 || block.z != 1 || block.x % kWarp != 0) {
    rt.error = "the emulator runs 1-D blocks of whole warps only";
    return;
  }
  struct Call {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Args>...> args;
  } call{kernel, std::tuple<std::decay_t<Args>...>(std::forward<Args>(args)...)};
  rt.body = [](void* c) {
    auto* k = static_cast<Call*>(c);
    std::apply(k->kernel, k->args);
  };
  rt.body_arg = &call;
  gridDim = grid, blockDim = block;
  // Blocks in the order of the schedule too: `__shared__` is a static that keeps the previous
  // block's contents, so a block that reads shared memory it did not write reads another
  // block's data, and differently in each order.
  std::vector<dim3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.emplace_back(x, y, z);
  arrange(blocks);
  for (const dim3& b : blocks) {
    blockIdx = b;
    if (!run_block(block.x)) return;
  }
}

// The launch error since the last call (null when none), cleared like cudaGetLastError.
inline const char* take_error() {
  static std::string taken;
  Runtime& rt = runtime();
  if (rt.error.empty()) return nullptr;
  taken = rt.error;
  rt.error.clear();
  return taken.c_str();
}

}  // namespace gpu_emu

// Shuffles in both spellings (the compat header uses one or the other).
inline float __shfl_xor_sync(unsigned mask, float x, int lane_mask) {
  if (mask != 0xffffffffu) {
    std::fprintf(stderr, "gpu emulator: partial-warp shuffle masks are not emulated\n");
    std::abort();
  }
  return gpu_emu::shuffle_xor(x, unsigned(lane_mask));
}
inline float __shfl_xor(float x, int lane_mask) { return gpu_emu::shuffle_xor(x, unsigned(lane_mask)); }
inline void __syncthreads() { gpu_emu::wait(gpu_emu::Wait::block); }
