// The CUDA execution model on the CPU, for the emulation test of csrc/cuda/ (see ../README.md).
//
// Force-included (g++ -include) into every .cu file that emu_prep.py rewrote, and used by the
// harness. A launch runs its blocks one after another (forward, reverse or shuffled order);
// a block runs each CUDA thread as a fiber (own stack) that the scheduler resumes until its
// next __syncthreads(), in forward, reverse or shuffled order per phase, so code that needs a
// barrier it lacks reads poison or stale data. It fails loudly (emu::fail, reported by the
// harness) on: divergent barriers (threads exit or wait at different __syncthreads() calls),
// invalid launch configurations, shared memory over the 48 KB default limit or written past
// its dynamic size, and, through ../fake/mma.h, misaligned WMMA pointers, bad ldm and lanes of
// a warp that disagree on a WMMA operation.
//
// It does not model timing, memory coherence between blocks that run concurrently on a GPU,
// warp-synchronous programming (__shfl*, __syncwarp, atomics beyond a plain read-modify-write:
// using them is a compile error until this file emulates them), or the hardware's rounding
// inside tensor-core sums.
#pragma once

#include <sys/mman.h>
#include <unistd.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3() = default;
  constexpr dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {

constexpr unsigned kWarp = 32;
constexpr unsigned kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kSmemLimit = 48 * 1024;  // without cudaFuncSetAttribute (not emulated)
constexpr size_t kDynSmemGuard = 256;

enum class Order { kForward, kReverse, kShuffle };

struct Options {
  Order threads = Order::kShuffle;  // resume order of the threads of a block, per phase
  Order blocks = Order::kShuffle;   // order of the blocks of a launch
  uint64_t seed = 1;
};
inline Options options;
inline std::mt19937_64 rng(1);

// ---------------------------------------------------------------------------- errors
// The first error of a kernel call, with where it happened; the harness reports and clears it.
inline std::string error_text;
inline std::string kernel_now;   // the kernel being launched
inline long long block_now = -1;
inline int thread_now = -1;

inline bool has_error() { return !error_text.empty(); }
inline std::string take_error() {
  std::string e;
  e.swap(error_text);
  return e;
}
inline void fail(const std::string& what) {
  if (has_error()) return;
  std::ostringstream s;
  s << what;
  if (!kernel_now.empty()) {
    s << " [kernel " << kernel_now;
    if (block_now >= 0) s << ", block " << block_now;
    if (thread_now >= 0) s << ", thread " << thread_now;
    s << "]";
  }
  error_text = s.str();
}

// ---------------------------------------------------------------------------- launch sites
// Every kernel instantiation that a launch expression compiled registers itself before main
// (Site<F>::id), so the harness can list instantiations that no test launched.
struct SiteInfo {
  std::string name;
  long long launches = 0;
};
inline std::vector<SiteInfo>& sites() {
  static std::vector<SiteInfo> s;
  return s;
}
inline int register_site(const std::string& name) {
  sites().push_back({name, 0});
  return static_cast<int>(sites().size()) - 1;
}
inline std::string tidy_name(std::string s) {
  for (const char* junk : {"miss_ext::cuda::", "(anonymous namespace)::", "{anonymous}::", "c10::",
                           "miss_ext::"}) {
    for (size_t p; (p = s.find(junk)) != std::string::npos;) s.erase(p, strlen(junk));
  }
  return s;
}
template <auto F>
std::string kernel_name() {
  // "... [with auto F = ns::kernel<float, 4, false>; std::string = ...]"
  std::string s = __PRETTY_FUNCTION__;
  size_t b = s.find("F = ");
  if (b == std::string::npos) return s;
  b += 4;
  if (s[b] == '&') ++b;  // clang spells the pointer
  int depth = 0;
  size_t e = b;
  for (; e < s.size(); ++e) {
    if (s[e] == '<' || s[e] == '(') ++depth;
    if (s[e] == '>' || s[e] == ')') --depth;
    if (depth == 0 && (s[e] == ';' || s[e] == ']')) break;
  }
  return tidy_name(s.substr(b, e - b));
}
template <auto F>
struct Site {
  static inline const int id = register_site(kernel_name<F>());
};

// ---------------------------------------------------------------------------- contexts
// x86-64: a minimal switch (emu_switch.cpp) that saves the callee-saved registers and the FP
// control words, without the two signal-mask system calls of swapcontext per switch. Other
// machines: ucontext.
#if defined(__x86_64__)
extern "C" void emu_switch_context(void** save_sp, void* load_sp);
struct Context {
  void* sp = nullptr;
};
inline void switch_context(Context& from, Context& to) { emu_switch_context(&from.sp, to.sp); }
// A context that starts fn (which must never return) on the stack [stack, stack + size).
inline void make_context(Context& c, char* stack, size_t size, void (*fn)()) {
  uint64_t* p = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t(15));
  *--p = 0;                                // fn's return address: it never returns
  *--p = reinterpret_cast<uint64_t>(fn);   // where emu_switch_context's ret lands
  for (int i = 0; i < 6; ++i) *--p = 0;    // rbp, rbx, r12-r15
  uint32_t csr[2] = {0, 0};
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(csr[0]), "=m"(csr[1]));
  --p;
  memcpy(p, csr, sizeof csr);
  c.sp = p;
}
#else
struct Context {
  ucontext_t uc;
  bool made = false;
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void make_context(Context& c, char* stack, size_t size, void (*fn)()) {
  if (!c.made) getcontext(&c.uc);
  c.made = true;
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, fn, 0);
}
#endif

