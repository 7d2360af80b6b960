// CUDA glue of segloss::region_stats: unpacks tensors and calls the framework-free launchers of
// csrc/cuda/region_stats.cu on the current stream. Compiled only into CUDA builds.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cuda/region_stats.h"
#include "../kernels/region_stats.cuh"
#include "region_stats.h"

namespace segloss {
namespace {

cuda::DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kDouble:
      return cuda::DType::kFloat64;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "segloss::region_stats: unsupported logits dtype ", t);
  }
}

cuda::LabelType label_type_of(const at::Tensor& labels) {
  if (!labels.defined()) return cuda::LabelType::kNone;
  switch (labels.scalar_type()) {
    case at::kLong:
      return cuda::LabelType::kInt64;
    case at::kInt:
      return cuda::LabelType::kInt32;
    default:
      return cuda::LabelType::kUInt8;
  }
}

cuda::RegionStatsArgs make_args(const RegionStatsInputs& in, int64_t activation, int64_t ignore_index,
                                bool has_ignore, bool want_ce_neg) {
  cuda::RegionStatsArgs a;
  a.logits = in.logits.data_ptr();
  a.dtype = dtype_of(in.logits.scalar_type());
  a.batch = in.batch;
  a.channels = in.channels;
  a.voxels = in.voxels;
  a.labels = in.labels.defined() ? in.labels.data_ptr() : nullptr;
  a.label_type = label_type_of(in.labels);
  a.target = in.target.defined() ? in.target.data_ptr() : nullptr;
  a.mask = in.mask.defined() ? in.mask.data_ptr() : nullptr;
  a.mask_batch_stride = in.mask.defined() && in.mask.size(0) > 1 ? in.voxels : 0;
  a.activation = static_cast<int>(activation);
  a.ignore_index = ignore_index;
  a.has_ignore = has_ignore;
  a.want_ce_neg = want_ce_neg;
  a.regions = in.regions.defined() ? in.regions.data_ptr<int64_t>() : nullptr;
  a.region_labels = in.regions.defined() ? in.regions.numel() : 0;
  a.field_pred = in.field_pred.defined() ? in.field_pred.data_ptr() : nullptr;
  a.field_sq_err = in.field_sq_err.defined() ? in.field_sq_err.data_ptr() : nullptr;
  return a;
}

}  // namespace

at::Tensor region_stats_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& labels,
                             const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& mask,
                             int64_t activation, int64_t ignore_index, bool has_ignore, bool want_ce_neg,
                             bool check_labels, const std::optional<at::Tensor>& regions,
                             const std::optional<at::Tensor>& field_pred,
                             const std::optional<at::Tensor>& field_sq_err) {
  c10::cuda::CUDAGuard guard(logits.device());
  RegionStatsInputs in = canonical_inputs(logits, labels, target, mask, activation, regions);
  add_fields(in, field_pred, field_sq_err);
  const at::ScalarType acc = accumulation_type(logits.scalar_type());
  at::Tensor out = at::zeros({in.batch, in.channels, kNumSlots}, logits.options().dtype(acc));
  if (in.batch == 0 || in.voxels == 0) return out;
  const cuda::RegionStatsArgs args = make_args(in, activation, ignore_index, has_ignore, want_ce_neg);
  at::Tensor workspace = at::empty({static_cast<int64_t>(cuda::region_stats_workspace_bytes(args))},
                                   logits.options().dtype(at::kByte));
  const cudaError_t err =
      cuda::region_stats_forward(args, out.data_ptr(), workspace.data_ptr(), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "segloss::region_stats (CUDA) failed: ", cudaGetErrorString(err));
  if (check_labels && in.labels.defined()) {
    check_invalid_labels(out, in.labels, valid_label_count(in, activation), has_ignore, ignore_index);
  }
  return out;
}

at::Tensor region_stats_backward_cuda(const at::Tensor& grad, const at::Tensor& logits,
                                      const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& target,
                                      const std::optional<at::Tensor>& mask, int64_t activation, int64_t ignore_index,
                                      bool has_ignore, const std::optional<at::Tensor>& regions,
                                      const std::optional<at::Tensor>& field_pred,
                                      const std::optional<at::Tensor>& field_sq_err) {
  c10::cuda::CUDAGuard guard(logits.device());
  RegionStatsInputs in = canonical_inputs(logits, labels, target, mask, activation, regions);
  add_fields(in, field_pred, field_sq_err);
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == in.batch && grad.size(1) == in.channels && grad.size(2) == kNumSlots,
              "segloss::region_stats_backward: grad must be (B, C, ", static_cast<int>(kNumSlots), "), got ",
              grad.sizes());
  at::Tensor upstream = grad.to(accumulation_type(logits.scalar_type())).contiguous();
  at::Tensor result = at::empty_like(in.logits, at::MemoryFormat::Contiguous);
  const cuda::RegionStatsArgs args = make_args(in, activation, ignore_index, has_ignore, true);
  const cudaError_t err = cuda::region_stats_backward(args, upstream.data_ptr(), result.data_ptr(),
                                                      at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "segloss::region_stats_backward (CUDA) failed: ", cudaGetErrorString(err));
  return result.view(logits.sizes());
}

}  // namespace segloss

TORCH_LIBRARY_IMPL(segloss, CUDA, m) {
  m.impl("region_stats", &segloss::region_stats_cuda);
  m.impl("region_stats_backward", &segloss::region_stats_backward_cuda);
}
