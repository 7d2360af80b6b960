// A cache of freed host blocks for the CPU kernels' large outputs (host_buffers.h).
//
// Why: a fresh block's pages are faulted in and zeroed by the operating system when they are
// first written: 0.3–0.7 ms per MB on the machines measured (docs/benchmarks.md), with huge
// pages or without — as long as the fused kernels take to compute a bfloat16 Dice+CE step, and
// a quarter of an on-the-fly boundary step. A training step allocates the same few large blocks
// every step (the gradient, the distance maps, the Hausdorff field) and frees them at its end or
// when the optimiser drops the gradient; taken again from here, their pages are resident.
//
// Policy (the CUDA caching allocator's idea, kept small):
// - only blocks of at least kMinBytes (4 MiB): glibc reuses smaller ones itself;
// - each block is an anonymous mapping of whole 2 MiB pages, advised MADV_HUGEPAGE;
// - a request takes the smallest free block that holds it and is at most 1.5 times its size
//   (e.g. the (B, C − 1, *S) prediction maps take a freed (B, C, *S) gradient block);
// - a request that no free block fits first unmaps every free block: the cache then never
//   holds memory beside a fresh mapping, so a step's peak is the one it has without the cache
//   in the patterns above (sizes that repeat step after step); where sizes change, it behaves
//   as having no cache;
// - free blocks are kept up to SEGLOSS_HOST_CACHE_MB (read once; default 1024; 0: no cache, a
//   freed block is unmapped at once), the earliest freed unmapped first; `release()`
//   (segloss_torch.fused.empty_host_cache()) unmaps them all.
// The cache is process-wide and thread-safe (a storage may be freed on any thread); it lives
// until the process ends (never destroyed, so storages freed during exit still find it).
#include "host_buffers.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#define SEGLOSS_HOST_BUFFERS_MMAP 1
#endif

namespace segloss {
namespace host_buffers {
namespace {

constexpr size_t kPage = size_t(2) << 20;    // 2 MiB: a huge page
constexpr size_t kMinBytes = size_t(4) << 20;

struct Block {
  void* base;       // the mapping
  size_t length;    // its length
  void* data;       // its first 2 MiB-aligned byte
  size_t capacity;  // usable bytes from data
};

size_t limit_from_environment() {
  const char* value = std::getenv("SEGLOSS_HOST_CACHE_MB");
  if (value == nullptr || *value == '\0') return size_t(1024) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(value, &end, 10);
  if (end == value || mb <= 0) return 0;
  return static_cast<size_t>(mb) << 20;
}

#ifdef SEGLOSS_HOST_BUFFERS_MMAP

void unmap(Block* block) {
  munmap(block->base, block->length);
  delete block;
}

Block* map_block(size_t bytes) {
  const size_t capacity = (bytes + kPage - 1) / kPage * kPage;
  const size_t length = capacity + kPage;  // room to align the start to a huge page
  void* base = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return nullptr;
  const uintptr_t aligned = (reinterpret_cast<uintptr_t>(base) + kPage - 1) / kPage * kPage;
#ifdef MADV_HUGEPAGE
  madvise(reinterpret_cast<void*>(aligned), capacity, MADV_HUGEPAGE);  // a hint
#endif
  return new Block{base, length, reinterpret_cast<void*>(aligned), capacity};
}

class Cache {
 public:
  Block* take(size_t bytes) {
    std::vector<Block*> stale;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        const size_t c = (*it)->capacity;
        if (c >= bytes && 2 * c <= 3 * bytes + 2 * kPage && (best == free_.end() || c < (*best)->capacity)) best = it;
      }
      if (best != free_.end()) {
        Block* block = *best;
        free_.erase(best);
        free_bytes_ -= block->capacity;
        return block;
      }
      stale.swap(free_);  // a miss: nothing kept beside the fresh mapping
      free_bytes_ = 0;
    }
    for (Block* b : stale) unmap(b);
    return map_block(bytes);
  }

  void give_back(Block* block) {
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (block->capacity > limit_) {
        evicted.push_back(block);
      } else {
        free_.push_back(block);
        free_bytes_ += block->capacity;
        while (free_bytes_ > limit_) {  // the earliest freed first
          free_bytes_ -= free_.front()->capacity;
          evicted.push_back(free_.front());
          free_.erase(free_.begin());
        }
      }
    }
    for (Block* b : evicted) unmap(b);
  }

  int64_t release() {
    std::vector<Block*> all;
    size_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      all.swap(free_);
      bytes = free_bytes_;
      free_bytes_ = 0;
    }
    for (Block* b : all) unmap(b);
    return static_cast<int64_t>(bytes);
  }

  int64_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(free_bytes_);
  }

 private:
  std::mutex mutex_;
  std::vector<Block*> free_;  // in the order freed
  size_t free_bytes_ = 0;
  const size_t limit_ = limit_from_environment();
};

Cache& cache() {
  static Cache* instance = new Cache();  // never destroyed: see the top of the file
  return *instance;
}

void give_back(void* context) {
  cache().give_back(static_cast<Block*>(context));
}

class CachingHostAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    if (bytes >= kMinBytes) {
      if (Block* block = cache().take(bytes)) {
        return {block->data, block, &give_back, c10::Device(c10::DeviceType::CPU)};
      }
    }
    return c10::GetCPUAllocator()->allocate(bytes);  // small, or no mapping to be had
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

CachingHostAllocator& allocator() {
  static CachingHostAllocator* instance = new CachingHostAllocator();
  return *instance;
}

#endif  // SEGLOSS_HOST_BUFFERS_MMAP

}  // namespace

at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype) {
#ifdef SEGLOSS_HOST_BUFFERS_MMAP
  return at::detail::empty_generic(sizes, &allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   c10::MemoryFormat::Contiguous);
#else
  return at::empty(sizes, at::TensorOptions().dtype(dtype));
#endif
}

int64_t cached_bytes() {
#ifdef SEGLOSS_HOST_BUFFERS_MMAP
  return cache().cached_bytes();
#else
  return 0;
#endif
}

int64_t release() {
#ifdef SEGLOSS_HOST_BUFFERS_MMAP
  return cache().release();
#else
  return 0;
#endif
}

}  // namespace host_buffers
}  // namespace segloss

extern "C" int64_t segloss_host_cache(int release) {
  return release != 0 ? segloss::host_buffers::release() : segloss::host_buffers::cached_bytes();
}