// ---------------------------------------------------------------------------- fibers
struct Fiber {
  Context ctx;
  char* stack = nullptr;  // usable bytes, above one PROT_NONE page that stops an overflow
  enum State { kReady, kAtBarrier, kDone } state = kReady;
  unsigned tid = 0;
  const char* bar_file = nullptr;
  int bar_line = 0;
  unsigned wmma_seq = 0;  // WMMA calls so far in this block (see warp_record)
#ifdef EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

inline Fiber* fibers() {
  // A saved ucontext_t points into itself, so fibers never move: one fixed array.
  static std::unique_ptr<Fiber[]> f(new Fiber[kMaxThreads]);
  return f.get();
}
inline Context sched_ctx;
inline int cur = -1;  // running fiber, -1 on the scheduler
inline std::function<void()> body;
inline dim3 g_block_idx, g_block_dim, g_grid_dim;
inline long long launches = 0, barriers = 0;
#ifdef EMU_ASAN
inline const void* sched_stack_bottom = nullptr;
inline size_t sched_stack_size = 0;
inline void* sched_fake_stack = nullptr;
#endif

inline void to_scheduler(bool finished) {
  Fiber& f = fibers()[cur];
  cur = -1;
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(finished ? nullptr : &f.fake_stack, sched_stack_bottom, sched_stack_size);
#else
  (void)finished;
#endif
  switch_context(f.ctx, sched_ctx);
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &sched_stack_bottom, &sched_stack_size);
#endif
}

inline void fiber_entry() {
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &sched_stack_bottom, &sched_stack_size);
#endif
  try {
    body();
  } catch (const std::exception& e) {
    fail(std::string("exception in device code: ") + e.what());
  }
  for (;;) {  // a finished fiber is never resumed; its context is remade for the next block
    fibers()[cur].state = Fiber::kDone;
    to_scheduler(true);
  }
}

inline void to_fiber(unsigned i) {
  Fiber& f = fibers()[i];
  cur = static_cast<int>(i);
  thread_now = static_cast<int>(i);
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(&sched_fake_stack, f.stack, kStackBytes);
#endif
  switch_context(sched_ctx, f.ctx);
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(sched_fake_stack, nullptr, nullptr);
#endif
  thread_now = -1;
}

inline void prepare_fiber(unsigned i) {
  Fiber& f = fibers()[i];
  if (!f.stack) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
      perror("emu: mmap of a fiber stack");
      abort();
    }
    mprotect(m, page, PROT_NONE);
    f.stack = static_cast<char*>(m) + page;
  }
#ifdef EMU_ASAN
  // The frames of the fiber's last run are dead; their redzones must not outlive them.
  __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
  make_context(f.ctx, f.stack, kStackBytes, fiber_entry);
  f.tid = i;
  f.state = Fiber::kReady;
  f.bar_file = nullptr;
  f.bar_line = 0;
  f.wmma_seq = 0;
}

