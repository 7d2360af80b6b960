// Framework-free launchers of the exact distance maps on the GPU (raw pointers, sizes, stream).
#pragma once

#include "../kernels/cuda_target.cuh"  // <cuda_runtime.h>, or its names on the emulated target

#include <cstddef>
#include <cstdint>

namespace segloss {
namespace cuda {

enum class LabelDType : int { kInt64 = 0, kInt32 = 1, kUInt8 = 2 };

struct DistanceMapArgs {
  const void* labels = nullptr;  // label maps (B, *S) of label_dtype, or masks (B, C, *S) uint8
  LabelDType label_dtype = LabelDType::kInt64;
  bool masks = false;            // true: `labels` are binary masks (B, C, *S)
  int64_t batch = 0, classes = 0;
  int64_t sizes[3] = {1, 1, 1};  // spatial sizes
  int ndim = 1;
  double spacing[3] = {1.0, 1.0, 1.0};
  int kind = 0;                  // csrc/kernels/edt.cuh DistanceKind
  float no_boundary_value = 0.0f;
  int64_t ignore_index = 0;
  bool has_ignore = false;
};

size_t distance_map_workspace_bytes(const DistanceMapArgs& args);

// out: (B, C, *S) float32 maps. Returns cudaErrorInvalidConfiguration, before any launch, for more
// maps than the grid's y dimension holds (B > 65535 label maps, or B·C > 65535 masks):
// segloss_core.distance_maps.check_cuda_volumes refuses those with a ValueError first.
cudaError_t distance_maps(const DistanceMapArgs& args, float* out, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace segloss
