// Host memory for the large outputs of the CPU kernels — the gradient of region_stats_backward
// and the distance maps — kept for reuse when they are freed, as the CUDA caching allocator
// keeps device memory (csrc/torch/host_buffers.cpp has the policy and the reasons).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace segloss {
namespace host_buffers {

// A contiguous CPU tensor of `sizes` and `dtype`, uninitialised. Blocks of at least 4 MiB come
// from the cache of freed blocks when one fits (its pages already resident: no first-touch page
// faults) or else from a fresh mapping with transparent huge pages; smaller ones from c10's CPU
// allocator. Freeing the tensor's storage (on any thread) returns the block to the cache.
at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype);

// Bytes of the free blocks the cache holds now.
int64_t cached_bytes();

// Unmaps every free block; returns the bytes released.
int64_t release();

}  // namespace host_buffers
}  // namespace segloss

// For Python (ctypes on the loaded library: segloss_torch.fused.host_cache_bytes and
// empty_host_cache): release != 0 unmaps the free blocks and returns the bytes released; else
// returns the bytes held.
extern "C" int64_t segloss_host_cache(int release);