template <class V>
void apply_order(V& v, Order o) {
  if (o == Order::kReverse) std::reverse(v.begin(), v.end());
  if (o == Order::kShuffle) std::shuffle(v.begin(), v.end(), rng);
}

// ---------------------------------------------------------------------------- shared memory
// Static __shared__ arrays become function statics (emu_prep.py) that register here; the first
// thread of a block to reach the declaration poisons the array (0xFF bytes: NaN in every
// floating type), so nothing survives from an earlier block or launch.
struct SmemArray {
  void* p;
  size_t n;
  unsigned long long epoch;
};
inline std::vector<SmemArray> smem_arrays;
inline unsigned long long block_epoch = 0;
inline size_t block_static_smem = 0;
inline unsigned char* dyn_smem_ptr = nullptr;
inline size_t dyn_smem_bytes = 0;

inline void check_smem_total() {
  if (block_static_smem + dyn_smem_bytes > kSmemLimit) {
    fail("shared memory: " + std::to_string(block_static_smem) + " B static + " +
         std::to_string(dyn_smem_bytes) + " B dynamic exceeds the 48 KB per-block limit");
  }
}
inline void shared_array(void* p, size_t n) {
  for (auto& a : smem_arrays) {
    if (a.p == p) {
      if (a.epoch != block_epoch) {
        a.epoch = block_epoch;
        memset(p, 0xFF, n);
        block_static_smem += n;
        check_smem_total();
      }
      return;
    }
  }
  smem_arrays.push_back({p, n, block_epoch});
  memset(p, 0xFF, n);
  block_static_smem += n;
  check_smem_total();
}
inline unsigned char* dyn_smem() { return dyn_smem_ptr; }

// ---------------------------------------------------------------------------- warps and WMMA
// A WMMA operation is collective: all 32 lanes of a warp call it with the same arguments. Each
// emulated lane computes the whole 16x16 fragment; the first lane to reach its n-th WMMA call
// of a block records it and the other lanes must match it (pointer, ldm, layout, data), which
// also lets them reuse the first lane's product instead of recomputing it.
struct WarpRecord {
  int kind = 0;
  const void* ptr = nullptr;
  unsigned ld = 0;
  int layout = 0;
  float in[3][256];
  float out[256];
};
// Records of the current phase only (warp_base: calls made before it), so memory stays bounded.
inline std::vector<std::vector<WarpRecord>> warp_records;
inline std::vector<size_t> warp_used, warp_base;

inline WarpRecord& warp_record(int kind, bool& first) {
  Fiber& f = fibers()[cur];
  const unsigned w = f.tid / kWarp;
  auto& recs = warp_records[w];
  const size_t s = f.wmma_seq++, k = s - warp_base[w];
  if (s == warp_used[w]) {
    if (recs.size() == k) recs.emplace_back();
    ++warp_used[w];
    first = true;
    recs[k].kind = kind;
    return recs[k];
  }
  first = false;
  if (recs[k].kind != kind) fail("WMMA: the lanes of warp " + std::to_string(w) + " run different WMMA operations (a divergent warp)");
  return recs[k];
}

// Every lane of a warp must have made the same WMMA calls by a barrier or the block's end.
inline void check_warps(unsigned nthreads, bool at_barrier) {
  for (unsigned i = 0; i < nthreads && !has_error(); ++i) {
    if (fibers()[i].wmma_seq != warp_used[i / kWarp]) {
      fail("WMMA: lane " + std::to_string(i % kWarp) + " of warp " + std::to_string(i / kWarp) + " made " +
           std::to_string(fibers()[i].wmma_seq) + " WMMA calls, another lane " +
           std::to_string(warp_used[i / kWarp]) + (at_barrier ? " by the same barrier" : "") + " (a divergent warp)");
    }
  }
  for (size_t w = 0; w < warp_used.size(); ++w) {
    warp_base[w] = warp_used[w];
    warp_records[w].clear();
  }
}

