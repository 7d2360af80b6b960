// Launchers of the batched exact distance maps (csrc/kernels/edt_device.cuh). `nvcc -c edt.cu` alone.
#include <algorithm>

#include "../kernels/edt_device.cuh"
#include "edt.h"

namespace segloss {
namespace cuda {
namespace {

constexpr int64_t kMaxThreads = 8192;  // lines processed at once by the envelope passes (bounds the scratch)

int64_t voxels_of(const DistanceMapArgs& a) {
  int64_t n = 1;
  for (int i = 0; i < a.ndim; ++i) n *= a.sizes[i];
  return n;
}

int64_t max_extent(const DistanceMapArgs& a) {
  int64_t n = 1;
  for (int i = 0; i < a.ndim; ++i) n = std::max(n, a.sizes[i]);
  return n;
}

size_t align8(size_t bytes) { return (bytes + 7) / 8 * 8; }

struct Layout {
  size_t counts, din, v, z, fk, g, total;
};

Layout layout(const DistanceMapArgs& a) {
  const int64_t n = max_extent(a);
  Layout l{};
  size_t offset = 0;
  l.counts = offset;
  offset += align8(sizeof(unsigned long long) * a.batch * a.classes);
  l.din = offset;
  offset += align8(a.masks ? 0 : sizeof(float) * a.batch * voxels_of(a));
  l.v = offset;
  offset += align8(sizeof(int) * kMaxThreads * (n + 2));
  l.z = offset;
  offset += align8(sizeof(double) * kMaxThreads * (n + 3));
  l.fk = offset;
  offset += align8(sizeof(double) * kMaxThreads * (n + 2));
  l.g = offset;
  offset += align8(sizeof(float) * kMaxThreads * (n + 2));
  l.total = offset;
  return l;
}

unsigned grid_for(int64_t work, int block) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((work + block - 1) / block, 65535)));
}

template <typename L>
cudaError_t transform(const L* labels, float* out, int64_t volumes, int64_t label_div, bool multilabel, bool mask_mode,
                      const DistanceMapArgs& a, char* ws, const Layout& l, cudaStream_t stream) {
  const int64_t voxels = voxels_of(a);
  const int last = a.ndim - 1;
  const int n_last = static_cast<int>(a.sizes[last]);
  cudaError_t err = launch(edt_first_pass_kernel<L>, grid_for(volumes * (voxels / n_last), kEdtBlock), kEdtBlock, 0,
                           stream, labels, out, volumes, voxels, n_last, label_div, multilabel, mask_mode,
                           a.spacing[last]);
  if (err != cudaSuccess) return err;
  for (int axis = last - 1; axis >= 0; --axis) {
    int64_t stride = 1;
    for (int i = axis + 1; i < a.ndim; ++i) stride *= a.sizes[i];
    const int64_t lines = volumes * (voxels / a.sizes[axis]);
    const int64_t threads = std::min<int64_t>(lines, kMaxThreads);
    err = launch(edt_parabola_kernel<L>, grid_for(threads, kEdtBlock), kEdtBlock, 0, stream, labels, out, volumes,
                 voxels, static_cast<int>(a.sizes[axis]), stride, label_div, multilabel, mask_mode, a.spacing[axis],
                 reinterpret_cast<int*>(ws + l.v), reinterpret_cast<double*>(ws + l.z),
                 reinterpret_cast<double*>(ws + l.fk), reinterpret_cast<float*>(ws + l.g));
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename L>
cudaError_t label_maps(const DistanceMapArgs& a, float* out, char* ws, cudaStream_t stream) {
  const Layout l = layout(a);
  const int64_t voxels = voxels_of(a);
  const L* labels = static_cast<const L*>(a.labels);
  auto* counts = reinterpret_cast<unsigned long long*>(ws + l.counts);
  cudaError_t err = cudaMemsetAsync(counts, 0, sizeof(unsigned long long) * a.batch * a.classes, stream);
  if (err != cudaSuccess) return err;
  dim3 grid(grid_for(voxels, 256), static_cast<unsigned>(a.batch));
  err = launch(edt_count_kernel<L>, grid, 256, sizeof(unsigned long long) * a.classes, stream, labels, a.batch, voxels,
               a.classes, a.ignore_index, a.has_ignore, counts);
  if (err != cudaSuccess) return err;
  float* din = reinterpret_cast<float*>(ws + l.din);
  // every class's inside distance: one multi-label transform per sample
  if ((err = transform<L>(labels, din, a.batch, 1, true, false, a, ws, l, stream)) != cudaSuccess) return err;
  // outside distance of each class: binary transforms over all (sample, class) volumes
  if ((err = transform<L>(labels, out, a.batch * a.classes, a.classes, false, false, a, ws, l, stream)) != cudaSuccess)
    return err;
  return launch(edt_compose_labels_kernel<L>, grid_for(a.batch * a.classes * voxels, 256), 256, 0, stream, labels, din,
                out, a.batch, a.classes, voxels, counts, a.kind, a.no_boundary_value);
}

cudaError_t mask_maps(const DistanceMapArgs& a, float* out, char* ws, cudaStream_t stream) {
  const Layout l = layout(a);
  const int64_t voxels = voxels_of(a);
  const int64_t volumes = a.batch * a.classes;
  const auto* masks = static_cast<const unsigned char*>(a.labels);
  auto* counts = reinterpret_cast<unsigned long long*>(ws + l.counts);
  cudaError_t err = cudaMemsetAsync(counts, 0, sizeof(unsigned long long) * volumes, stream);
  if (err != cudaSuccess) return err;
  dim3 grid(grid_for(voxels, 256), static_cast<unsigned>(volumes));
  err = launch(edt_count_kernel<unsigned char>, grid, 256, sizeof(unsigned long long), stream, masks, volumes, voxels,
               1, 0, false, counts);
  if (err != cudaSuccess) return err;
  // a 0/1 mask is a two-label map: the distance to the other label is d_in inside, d_out outside
  if ((err = transform<unsigned char>(masks, out, volumes, 1, true, true, a, ws, l, stream)) != cudaSuccess) return err;
  return launch(edt_compose_masks_kernel, grid_for(volumes * voxels, 256), 256, 0, stream, masks, out, volumes, voxels,
                counts, a.kind, a.no_boundary_value);
}

}  // namespace

size_t distance_map_workspace_bytes(const DistanceMapArgs& args) { return layout(args).total; }

cudaError_t distance_maps(const DistanceMapArgs& args, float* out, void* workspace, cudaStream_t stream) {
  if (args.batch == 0 || args.classes == 0 || voxels_of(args) == 0) return cudaSuccess;
  if (args.batch > 65535 || (args.masks && args.batch * args.classes > 65535)) return cudaErrorInvalidConfiguration;
  char* ws = static_cast<char*>(workspace);
  if (args.masks) return mask_maps(args, out, ws, stream);
  switch (args.label_dtype) {
    case LabelDType::kInt32:
      return label_maps<int>(args, out, ws, stream);
    case LabelDType::kUInt8:
      return label_maps<unsigned char>(args, out, ws, stream);
    default:
      return label_maps<long long>(args, out, ws, stream);
  }
}

}  // namespace cuda
}  // namespace segloss
