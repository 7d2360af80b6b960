// Launchers of the fused region statistics kernels (csrc/kernels/region_stats_device.cuh).
// Framework-free: `nvcc -c region_stats.cu` compiles this file alone.
#include <algorithm>

#include "../kernels/region_stats_device.cuh"
#include "region_stats.h"

namespace segloss {
namespace cuda {
namespace {

int64_t chunk_count(const RegionStatsArgs& args) {
  return std::max<int64_t>(1, (args.voxels + kChunkVoxels - 1) / kChunkVoxels);
}

int64_t group_count(const RegionStatsArgs& args) { return (args.channels + kGroup - 1) / kGroup; }

size_t accumulator_bytes(const RegionStatsArgs& args) { return args.dtype == DType::kFloat64 ? 8 : 4; }

#define SEGLOSS_LAUNCH_ARGS(A, args)                                                                       \
  static_cast<const A*>(args.mask), args.mask_batch_stride, args.batch, args.channels, args.voxels,          \
      args.activation, args.ignore_index, static_cast<int>(args.has_ignore), static_cast<int>(args.want_ce_neg),  \
      args.regions, args.region_labels, \
      static_cast<const A*>(args.field_pred), static_cast<const A*>(args.field_sq_err)

template <typename T, typename L, bool LABELS>
cudaError_t forward_typed(const RegionStatsArgs& args, void* out, void* workspace, cudaStream_t stream) {
  using A = typename AccType<T>::type;
  const int64_t chunks = chunk_count(args), groups = group_count(args);
  if (args.batch > 65535 || chunks * groups > 2147483647LL) return cudaErrorInvalidConfiguration;
  // the class group varies fastest (see region_stats_partials_kernel)
  dim3 grid(static_cast<unsigned>(chunks * groups), 1u, static_cast<unsigned>(args.batch));
  A* partials = static_cast<A*>(workspace);
  cudaError_t err = launch(region_stats_partials_kernel<T, L, A, LABELS>, grid, kBlock, 0, stream,
                           static_cast<const T*>(args.logits), static_cast<const L*>(args.labels),
                           static_cast<const T*>(args.target), SEGLOSS_LAUNCH_ARGS(A, args), partials);
  if (err != cudaSuccess) return err;
  const int64_t outputs = args.batch * args.channels * kNumSlots;
  const int threads = 256;
  return launch(region_stats_finish_kernel<A>, static_cast<unsigned>((outputs + threads - 1) / threads), threads, 0,
                stream, partials, args.batch, args.channels, groups, chunks, static_cast<A*>(out));
}

template <typename T, typename L, bool LABELS>
cudaError_t backward_typed(const RegionStatsArgs& args, const void* upstream, void* grad, cudaStream_t stream) {
  using A = typename AccType<T>::type;
  const int64_t total = args.batch * args.voxels;
  const int64_t blocks = std::min<int64_t>((total + kBlock - 1) / kBlock, args.max_backward_blocks);
  return launch(region_stats_backward_kernel<T, L, A, LABELS>, static_cast<unsigned>(std::max<int64_t>(blocks, 1)),
                kBlock, 0, stream, static_cast<const T*>(args.logits), static_cast<const L*>(args.labels),
                static_cast<const T*>(args.target), SEGLOSS_LAUNCH_ARGS(A, args), static_cast<const A*>(upstream),
                static_cast<T*>(grad));
}

// f<T, L, LABELS>() for the run-time dtype and label type.
template <typename F>
cudaError_t dispatch(const RegionStatsArgs& args, F&& f) {
  auto with_type = [&](auto type_tag) -> cudaError_t {
    using T = decltype(type_tag);
    switch (args.label_type) {
      case LabelType::kInt64:
        return f(T{}, static_cast<long long>(0), std::true_type{});
      case LabelType::kInt32:
        return f(T{}, static_cast<int>(0), std::true_type{});
      case LabelType::kUInt8:
        return f(T{}, static_cast<unsigned char>(0), std::true_type{});
      default:
        return f(T{}, static_cast<long long>(0), std::false_type{});
    }
  };
  switch (args.dtype) {
    case DType::kFloat32:
      return with_type(float{});
    case DType::kFloat64:
      return with_type(double{});
#if SEGLOSS_LOW_PRECISION
    case DType::kFloat16:
      return with_type(__half{});
    case DType::kBFloat16:
      return with_type(__nv_bfloat16{});
#else
    default:  // not instantiated on the emulated target (csrc/kernels/cuda_target.cuh says why)
      return cudaErrorInvalidValue;
#endif
  }
  return cudaErrorInvalidValue;
}

}  // namespace

size_t region_stats_workspace_bytes(const RegionStatsArgs& args) {
  return static_cast<size_t>(args.batch * group_count(args) * chunk_count(args) * kGroup * kNumSlots) *
         accumulator_bytes(args);
}

cudaError_t region_stats_forward(const RegionStatsArgs& args, void* out, void* workspace, cudaStream_t stream) {
  if (args.batch == 0 || args.channels == 0) return cudaSuccess;
  return dispatch(args, [&](auto t, auto l, auto labels) -> cudaError_t {
    return forward_typed<decltype(t), decltype(l), decltype(labels)::value>(args, out, workspace, stream);
  });
}

cudaError_t region_stats_backward(const RegionStatsArgs& args, const void* upstream, void* grad,
                                  cudaStream_t stream) {
  if (args.batch == 0 || args.channels == 0 || args.voxels == 0) return cudaSuccess;
  return dispatch(args, [&](auto t, auto l, auto labels) -> cudaError_t {
    return backward_typed<decltype(t), decltype(l), decltype(labels)::value>(args, upstream, grad, stream);
  });
}

}  // namespace cuda
}  // namespace segloss