// ---------------------------------------------------------------------------- blocks
inline void syncthreads(const char* file, int line) {
  if (cur < 0) {
    fail("__syncthreads() outside a kernel");
    return;
  }
  ++barriers;
  Fiber& f = fibers()[cur];
  f.state = Fiber::kAtBarrier;
  f.bar_file = file;
  f.bar_line = line;
  to_scheduler(false);
}

inline void run_block(unsigned nthreads) {
  for (unsigned i = 0; i < nthreads; ++i) prepare_fiber(i);
  ++block_epoch;
  block_static_smem = 0;
  if (dyn_smem_ptr) memset(dyn_smem_ptr, 0xFF, dyn_smem_bytes + kDynSmemGuard);
  const unsigned nwarps = (nthreads + kWarp - 1) / kWarp;
  if (warp_records.size() < nwarps) warp_records.resize(nwarps);
  warp_used.assign(nwarps, 0);
  warp_base.assign(nwarps, 0);

  std::vector<unsigned> order(nthreads);
  for (unsigned i = 0; i < nthreads; ++i) order[i] = i;
  for (;;) {
    apply_order(order, options.threads);
    for (unsigned i : order) {
      if (fibers()[i].state == Fiber::kReady) to_fiber(i);
    }
    unsigned waiting = 0, done = 0;
    const Fiber* first_waiting = nullptr;
    bool same_site = true;
    for (unsigned i = 0; i < nthreads; ++i) {
      const Fiber& f = fibers()[i];
      if (f.state == Fiber::kDone) {
        ++done;
      } else {
        ++waiting;
        if (!first_waiting) {
          first_waiting = &f;
        } else if (f.bar_line != first_waiting->bar_line || strcmp(f.bar_file, first_waiting->bar_file) != 0) {
          same_site = false;
        }
      }
    }
    if (done == nthreads) break;
    if (done > 0 || !same_site) {
      fail(done > 0 ? "divergent __syncthreads(): " + std::to_string(done) + " threads exited while " +
                          std::to_string(waiting) + " wait at " + first_waiting->bar_file + ":" +
                          std::to_string(first_waiting->bar_line)
                    : std::string("divergent __syncthreads(): threads wait at different barriers"));
      // The waiting fibers are abandoned; their contexts are remade for the next block.
      break;
    }
    check_warps(nthreads, true);
    for (unsigned i = 0; i < nthreads; ++i) fibers()[i].state = Fiber::kReady;
  }
  if (!has_error()) check_warps(nthreads, false);
  if (dyn_smem_ptr) {
    for (size_t i = 0; i < kDynSmemGuard; ++i) {
      if (dyn_smem_ptr[dyn_smem_bytes + i] != 0xFF) {
        fail("dynamic shared memory written past its " + std::to_string(dyn_smem_bytes) + " B");
        break;
      }
    }
  }
}

// ---------------------------------------------------------------------------- launches
struct Config {
  dim3 grid, block;
  size_t smem = 0;
  std::string bad;  // why the configuration is invalid, empty when valid
};

template <class T>
dim3 to_dim3(const T& v, bool is_grid, std::string& bad) {
  if constexpr (std::is_same_v<std::decay_t<T>, dim3>) {
    return v;
  } else {
    static_assert(std::is_integral_v<T>, "grid/block must be dim3 or an integer");
    const long long n = static_cast<long long>(v);
    const long long hi = is_grid ? INT_MAX : kMaxThreads;
    if (n < 1 || n > hi) bad = std::string(is_grid ? "grid" : "block") + " size " + std::to_string(n) + " out of range";
    return dim3(static_cast<unsigned>(n));
  }
}
template <class G, class B>
Config cfg(const G& g, const B& b) {
  Config c;
  c.grid = to_dim3(g, true, c.bad);
  c.block = to_dim3(b, false, c.bad);
  return c;
}
template <class G, class B, class S>
Config cfg(const G& g, const B& b, const S& smem) {
  Config c = cfg(g, b);
  static_assert(std::is_integral_v<S>, "dynamic shared memory size must be an integer");
  if (static_cast<long long>(smem) < 0) c.bad = "negative dynamic shared memory size";
  c.smem = static_cast<size_t>(smem);
  return c;
}
template <class G, class B, class S, class Stream>
Config cfg(const G& g, const B& b, const S& smem, const Stream&) {
  return cfg(g, b, smem);
}

