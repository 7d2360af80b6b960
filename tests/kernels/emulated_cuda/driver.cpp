// C entry points of the emulated CUDA build (tests/kernels/test_emulated_cuda.py): the framework-free
// launchers of csrc/cuda/*.cu, compiled with g++ against the HIP CPU Runtime
// (-DSEGLOSS_HIP_CPU, csrc/kernels/cuda_target.cuh), called through ctypes.
//
// Every input is copied into a heap buffer of exactly the size the launcher's contract gives it,
// and every output comes from one, so AddressSanitizer reports any read or write past an end.
// Each call waits for the stream and returns the launcher's error code (or the runtime's).
#include <cstdint>
#include <cstring>
#include <vector>

#include "../../../csrc/cuda/edt.h"
#include "../../../csrc/cuda/region_stats.h"
#include "../../../csrc/kernels/region_stats.cuh"  // kNumSlots

namespace {

using segloss::cuda::DistanceMapArgs;
using segloss::cuda::RegionStatsArgs;

// An exactly sized copy of `bytes` bytes at `src` (empty when src is null).
std::vector<unsigned char> copy_of(const void* src, size_t bytes) {
  if (src == nullptr) return {};
  const auto* p = static_cast<const unsigned char*>(src);
  return std::vector<unsigned char>(p, p + bytes);
}

const void* data_or_null(const std::vector<unsigned char>& v, const void* original) {
  return original == nullptr ? nullptr : v.data();
}

size_t value_bytes(segloss::cuda::DType t) {
  switch (t) {
    case segloss::cuda::DType::kFloat64:
      return 8;
    case segloss::cuda::DType::kFloat32:
      return 4;
    default:
      return 2;
  }
}

size_t label_bytes(segloss::cuda::LabelType t) {
  switch (t) {
    case segloss::cuda::LabelType::kInt64:
      return 8;
    case segloss::cuda::LabelType::kInt32:
      return 4;
    default:
      return 1;
  }
}

int finish(cudaError_t err) {
  const cudaError_t sync = cudaDeviceSynchronize();
  return static_cast<int>(err != cudaSuccess ? err : sync);
}

struct RegionBuffers {
  RegionStatsArgs args;
  std::vector<unsigned char> logits, labels, target, mask, regions, field_pred, field_sq_err;
  size_t acc_bytes;
};

RegionBuffers region_inputs(const void* logits, int dtype, int64_t batch, int64_t channels, int64_t voxels,
                            const void* labels, int label_type, const void* target, const void* mask,
                            int64_t mask_batch, int activation, int64_t ignore_index, int has_ignore,
                            const int64_t* regions, int64_t region_labels, const void* field_pred,
                            const void* field_sq_err, int want_ce_neg) {
  RegionBuffers r;
  RegionStatsArgs& a = r.args;
  a.dtype = static_cast<segloss::cuda::DType>(dtype);
  a.batch = batch;
  a.channels = channels;
  a.voxels = voxels;
  a.label_type = labels ? static_cast<segloss::cuda::LabelType>(label_type) : segloss::cuda::LabelType::kNone;
  a.mask_batch_stride = mask_batch > 1 ? voxels : 0;
  a.activation = activation;
  a.ignore_index = ignore_index;
  a.has_ignore = has_ignore != 0;
  a.want_ce_neg = want_ce_neg != 0;
  const size_t value = value_bytes(a.dtype), bcn = static_cast<size_t>(batch * channels * voxels);
  r.acc_bytes = a.dtype == segloss::cuda::DType::kFloat64 ? 8 : 4;
  r.logits = copy_of(logits, bcn * value);
  r.labels = copy_of(labels, static_cast<size_t>(batch * voxels) * label_bytes(a.label_type));
  r.target = copy_of(target, bcn * value);
  r.mask = copy_of(mask, static_cast<size_t>(mask_batch * voxels) * r.acc_bytes);
  a.logits = data_or_null(r.logits, logits);
  a.labels = data_or_null(r.labels, labels);
  a.target = data_or_null(r.target, target);
  a.mask = data_or_null(r.mask, mask);
  r.regions = copy_of(regions, static_cast<size_t>(region_labels) * sizeof(int64_t));
  a.regions = static_cast<const int64_t*>(data_or_null(r.regions, regions));
  a.region_labels = regions ? region_labels : 0;
  r.field_pred = copy_of(field_pred, bcn * r.acc_bytes);
  r.field_sq_err = copy_of(field_sq_err, bcn * r.acc_bytes);
  a.field_pred = data_or_null(r.field_pred, field_pred);
  a.field_sq_err = data_or_null(r.field_sq_err, field_sq_err);
  return r;
}

}  // namespace

