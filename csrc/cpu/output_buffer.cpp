#include "output_buffer.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>
#include <sys/mman.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

namespace fusedloss {
namespace cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMinPooledBytes = size_t(8) << 20;  // smaller outputs: the normal allocator
constexpr size_t kMaxKept = 2;  // e.g. the gradients of a float32 and a bfloat16 loss

// FUSEDLOSS_KEEP_OUTPUT_BUFFERS=0 frees every buffer at once instead of keeping it.
bool keep_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("FUSEDLOSS_KEEP_OUTPUT_BUFFERS");
    return v == nullptr || std::string(v) != "0";
  }();
  return enabled;
}

struct Pool {
  std::mutex mutex;
  std::vector<std::pair<void*, size_t>> kept;  // oldest first

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      for (auto it = kept.begin(); it != kept.end(); ++it) {
        if (it->second == bytes) {
          void* p = it->first;
          kept.erase(it);
          return p;
        }
      }
    }
    void* p = std::aligned_alloc(kHugePage, bytes);
    TORCH_CHECK(p != nullptr, "fusedloss: out of memory allocating ", bytes, " bytes");
    // Before the first touch, so that the pages are faulted in 2 MB at a time.
    madvise(p, bytes, MADV_HUGEPAGE);
    return p;
  }

  void give_back(void* p, size_t bytes) {
    if (!keep_enabled()) {
      std::free(p);
      return;
    }
    void* evicted = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex);
      kept.emplace_back(p, bytes);
      if (kept.size() > kMaxKept) {
        evicted = kept.front().first;
        kept.erase(kept.begin());
      }
    }
    std::free(evicted);
  }

  void release() {
    std::vector<std::pair<void*, size_t>> drop;
    {
      std::lock_guard<std::mutex> lock(mutex);
      drop.swap(kept);
    }
    for (auto& b : drop) std::free(b.first);
  }

  int64_t bytes_kept() {
    std::lock_guard<std::mutex> lock(mutex);
    int64_t total = 0;
    for (auto& b : kept) total += static_cast<int64_t>(b.second);
    return total;
  }
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors.
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

}  // namespace

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(options.dtype().toScalarType());
  if (bytes < kMinPooledBytes) return at::empty(sizes, options);
  const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* p = pool().take(rounded);
  return at::from_blob(p, sizes, [rounded](void* q) { pool().give_back(q, rounded); }, options);
}

void release_cached_outputs() { pool().release(); }

int64_t cached_output_bytes() { return pool().bytes_kept(); }

}  // namespace cpu
}  // namespace fusedloss
