// CUDA glue of the distance-map ops: unpacks tensors, calls csrc/cuda/edt.cu on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "../cuda/edt.h"
#include "edt.h"

namespace segloss {
namespace {

void fill_geometry(cuda::DistanceMapArgs& a, at::IntArrayRef spatial, at::ArrayRef<double> spacing) {
  TORCH_CHECK(spatial.size() >= 1 && spatial.size() <= 3, "segloss distance maps: 1 to 3 spatial dims, got ",
              spatial.size());
  TORCH_CHECK(spacing.size() == spatial.size(), "segloss distance maps: spacing has ", spacing.size(),
              " values for ", spatial.size(), " spatial dims");
  a.ndim = static_cast<int>(spatial.size());
  for (int i = 0; i < a.ndim; ++i) {
    TORCH_CHECK(spacing[i] > 0, "segloss distance maps: spacing must be positive, got ", spacing[i]);
    a.sizes[i] = spatial[i];
    a.spacing[i] = spacing[i];
  }
}

at::Tensor run(const cuda::DistanceMapArgs& a, const at::Tensor& like, std::vector<int64_t> shape) {
  at::Tensor out = at::empty(shape, like.options().dtype(at::kFloat));
  const size_t bytes = cuda::distance_map_workspace_bytes(a);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
  const cudaError_t err =
      cuda::distance_maps(a, out.data_ptr<float>(), workspace.data_ptr(), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "segloss distance maps (CUDA) failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

at::Tensor label_distance_maps_cuda(const at::Tensor& labels, int64_t num_classes, at::ArrayRef<double> spacing,
                                    int64_t kind, double no_boundary_value, int64_t ignore_index, bool has_ignore) {
  c10::cuda::CUDAGuard guard(labels.device());
  TORCH_CHECK(labels.dim() >= 2 && labels.dim() <= 4, "segloss::label_distance_maps: labels must be (B, *spatial)");
  at::Tensor l = labels;
  cuda::DistanceMapArgs a;
  switch (labels.scalar_type()) {
    case at::kInt:
      a.label_dtype = cuda::LabelDType::kInt32;
      break;
    case at::kByte:
      a.label_dtype = cuda::LabelDType::kUInt8;
      break;
    case at::kLong:
      a.label_dtype = cuda::LabelDType::kInt64;
      break;
    default:
      l = labels.to(at::kLong);
      a.label_dtype = cuda::LabelDType::kInt64;
  }
  l = l.contiguous();
  a.labels = l.data_ptr();
  a.batch = l.size(0);
  a.classes = num_classes;
  a.kind = static_cast<int>(kind);
  a.no_boundary_value = static_cast<float>(no_boundary_value);
  a.ignore_index = ignore_index;
  a.has_ignore = has_ignore;
  fill_geometry(a, l.sizes().slice(1), spacing);
  std::vector<int64_t> shape = {a.batch, num_classes};
  shape.insert(shape.end(), l.sizes().begin() + 1, l.sizes().end());
  return run(a, l, shape);
}

at::Tensor mask_distance_maps_cuda(const at::Tensor& masks, at::ArrayRef<double> spacing, int64_t kind,
                                   double no_boundary_value) {
  c10::cuda::CUDAGuard guard(masks.device());
  TORCH_CHECK(masks.dim() >= 3 && masks.dim() <= 5, "segloss::mask_distance_maps: masks must be (B, C, *spatial)");
  at::Tensor m = masks.to(at::kByte).contiguous();
  cuda::DistanceMapArgs a;
  a.labels = m.data_ptr();
  a.masks = true;
  a.batch = m.size(0);
  a.classes = m.size(1);
  a.kind = static_cast<int>(kind);
  a.no_boundary_value = static_cast<float>(no_boundary_value);
  fill_geometry(a, m.sizes().slice(2), spacing);
  return run(a, m, std::vector<int64_t>(m.sizes().begin(), m.sizes().end()));
}

}  // namespace segloss

TORCH_LIBRARY_IMPL(segloss, CUDA, m) {
  m.impl("label_distance_maps", &segloss::label_distance_maps_cuda);
  m.impl("mask_distance_maps", &segloss::mask_distance_maps_cuda);
}
