// The SIMT harness's runtime: fibers, the block scheduler, warp collectives, checked shared
// memory, guard-paged global buffers and the fault handler. See simt.h for the model.
#include "simt.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <unordered_map>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace fl_simt {

ThreadCtx* g_ctx = nullptr;

namespace {

constexpr size_t kPage = 4096;
// Inaccessible address space reserved on each side of every guarded buffer: an element index
// of any type up to 8 bytes that went wrong in 32 bits (a 64-bit offset truncated, a sign
// flipped) lands within 2^31 elements = 16 GiB of its buffer's start, so in the buffer's own
// reserve, and faults there however large the true offset was (reserved, never touched:
// address space only).
constexpr size_t kReach = size_t(16) << 30;
constexpr size_t kStackBytes = 128 * 1024;  // per emulated thread, plus a guard page
constexpr int kMaxThreads = 1024;
constexpr size_t kMaxSharedBytes = 48 * 1024;  // static + dynamic, per block (no opt-in)

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ---------------------------------------------------------------------------------------------
// Context switching: a few lines of assembly on x86-64 (no signal-mask system call, unlike
// swapcontext), ucontext elsewhere.
struct Fiber;
extern "C" void fl_simt_fiber_main(Fiber* f);

#if defined(__x86_64__)
extern "C" void fl_simt_switch(void** save_sp, void* load_sp);
extern "C" void fl_simt_trampoline();
asm(R"(
  .text
  .p2align 4
  .globl fl_simt_switch
  .hidden fl_simt_switch
  .type fl_simt_switch, @function
fl_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fl_simt_switch, .-fl_simt_switch

  .p2align 4
  .globl fl_simt_trampoline
  .hidden fl_simt_trampoline
  .type fl_simt_trampoline, @function
fl_simt_trampoline:
  movq %r12, %rdi
  call fl_simt_fiber_main@PLT
  ud2
  .size fl_simt_trampoline, .-fl_simt_trampoline
)");
#endif

struct Context {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

inline void switch_context(Context* from, Context* to) {
#if defined(__x86_64__)
  fl_simt_switch(&from->sp, to->sp);
#else
  swapcontext(&from->uc, &to->uc);
#endif
}

// ---------------------------------------------------------------------------------------------
enum class State { Runnable, AtBarrier, AtWarp, Done };

struct Fiber {
  Context ctx;
  char* stack = nullptr;  // lowest address, the guard page
  ThreadCtx tc;
  int linear = 0, warp = 0, lane = 0;
  State state = State::Runnable;
};

struct Waiter {
  Fiber* f;
  unsigned mask;    // lanes it waits for
  uint32_t target;  // until each has published this many phases
};

struct WarpState {
  uint64_t slot[32];
  uint32_t seq[32];  // phases published by each lane: 2 per collective
  unsigned mask[32];
  int kind[32];
  std::vector<Waiter> waiting;

