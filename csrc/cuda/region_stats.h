// Framework-free launchers of the fused region statistics (raw pointers, sizes, cudaStream_t).
// Compiled by nvcc alone (no torch headers); csrc/torch/region_stats_cuda.cpp unpacks tensors
// and calls these.
#pragma once

#include "../kernels/cuda_target.cuh"  // <cuda_runtime.h>, or its names on the emulated target

#include <cstddef>
#include <cstdint>

namespace segloss {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };
enum class LabelType : int { kNone = 0, kInt64 = 1, kInt32 = 2, kUInt8 = 3 };

struct RegionStatsArgs {
  const void* logits = nullptr;  // (B, C, N) contiguous, dtype
  DType dtype = DType::kFloat32;
  int64_t batch = 0, channels = 0, voxels = 0;
  const void* labels = nullptr;  // (B, N) contiguous, label_type; or null with a target
  LabelType label_type = LabelType::kNone;
  const void* target = nullptr;  // (B, C, N) contiguous, dtype; or null with labels
  const void* mask = nullptr;    // (Mb, N) contiguous in the accumulation dtype, or null
  int64_t mask_batch_stride = 0;  // N if Mb == B, 0 if Mb == 1
  int activation = 0;             // 0 softmax, 1 sigmoid, 2 none
  int64_t ignore_index = 0;
  bool has_ignore = false;
  bool want_ce_neg = false;
  const int64_t* regions = nullptr;  // (region_labels,) int64 membership table of region-based training, or null
  int64_t region_labels = 0;
  // fields of the field statistics, (B, C, N) contiguous in the accumulation dtype, or null (then 0)
  const void* field_pred = nullptr;    // φ of Σ w p φ
  const void* field_sq_err = nullptr;  // F of Σ w (p − g)² F
  // the backward grid has at most this many blocks; its grid-stride loop covers the other voxels
  int64_t max_backward_blocks = 1 << 20;
};

// Bytes of scratch the forward pass needs (deterministic per-chunk partial sums).
size_t region_stats_workspace_bytes(const RegionStatsArgs& args);

// out: (B, C, kNumSlots = 12) statistics in the accumulation dtype (float, double for float64).
// Returns cudaErrorInvalidConfiguration, before any launch, if B > 65535 (the grid's z dimension).
cudaError_t region_stats_forward(const RegionStatsArgs& args, void* out, void* workspace, cudaStream_t stream);

// upstream: (B, C, kNumSlots) in the accumulation dtype; grad: (B, C, N) in dtype.
cudaError_t region_stats_backward(const RegionStatsArgs& args, const void* upstream, void* grad,
                                  cudaStream_t stream);

}  // namespace cuda
}  // namespace segloss
