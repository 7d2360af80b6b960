// CPU kernel of segloss::softmax_prediction_labels: a softmax prediction thresholded at t as one
// label map, for the Hausdorff-DT loss's prediction maps (segloss_core/losses/distance.py).
//
// For a voxel with logits z over C classes and m = max z, the largest softmax probability is
// exp(0)/Σ exp(z − m) = 1/Σ exp(z − m); the label is the first class with z_c = m where that
// exceeds t, and C (no class) elsewhere. For t ≥ 0.5 it is the voxel's class in every mask
// p_c > t (at most one class can exceed 1/2). One read of the logits, one byte written per
// voxel: no softmax, no per-class masks. exp is seg_exp (csrc/kernels/common.cuh), as in the
// fused statistics; NaN logits give no class (the maximum and the sum are NaN).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "../kernels/common.cuh"
#include "prediction_labels.h"

namespace segloss {
namespace {

constexpr int64_t kLabelTile = 1024;  // voxels per inner loop (the per-class loops vectorise)

template <typename T, typename A>
void labels_typed(const T* z, int64_t batch, int64_t channels, int64_t voxels, A threshold, uint8_t* out) {
  const int64_t tiles = (voxels + kLabelTile - 1) / kLabelTile;
  at::parallel_for(0, batch * tiles, 1, [&](int64_t begin, int64_t end) {
    alignas(64) A m[kLabelTile];
    alignas(64) A s[kLabelTile];
    alignas(64) uint8_t arg[kLabelTile];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles, x0 = (task % tiles) * kLabelTile;
      const int64_t n = std::min(kLabelTile, voxels - x0);
      const T* zb = z + b * channels * voxels + x0;
      for (int64_t i = 0; i < n; ++i) {
        m[i] = static_cast<A>(zb[i]);
        arg[i] = 0;
      }
      for (int64_t c = 1; c < channels; ++c) {
        const T* zc = zb + c * voxels;
        for (int64_t i = 0; i < n; ++i) {
          const A v = static_cast<A>(zc[i]);
          const bool larger = v > m[i] || v != v;  // NaN propagates into the maximum
          m[i] = larger ? v : m[i];
          arg[i] = larger ? static_cast<uint8_t>(c) : arg[i];
        }
      }
      for (int64_t i = 0; i < n; ++i) s[i] = A(0);
      for (int64_t c = 0; c < channels; ++c) {
        const T* zc = zb + c * voxels;
        for (int64_t i = 0; i < n; ++i) s[i] += seg_exp(static_cast<A>(zc[i]) - m[i]);
      }
      uint8_t* o = out + b * voxels + x0;
      const uint8_t none = static_cast<uint8_t>(channels);
      for (int64_t i = 0; i < n; ++i) o[i] = A(1) / s[i] > threshold ? arg[i] : none;
    }
  });
}

}  // namespace

at::Tensor softmax_prediction_labels_cpu(const at::Tensor& logits, double threshold) {
  TORCH_CHECK(logits.dim() >= 3 && logits.dim() <= 5, "segloss::softmax_prediction_labels: logits must be ",
              "(B, C, *spatial) with 1 to 3 spatial dims, got ", logits.sizes());
  TORCH_CHECK(logits.size(1) >= 1 && logits.size(1) <= 255,
              "segloss::softmax_prediction_labels: 1 to 255 classes (one byte per label), got ", logits.size(1));
  at::Tensor z = logits.contiguous();
  const int64_t batch = z.size(0), channels = z.size(1), voxels = z.numel() / std::max<int64_t>(1, batch * channels);
  std::vector<int64_t> shape = {batch};
  shape.insert(shape.end(), z.sizes().begin() + 2, z.sizes().end());
  at::Tensor out = at::empty(shape, z.options().dtype(at::kByte));
  if (out.numel() == 0) return out;
  uint8_t* o = out.data_ptr<uint8_t>();
  switch (z.scalar_type()) {
    case at::kDouble:
      labels_typed<double, double>(z.data_ptr<double>(), batch, channels, voxels, threshold, o);
      break;
    case at::kFloat:
      labels_typed<float, float>(z.data_ptr<float>(), batch, channels, voxels, static_cast<float>(threshold), o);
      break;
    case at::kHalf:
      labels_typed<c10::Half, float>(z.data_ptr<c10::Half>(), batch, channels, voxels,
                                     static_cast<float>(threshold), o);
      break;
    case at::kBFloat16:
      labels_typed<c10::BFloat16, float>(z.data_ptr<c10::BFloat16>(), batch, channels, voxels,
                                         static_cast<float>(threshold), o);
      break;
    default:
      TORCH_CHECK(false, "segloss::softmax_prediction_labels: floating-point logits, got ", z.scalar_type());
  }
  return out;
}

}  // namespace segloss