extern "C" {

// fields: (B, C, N) in the accumulation dtype, or null; out: (B, C, kNumSlots) in the accumulation dtype. regions: the membership table (region_labels entries) or null.
int segloss_emulated_region_stats(const void* logits, int dtype, int64_t batch, int64_t channels, int64_t voxels,
                                  const void* labels, int label_type, const void* target, const void* mask,
                                  int64_t mask_batch, int activation, int64_t ignore_index, int has_ignore,
                                  const int64_t* regions, int64_t region_labels, const void* field_pred,
                                  const void* field_sq_err, int want_ce_neg, void* out) {
  RegionBuffers r = region_inputs(logits, dtype, batch, channels, voxels, labels, label_type, target, mask,
                                  mask_batch, activation, ignore_index, has_ignore, regions, region_labels,
                                  field_pred, field_sq_err,
                                  want_ce_neg);
  std::vector<unsigned char> workspace(segloss::cuda::region_stats_workspace_bytes(r.args));
  const size_t out_bytes = static_cast<size_t>(batch * channels * segloss::kNumSlots) * r.acc_bytes;
  std::vector<unsigned char> result(out_bytes);
  const int rc = finish(segloss::cuda::region_stats_forward(r.args, result.data(), workspace.data(), nullptr));
  std::memcpy(out, result.data(), out_bytes);
  return rc;
}

// upstream: (B, C, kNumSlots) in the accumulation dtype; grad: (B, C, N) in dtype. max_blocks bounds
// the grid (0: the launcher's default).
int segloss_emulated_region_stats_backward(const void* logits, int dtype, int64_t batch, int64_t channels,
                                           int64_t voxels, const void* labels, int label_type, const void* target,
                                           const void* mask, int64_t mask_batch, int activation, int64_t ignore_index,
                                           int has_ignore, const int64_t* regions, int64_t region_labels,
                                           const void* field_pred, const void* field_sq_err,
                                           const void* upstream, int64_t max_blocks, void* grad) {
  RegionBuffers r = region_inputs(logits, dtype, batch, channels, voxels, labels, label_type, target, mask,
                                  mask_batch, activation, ignore_index, has_ignore, regions, region_labels,
                                  field_pred, field_sq_err, 1);
  if (max_blocks > 0) r.args.max_backward_blocks = max_blocks;
  const std::vector<unsigned char> up =
      copy_of(upstream, static_cast<size_t>(batch * channels * segloss::kNumSlots) * r.acc_bytes);
  const size_t grad_bytes = static_cast<size_t>(batch * channels * voxels) * value_bytes(r.args.dtype);
  std::vector<unsigned char> result(grad_bytes);
  const int rc = finish(segloss::cuda::region_stats_backward(r.args, up.data(), result.data(), nullptr));
  std::memcpy(grad, result.data(), grad_bytes);
  return rc;
}

// labels: label maps (B, *S) of label_dtype, or (masks != 0) uint8 masks (B, C, *S); out (B, C, *S).
int segloss_emulated_distance_maps(const void* labels, int label_dtype, int masks, int64_t batch, int64_t classes,
                                   int ndim, const int64_t* sizes, const double* spacing, int kind,
                                   float no_boundary_value, int64_t ignore_index, int has_ignore, float* out) {
  DistanceMapArgs a;
  a.label_dtype = static_cast<segloss::cuda::LabelDType>(label_dtype);
  a.masks = masks != 0;
  a.batch = batch;
  a.classes = classes;
  a.ndim = ndim;
  int64_t voxels = 1;
  for (int i = 0; i < ndim; ++i) {
    a.sizes[i] = sizes[i];
    a.spacing[i] = spacing[i];
    voxels *= sizes[i];
  }
  a.kind = kind;
  a.no_boundary_value = no_boundary_value;
  a.ignore_index = ignore_index;
  a.has_ignore = has_ignore != 0;
  const size_t element = a.masks ? 1 : (a.label_dtype == segloss::cuda::LabelDType::kInt64   ? 8
                                        : a.label_dtype == segloss::cuda::LabelDType::kInt32 ? 4
                                                                                             : 1);
  const size_t maps = static_cast<size_t>(a.masks ? batch * classes : batch);
  const std::vector<unsigned char> input = copy_of(labels, maps * static_cast<size_t>(voxels) * element);
  a.labels = input.data();
  std::vector<unsigned char> workspace(segloss::cuda::distance_map_workspace_bytes(a));
  const size_t out_count = static_cast<size_t>(batch * classes * voxels);
  std::vector<float> result(out_count);
  const int rc = finish(segloss::cuda::distance_maps(a, result.data(), workspace.data(), nullptr));
  std::memcpy(out, result.data(), out_count * sizeof(float));
  return rc;
}

// Planted bugs that show the sanitizers are live in the emulator's process: 0 reads one element past
// a heap buffer (ASan), 1 overflows a signed int (UBSan). Neither returns normally.
int segloss_emulated_planted_bug(int kind, int count) {
  std::vector<int> values(static_cast<size_t>(count), 1);
  if (kind == 0) return values.data()[count];
  int total = 2147483647 - count;
  for (int i = 0; i <= count; ++i) total += values[static_cast<size_t>(i % count)];
  return total;
}

}  // extern "C"
