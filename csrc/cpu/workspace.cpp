#include "cpu/workspace.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

namespace miss_ext {
namespace cpu {
namespace {

constexpr size_t kHugePage = size_t{1} << 21;

struct Block {
  void* ptr;
  size_t bytes;
};

std::mutex& lock() {
  static std::mutex m;
  return m;
}

std::vector<Block>& cached() {
  static std::vector<Block> blocks;
  return blocks;
}

bool caching() {
  static const bool on = [] {
    const char* env = std::getenv("MISS_EXT_CPU_WORKSPACE");
    return !(env && std::string(env) == "0");
  }();
  return on;
}

void* map_new(size_t bytes) {
  void* p = nullptr;
  if (posix_memalign(&p, kHugePage, bytes) != 0) return nullptr;
#ifdef MADV_HUGEPAGE
  madvise(p, bytes, MADV_HUGEPAGE);  // advice only: without THP it is ignored
#endif
  return p;
}

void give_back(void* ptr, size_t bytes) {
  if (caching()) {
    std::lock_guard<std::mutex> guard(lock());
    auto& blocks = cached();
    blocks.push_back({ptr, bytes});
    if (static_cast<int>(blocks.size()) <= kMaxCached) return;
    // Over the limit: free the smallest kept buffer (the big ones are the expensive ones to map).
    auto smallest = std::min_element(blocks.begin(), blocks.end(),
                                     [](const Block& a, const Block& b) { return a.bytes < b.bytes; });
    ptr = smallest->ptr;
    blocks.erase(smallest);
  }
  std::free(ptr);
}

}  // namespace

at::Tensor workspace_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  const int64_t numel = c10::multiply_integers(sizes);
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  if (static_cast<int64_t>(bytes) < kMinBytes) return at::empty(sizes, options);
  const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* ptr = nullptr;
  size_t have = 0;
  if (caching()) {
    std::lock_guard<std::mutex> guard(lock());
    auto& blocks = cached();
    // The smallest kept buffer that fits, if it is not more than twice the need.
    auto best = blocks.end();
    for (auto it = blocks.begin(); it != blocks.end(); ++it) {
      if (it->bytes >= rounded && it->bytes <= 2 * rounded &&
          (best == blocks.end() || it->bytes < best->bytes)) {
        best = it;
      }
    }
    if (best != blocks.end()) {
      ptr = best->ptr;
      have = best->bytes;
      blocks.erase(best);
    }
  }
  if (!ptr) {
    ptr = map_new(rounded);
    have = rounded;
    TORCH_CHECK(ptr, "miss_ext: could not allocate a ", rounded, "-byte CPU workspace");
  }
  return at::from_blob(ptr, sizes, [ptr, have](void*) { give_back(ptr, have); }, options);
}

int64_t workspace_release() {
  std::vector<Block> blocks;
  {
    std::lock_guard<std::mutex> guard(lock());
    blocks.swap(cached());
  }
  int64_t bytes = 0;
  for (const auto& b : blocks) {
    bytes += static_cast<int64_t>(b.bytes);
    std::free(b.ptr);
  }
  return bytes;
}

int64_t workspace_cached_bytes() {
  std::lock_guard<std::mutex> guard(lock());
  int64_t bytes = 0;
  for (const auto& b : cached()) bytes += static_cast<int64_t>(b.bytes);
  return bytes;
}

}  // namespace cpu
}  // namespace miss_ext