  bool reached(unsigned m, uint32_t target) const {
    for (int i = 0; i < 32; ++i)
      if (((m >> i) & 1u) && seq[i] < target) return false;
    return true;
  }
};

struct Shadow {
  int64_t w_epoch = -1, r_epoch = -1;
  int writer = -1, reader = -1;
  bool multi_reader = false;
};

}  // namespace

struct SharedRegion {
  std::string name;
  size_t elem = 1, count = 0;
  std::vector<unsigned char> data;
  std::vector<Shadow> shadow;
};

namespace {

struct Block {
  std::vector<Fiber*> fibers;
  std::vector<WarpState> warps;
  int nthreads = 0;
  int arrived = 0, exited = 0, done = 0;
  int64_t epoch = 0;
  size_t shared_bytes = 0;
  std::unordered_map<int, std::unique_ptr<SharedRegion>> shared;
  std::unique_ptr<SharedRegion> dynamic;
};

struct Launch {
  const char* name = "";
  dim3 grid, block;
  size_t dynamic_smem = 0;
  const std::function<void()>* body = nullptr;
  Block* b = nullptr;
  Fiber* current = nullptr;
  Context sched;
  std::vector<Fiber*> runnable;
  std::mt19937_64 rng;
  bool failed = false;
  std::string error;
  char fault[512] = {0};
};

Launch* g_launch = nullptr;
std::mutex g_launch_mutex;
std::vector<Fiber> g_fibers;  // a pool, with their stacks, reused by every block
std::map<std::string, int64_t> g_log;
uint64_t g_launch_count = 0;

Config g_config = [] {
  Config c;
  const char* s = std::getenv("FUSEDLOSS_SIMT_SEED");
  c.seed = s ? std::strtoull(s, nullptr, 10) : std::random_device{}();
  return c;
}();

std::string where() {
  if (!g_launch || !g_launch->current) return "";
  const ThreadCtx& t = g_launch->current->tc;
  char buf[160];
  std::snprintf(buf, sizeof buf, " [kernel %s, block (%u,%u,%u), thread (%u,%u,%u)]", g_launch->name,
                t.block_idx.x, t.block_idx.y, t.block_idx.z, t.thread_idx.x, t.thread_idx.y,
                t.thread_idx.z);
  return buf;
}

// ---------------------------------------------------------------------------------------------
// Guarded buffers.
struct Guarded {
  char* map;
  size_t map_len;
  char* begin;  // first byte after the leading reserve
  char* end;    // the trailing reserve
  char* data;
  size_t bytes;
  std::string name;
};
std::map<char*, Guarded> g_guarded;  // by data pointer

char* g_altstack = nullptr;
struct sigaction g_old_segv, g_old_bus;

const Guarded* guard_hit(const char* addr) {
  for (const auto& [data, g] : g_guarded) {
    if ((addr >= g.map && addr < g.begin) || (addr >= g.end && addr < g.map + g.map_len)) return &g;
  }
  return nullptr;
}

// The registered buffer closest to addr (for a fault outside every reserve), or null.
const Guarded* nearest_buffer(const char* addr, long long* offset) {
  const Guarded* best = nullptr;
  unsigned long long best_distance = ~0ull;
  for (const auto& [data, g] : g_guarded) {
    const auto a = reinterpret_cast<uintptr_t>(addr), lo = reinterpret_cast<uintptr_t>(g.data);
    const uintptr_t hi = lo + g.bytes;
    const unsigned long long d = a < lo ? lo - a : a >= hi ? a - hi + 1 : 0;
    if (d < best_distance) {
      best_distance = d;
      best = &g;
      *offset = static_cast<long long>(a - lo);
    }
  }
  return best;
}

bool stack_guard_hit(const char* addr) {
  for (const Fiber& f : g_fibers)
    if (f.stack && addr >= f.stack && addr < f.stack + kPage) return true;
  return false;
}

void fault_handler(int sig, siginfo_t* si, void*) {
  const char* addr = static_cast<const char*>(si->si_addr);
  Launch* l = g_launch;
  // Any fault of an emulated thread fails its launch (never the process): in a buffer's
  // reserve, it names that buffer and the offset; elsewhere (an unmapped address: a wild
  // pointer, null plus an offset), the nearest buffer and the offset from it.
  if (l && l->current) {
    long long off = 0;
    if (const Guarded* g = guard_hit(addr)) {
      std::snprintf(l->fault, sizeof l->fault,
                    "out-of-bounds global memory access at byte offset %lld of buffer '%s' "
                    "(%zu bytes)",
                    static_cast<long long>(addr - g->data), g->name.c_str(), g->bytes);
    } else if (stack_guard_hit(addr)) {
      std::snprintf(l->fault, sizeof l->fault, "stack overflow of an emulated thread");
    } else if (const Guarded* n = nearest_buffer(addr, &off)) {
      std::snprintf(l->fault, sizeof l->fault,
                    "global memory access at address %p, outside every registered buffer "
                    "(nearest: byte offset %lld of buffer '%s' (%zu bytes))",
                    static_cast<const void*>(addr), off, n->name.c_str(), n->bytes);
    } else {
      std::snprintf(l->fault, sizeof l->fault,
                    "global memory access at address %p, and no buffer is registered",
                    static_cast<const void*>(addr));
    }
    l->failed = true;
    // Abandon the faulting fiber: back to the scheduler, which fails the launch. SA_NODEFER
    // keeps the signal unblocked although this handler never returns.
    switch_context(&l->current->ctx, &l->sched);
  }
  // Not ours (no emulated thread runs): the previous handler takes the re-raised fault.
  sigaction(sig, sig == SIGSEGV ? &g_old_segv : &g_old_bus, nullptr);
}

void install_fault_handler() {
  if (!g_altstack) {
    stack_t cur;
    sigaltstack(nullptr, &cur);
    if (cur.ss_flags & SS_DISABLE) {
      g_altstack = static_cast<char*>(std::malloc(1 << 16));
      stack_t ss{};
      ss.ss_sp = g_altstack;
      ss.ss_size = 1 << 16;
      sigaltstack(&ss, nullptr);
    } else {
      g_altstack = reinterpret_cast<char*>(1);  // someone (faulthandler) set one up
    }
  }
  struct sigaction sa {};
  sa.sa_sigaction = &fault_handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_old_segv);
  sigaction(SIGBUS, &sa, &g_old_bus);
}

void remove_fault_handler() {
  sigaction(SIGSEGV, &g_old_segv, nullptr);
  sigaction(SIGBUS, &g_old_bus, nullptr);
}

void check_canaries() {
  for (const auto& [data, g] : g_guarded) {
    for (const char* p = g.begin; p < g.end; ++p) {
      if (p == g.data) p += g.bytes;
      if (p >= g.end) break;
      if (static_cast<unsigned char>(*p) != 0xFF) {
        throw Error("write outside buffer '" + g.name + "' (" + std::to_string(g.bytes) +
                    " bytes) at byte offset " + std::to_string(p - g.data));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The scheduler.
void make_runnable(Fiber* f) {
  f->state = State::Runnable;
  g_launch->runnable.push_back(f);
}

// Leaves the running fiber (already queued as runnable or parked as waiting).
void yield_current() {
  Fiber* f = g_launch->current;
  switch_context(&f->ctx, &g_launch->sched);
  g_ctx = &f->tc;  // resumed
}

// Wakes the lanes whose wait is over (not every waiter: a woken lane that would only block
// again costs two context switches).
void wake_warp(WarpState& w) {
  size_t keep = 0;
  for (size_t i = 0; i < w.waiting.size(); ++i) {
    const Waiter& x = w.waiting[i];
    if (w.reached(x.mask, x.target)) make_runnable(x.f);
    else w.waiting[keep++] = x;
  }
  w.waiting.resize(keep);
}

void prepare_fiber(Fiber& f) {
  if (!f.stack) {
    void* m = mmap(nullptr, kStackBytes + kPage, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) throw Error("SIMT harness: cannot map a fiber stack");
    mprotect(m, kPage, PROT_NONE);
    f.stack = static_cast<char*>(m);
  }
#if defined(__x86_64__)
  uintptr_t top = reinterpret_cast<uintptr_t>(f.stack + kPage + kStackBytes) & ~uintptr_t(15);
  uint64_t* s = reinterpret_cast<uint64_t*>(top);
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  s[-1] = 0;
  s[-2] = 0;
  s[-3] = reinterpret_cast<uint64_t>(&fl_simt_trampoline);  // ret lands here, rsp 16-aligned
  s[-4] = 0;                                                  // rbp
  s[-5] = 0;                                                  // rbx
  s[-6] = reinterpret_cast<uint64_t>(&f);                     // r12: the fiber
  s[-7] = s[-8] = s[-9] = 0;                                  // r13 r14 r15
  s[-10] = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
  f.ctx.sp = &s[-10];
#else
  getcontext(&f.ctx.uc);
  f.ctx.uc.uc_stack.ss_sp = f.stack + kPage;
  f.ctx.uc.uc_stack.ss_size = kStackBytes;
  f.ctx.uc.uc_link = nullptr;
  makecontext(&f.ctx.uc, reinterpret_cast<void (*)()>(&fl_simt_fiber_main), 1, &f);
#endif
}

void run_block(Launch& l, const dim3& bidx) {
  Block b;
  const int n = static_cast<int>(l.block.x * l.block.y * l.block.z);
  b.nthreads = n;
  b.fibers.resize(n);
  b.warps.resize((n + 31) / 32);
  for (WarpState& w : b.warps) {
    std::memset(w.seq, 0, sizeof w.seq);
    w.waiting.clear();
  }
  if (l.dynamic_smem) {
    b.dynamic = std::make_unique<SharedRegion>();
    b.dynamic->name = "dynamic shared memory";
    b.dynamic->data.assign(l.dynamic_smem, 0xFF);
    b.dynamic->elem = 1;
    b.dynamic->count = l.dynamic_smem;
    b.dynamic->shadow.assign(l.dynamic_smem, Shadow{});
    b.shared_bytes = l.dynamic_smem;
  }
  l.b = &b;
  l.runnable.clear();
  for (int i = 0; i < n; ++i) {
    Fiber& f = g_fibers[i];
    f.linear = i;
    f.warp = i / 32;
    f.lane = i % 32;
    f.tc.thread_idx = dim3(i % l.block.x, (i / l.block.x) % l.block.y, i / (l.block.x * l.block.y));
    f.tc.block_idx = bidx;
    f.tc.block_dim = l.block;
    f.tc.grid_dim = l.grid;
    prepare_fiber(f);
    b.fibers[i] = &f;
    make_runnable(&f);
  }
  while (!l.runnable.empty() && !l.failed) {
    const size_t k = l.rng() % l.runnable.size();
    Fiber* f = l.runnable[k];
    l.runnable[k] = l.runnable.back();
    l.runnable.pop_back();
    l.current = f;
    g_ctx = &f->tc;
    switch_context(&l.sched, &f->ctx);
  }
  Fiber* cur = l.current;
  l.b = nullptr;
  if (l.failed) {
    l.current = cur;
    std::string msg = l.fault[0] ? std::string(l.fault) + where() : l.error;
    l.current = nullptr;
    throw Error(msg);
  }
  l.current = nullptr;
  if (b.done != n) {
    int at_barrier = 0, at_warp = 0;
    for (Fiber* f : b.fibers) {
      at_barrier += f->state == State::AtBarrier;
      at_warp += f->state == State::AtWarp;
    }
    throw Error(std::string("deadlock in kernel ") + l.name + ": " + std::to_string(at_barrier) +
                " threads wait at __syncthreads, " + std::to_string(at_warp) +
                " in a warp collective, " + std::to_string(b.exited) + " exited");
  }
}

}  // namespace

extern "C" __attribute__((visibility("hidden"))) void fl_simt_fiber_main(Fiber* f) {
  Launch& l = *g_launch;
  try {
    (*l.body)();
  } catch (const std::exception& e) {
    if (!l.failed) {
      l.failed = true;
      l.error = e.what();
    }
  }
  if (!l.failed) {
    Block& b = *l.b;
    f->state = State::Done;
    ++b.exited;
    ++b.done;
    if (b.arrived > 0) {
      l.failed = true;
      l.error = "a thread exited while " + std::to_string(b.arrived) +
                " threads of its block wait at __syncthreads (divergent barrier)" + where();
    }
  }
  switch_context(&f->ctx, &l.sched);
  std::abort();  // never resumed
}

// ---------------------------------------------------------------------------------------------
[[noreturn]] void fail(const std::string& message) { throw Error(message + where()); }

void syncthreads() {
  Launch& l = *g_launch;
  Block& b = *l.b;
  Fiber* f = l.current;
  if (b.exited > 0)
    fail("__syncthreads after " + std::to_string(b.exited) +
         " threads of the block exited (divergent barrier)");
  f->state = State::AtBarrier;
  if (++b.arrived == b.nthreads) {
    b.arrived = 0;
    ++b.epoch;
    for (Fiber* g : b.fibers)
      if (g->state == State::AtBarrier) make_runnable(g);
  }
  yield_current();
}

uint64_t warp_op(unsigned mask, int kind, uint64_t value, int arg, int width) {
  Launch& l = *g_launch;
  Block& b = *l.b;
  Fiber* f = l.current;
  WarpState& w = b.warps[f->warp];
  const int lane = f->lane;
  if (!((mask >> lane) & 1u)) fail("warp intrinsic called by a lane that is not in its mask");
  if (width <= 0 || width > 32 || (width & (width - 1)))
    fail("warp intrinsic width must be a power of two <= 32, got " + std::to_string(width));
  const int lanes_in_warp = std::min(32, b.nthreads - f->warp * 32);
  if (lanes_in_warp < 32 && (mask >> lanes_in_warp) != 0)
    fail("warp intrinsic mask names lanes the block does not have");
  w.slot[lane] = value;
  w.kind[lane] = kind;
  w.mask[lane] = mask;
  const uint32_t my = ++w.seq[lane];
  wake_warp(w);
  while (!w.reached(mask, my)) {
    f->state = State::AtWarp;
    w.waiting.push_back(Waiter{f, mask, my});
    yield_current();
  }
  // Every lane of the mask is now in this very collective (published, or already read).
  // Lanes that executed different numbers of collectives, or a different intrinsic or mask,
  // are divergent warp code: an error here (on the GPU, undefined).
  for (int i = 0; i < 32; ++i) {
    if (!((mask >> i) & 1u)) continue;
    if (w.seq[i] > my + 1 || w.kind[i] != kind || w.mask[i] != mask)
      fail("lanes " + std::to_string(lane) + " and " + std::to_string(i) +
           " of a warp are in different warp intrinsics or masks");
  }
  uint64_t result = value;
  const int group = lane / width * width;
  auto read = [&](int src) -> uint64_t {
    if (!((mask >> src) & 1u)) fail("shuffle reads lane " + std::to_string(src) + ", which is not in the mask");
    return w.slot[src];
  };
  switch (kind) {
    case 0: {  // xor
      const int src = lane ^ arg;
      result = src < group + width ? read(src) : value;
      break;
    }
    case 1: {  // down
      const int src = lane + arg;
      result = src < group + width ? read(src) : value;
      break;
    }
    case 2: {  // up
      const int src = lane - arg;
      result = src >= group ? read(src) : value;
      break;
    }
    case 3:  // idx
      result = read(group + ((arg % width) + width) % width);
      break;
    case 4:
    case 5:
    case 6: {
      uint64_t ballot = 0;
      for (int i = 0; i < 32; ++i)
        if (((mask >> i) & 1u) && w.slot[i]) ballot |= uint64_t(1) << i;
      result = kind == 4 ? ballot : kind == 5 ? ballot != 0 : ballot == mask;
      break;
    }
    default:
      break;
  }
  ++w.seq[lane];
  wake_warp(w);
  while (!w.reached(mask, my + 1)) {
    f->state = State::AtWarp;
    w.waiting.push_back(Waiter{f, mask, my + 1});
    yield_current();
  }
  return result;
}

int new_shared_key() {
  static int next = 0;
  return next++;
}

SharedRegion* block_shared(int key, size_t elem_size, size_t count, const char* name) {
  Block& b = *g_launch->b;
  auto it = b.shared.find(key);
  if (it != b.shared.end()) return it->second.get();
  b.shared_bytes += elem_size * count;
  if (b.shared_bytes > kMaxSharedBytes)
    fail("shared memory of the block exceeds 48 KB (" + std::to_string(b.shared_bytes) + " bytes)");
  auto r = std::make_unique<SharedRegion>();
  r->name = name;
  r->elem = elem_size;
  r->count = count;
  r->data.assign(elem_size * count, 0xFF);
  r->shadow.assign(count, Shadow{});
  SharedRegion* out = r.get();
  b.shared.emplace(key, std::move(r));
  return out;
}

SharedRegion* block_dynamic_shared(size_t elem_size) {
  Block& b = *g_launch->b;
  if (!b.dynamic) fail("dynamic shared memory used, but the launch asked for none");
  if (b.dynamic->elem != elem_size) {
    // Re-typed view of the same bytes: element-granular tracking at the new size.
    b.dynamic->elem = elem_size;
    b.dynamic->count = b.dynamic->data.size() / elem_size;
    b.dynamic->shadow.assign(b.dynamic->count, Shadow{});
  }
  return b.dynamic.get();
}

size_t shared_count(const SharedRegion* r) { return r->count; }

namespace {
Shadow& checked(SharedRegion* r, long long i) {
  if (i < 0 || static_cast<size_t>(i) >= r->count)
    fail("shared memory index " + std::to_string(i) + " out of bounds of '" + r->name + "[" +
         std::to_string(r->count) + "]'");
  return r->shadow[static_cast<size_t>(i)];
}
}  // namespace

void* shared_read(SharedRegion* r, long long i) {
  Shadow& s = checked(r, i);
  const int t = g_launch->current->linear;
  const int64_t e = g_launch->b->epoch;
  const std::string at = "'" + r->name + "[" + std::to_string(i) + "]'";
  if (s.writer < 0) fail("read of uninitialised shared memory " + at);
  if (s.w_epoch == e && s.writer != t)
    fail("shared-memory race: thread " + std::to_string(t) + " reads " + at + " written by thread " +
         std::to_string(s.writer) + " with no __syncthreads in between");
  if (s.r_epoch == e) {
    if (s.reader != t) s.multi_reader = true;
  } else {
    s.r_epoch = e;
    s.reader = t;
    s.multi_reader = false;
  }
  return r->data.data() + static_cast<size_t>(i) * r->elem;
}

void* shared_write(SharedRegion* r, long long i) {
  Shadow& s = checked(r, i);
  const int t = g_launch->current->linear;
  const int64_t e = g_launch->b->epoch;
  const std::string at = "'" + r->name + "[" + std::to_string(i) + "]'";
  if (s.w_epoch == e && s.writer != t)
    fail("shared-memory race: threads " + std::to_string(s.writer) + " and " + std::to_string(t) +
         " both write " + at + " with no __syncthreads in between");
  if (s.r_epoch == e && (s.multi_reader || s.reader != t))
    fail("shared-memory race: thread " + std::to_string(t) + " overwrites " + at +
         " that another thread read with no __syncthreads in between");
  s.w_epoch = e;
  s.writer = t;
  return r->data.data() + static_cast<size_t>(i) * r->elem;
}

// ---------------------------------------------------------------------------------------------
void launch(const char* name, dim3 grid, dim3 block, size_t dynamic_smem,
            const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  std::string bad;
  if (threads == 0 || threads > kMaxThreads || block.x > 1024 || block.y > 1024 || block.z > 64)
    bad = "block (" + std::to_string(block.x) + "," + std::to_string(block.y) + "," + std::to_string(block.z) + ")";
  if (blocks == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    bad = "grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," + std::to_string(grid.z) + ")";
  if (dynamic_smem > kMaxSharedBytes) bad = std::to_string(dynamic_smem) + " bytes of dynamic shared memory";
  if (!bad.empty())
    throw Error(std::string("invalid launch configuration of kernel ") + name + ": " + bad);
  ++g_log[name];
  if (g_fibers.size() < kMaxThreads) g_fibers.resize(kMaxThreads);

  Launch l;
  l.name = name;
  l.grid = grid;
  l.block = block;
  l.dynamic_smem = dynamic_smem;
  l.body = &body;
  l.rng.seed(g_config.seed * 0x9E3779B97F4A7C15ull + (++g_launch_count));
  std::vector<uint32_t> order(blocks);
  for (uint64_t i = 0; i < blocks; ++i) order[i] = static_cast<uint32_t>(i);
  std::shuffle(order.begin(), order.end(), l.rng);

  g_launch = &l;
  install_fault_handler();
  try {
    for (uint32_t i : order) {
      const dim3 bidx(i % grid.x, (i / grid.x) % grid.y, i / (grid.x * grid.y));
      run_block(l, bidx);
    }
  } catch (const Error& e) {
    remove_fault_handler();
    g_launch = nullptr;
    g_ctx = nullptr;
    throw std::runtime_error(std::string("SIMT: ") + e.what());
  }
  remove_fault_handler();
  g_launch = nullptr;
  g_ctx = nullptr;
  try {
    check_canaries();
  } catch (const Error& e) {
    throw std::runtime_error(std::string("SIMT: kernel ") + name + ": " + e.what());
  }
}

namespace {
void* map_guarded(size_t bytes, unsigned residue, const char* name, bool sparse) {
  residue &= 15u;
  const size_t data_pages = (bytes + 16 + kPage - 1) / kPage * kPage;
  // The whole span inaccessible (address space only: PROT_NONE is neither committed nor
  // touched), then the data pages opened. A process short of address space (a ulimit -v)
  // gets one guard page a side.
  size_t reach = kReach;
  const int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
  void* m = mmap(nullptr, data_pages + 2 * reach, PROT_NONE, flags, -1, 0);
  if (m == MAP_FAILED) {
    reach = kPage;
    m = mmap(nullptr, data_pages + 2 * reach, PROT_NONE, flags, -1, 0);
  }
  if (m == MAP_FAILED) throw std::runtime_error("SIMT: cannot map a guarded buffer");
  char* map = static_cast<char*>(m);
  const size_t len = data_pages + 2 * reach;
  char* begin = map + reach;
  char* end = begin + data_pages;
  if (mprotect(begin, data_pages, PROT_READ | PROT_WRITE) != 0) {
    munmap(map, len);
    throw std::runtime_error("SIMT: cannot map a guarded buffer of " + std::to_string(bytes) +
                             " bytes");
  }
  uintptr_t s = reinterpret_cast<uintptr_t>(end) - bytes;
  s -= (s - residue) & 15u;
  char* data = reinterpret_cast<char*>(s);
  if (sparse) {  // poison the two gaps only
    std::memset(begin, 0xFF, static_cast<size_t>(data - begin));
    std::memset(data + bytes, 0xFF, static_cast<size_t>(end - (data + bytes)));
  } else {
    std::memset(begin, 0xFF, data_pages);
  }
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_guarded[data] = Guarded{map, len, begin, end, data, bytes, name};
  return data;
}
}  // namespace

void* guarded_alloc(size_t bytes, unsigned residue, const char* name) {
  return map_guarded(bytes, residue, name, false);
}

void* guarded_alloc_sparse(size_t bytes, unsigned residue, const char* name) {
  return map_guarded(bytes, residue, name, true);
}

void guarded_free(void* data) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  auto it = g_guarded.find(static_cast<char*>(data));
  if (it == g_guarded.end()) return;
  munmap(it->second.map, it->second.map_len);
  g_guarded.erase(it);
}

Config& config() { return g_config; }

std::string launch_log() {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  std::string s;
  for (const auto& [name, count] : g_log) s += name + " " + std::to_string(count) + "\n";
  return s;
}

void reset_launch_log() {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_log.clear();
}

}  // namespace fl_simt