template <class Fn>
struct KernelParams;
template <class... P>
struct KernelParams<void (*)(P...)> {
  // Arguments are converted to the kernel's parameter types once, at launch, as CUDA does.
  using type = std::tuple<std::decay_t<P>...>;
};

template <auto F, class... A>
void launch(const Config& c, A&&... args) {
  static_assert(std::is_same_v<decltype(F(std::declval<A>()...)), void>, "kernels return void");
  const int site = Site<F>::id;
  ++sites()[site].launches;
  ++launches;
  if (has_error()) return;  // an earlier error in this kernel call stops it, as a sticky CUDA error
  kernel_now = sites()[site].name;
  block_now = -1;
  const dim3 g = c.grid, b = c.block;
  std::string bad = c.bad;
  const unsigned long long nthreads = 1ull * b.x * b.y * b.z;
  if (bad.empty() && (b.x > kMaxThreads || b.y > kMaxThreads || b.z > 64 || nthreads > kMaxThreads || nthreads == 0)) bad = "block dimensions out of range";
  if (bad.empty() && (g.x < 1 || g.x > INT_MAX || g.y < 1 || g.y > 65535 || g.z < 1 || g.z > 65535)) bad = "grid dimensions out of range";
  if (bad.empty() && c.smem > kSmemLimit) bad = "dynamic shared memory " + std::to_string(c.smem) + " B exceeds 48 KB";
  if (!bad.empty()) {
    fail("invalid launch configuration: " + bad);
    kernel_now.clear();
    return;
  }
  typename KernelParams<decltype(F)>::type params(std::forward<A>(args)...);
  body = [&params] { std::apply(F, params); };

  // Dynamic shared memory: 16- but never 32-byte aligned, so a kernel that assumes more than
  // the 16 bytes CUDA guarantees fails; a poisoned guard zone behind it catches overruns.
  std::vector<unsigned char> buf(c.smem + kDynSmemGuard + 64);
  uintptr_t p = (reinterpret_cast<uintptr_t>(buf.data()) + 15) & ~uintptr_t(15);
  if (p % 32 == 0) p += 16;
  dyn_smem_ptr = reinterpret_cast<unsigned char*>(p);
  dyn_smem_bytes = c.smem;
  g_grid_dim = g;
  g_block_dim = b;

  const unsigned long long nblocks = 1ull * g.x * g.y * g.z;
  std::vector<unsigned long long> order(nblocks);
  for (unsigned long long i = 0; i < nblocks; ++i) order[i] = i;
  apply_order(order, options.blocks);
  for (unsigned long long bi : order) {
    g_block_idx = dim3(static_cast<unsigned>(bi % g.x), static_cast<unsigned>(bi / g.x % g.y),
                       static_cast<unsigned>(bi / (1ull * g.x * g.y)));
    block_now = static_cast<long long>(bi);
    run_block(static_cast<unsigned>(nthreads));
    if (has_error()) break;
  }
  body = nullptr;
  dyn_smem_ptr = nullptr;
  dyn_smem_bytes = 0;
  kernel_now.clear();
  block_now = -1;
}

inline dim3 thread_idx() {
  const unsigned t = fibers()[cur].tid;
  return dim3(t % g_block_dim.x, t / g_block_dim.x % g_block_dim.y, t / (g_block_dim.x * g_block_dim.y));
}

[[noreturn]] inline void trap() {
  fail("__trap() in device code");
  fprintf(stderr, "emu: %s\n", error_text.c_str());
  abort();
}

template <class T>
T atomic_add(T* p, T v) {  // fibers never interleave inside an expression
  T old = *p;
  *p = static_cast<T>(old + v);
  return old;
}

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::g_block_idx)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)
#define warpSize 32
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __fmul_rn(a, b) ((a) * (b))
#define __dmul_rn(a, b) ((a) * (b))
#define __ldg(p) (*(p))
#define __trap() ::emu::trap()
#define atomicAdd(p, v) ::emu::atomic_add((p), (v))
