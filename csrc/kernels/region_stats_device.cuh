// CUDA kernels of the fused region statistics: device code only, so the same text compiles
// under nvcc (csrc/cuda/region_stats.cu launches it) and NVRTC (the CuPy backend loads it with
// cupy.RawModule and name expressions such as
// "segloss::region_stats_partials_kernel<float, long long, float, true>").
//
// Forward: grid (chunks · class groups, 1, B), kBlock threads. A block reduces a chunk of
// kChunk voxels of one sample for kGroup classes: each thread accumulates its voxels in
// registers, then a fixed-order block reduction (warp shuffles, then warps in order) writes
// one partial per (sample, group, chunk). region_stats_finish_kernel adds the partials of a
// (sample, class, statistic) in chunk order. No atomics: bitwise identical run to run.
// Backward: one thread per voxel (grid-stride), reading its logits and label once per pass,
// writing only the gradient.
#pragma once

#include "cuda_target.cuh"
#include "region_stats.cuh"

#if SEGLOSS_DEVICE_CODE

namespace segloss {

constexpr int kBlock = 256;
constexpr int kGroup = 8;         // classes per block
constexpr int kChunkVoxels = 4096;  // voxels per block (16 per thread)
constexpr int kMinWarp = 32;        // warpSize is 32 (NVIDIA) or 64 (the emulated target): sizes the shared array

struct NoLabel {};

template <typename T>
__device__ __forceinline__ typename AccType<T>::type to_acc(T x) {
  return static_cast<typename AccType<T>::type>(x);
}
#if SEGLOSS_LOW_PRECISION
template <>
__device__ __forceinline__ float to_acc<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
#endif

template <typename T>
__device__ __forceinline__ T from_acc(typename AccType<T>::type x) {
  return static_cast<T>(x);
}
#if SEGLOSS_LOW_PRECISION
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
#endif

template <typename A>
struct KernelArgs {
  int64_t batch, channels, voxels;
  const A* mask;  // (Mb, N) in the accumulation dtype, or null
  int64_t mask_batch_stride;
  int activation;
  int64_t ignore_index;
  bool has_ignore;
  bool want_ce_neg;
  const int64_t* regions;  // membership table of region-based training (region_bits), or null
  int64_t region_labels;   // its length
  const A* field_pred;    // φ of kFieldPred, (B, C, N), or null
  const A* field_sq_err;  // F of kFieldSqErr, (B, C, N), or null
};

// Weight and label of voxel n of sample b: w = 0 for ignored/invalid labels; *invalid set
// for labels outside the valid range that are not ignore_index ([0, table size) with regions);
// *bits the voxel's region membership (0 without regions or with weight 0).
template <typename L, typename A>
__device__ __forceinline__ A voxel_weight(const KernelArgs<A>& a, const L* labels, int64_t b, int64_t n,
                                          int64_t* label, bool* invalid, int64_t* bits) {
  A w = a.mask ? a.mask[b * a.mask_batch_stride + n] : A(1);
  *invalid = false;
  *label = -1;
  *bits = 0;
  if (labels != nullptr) {
    const int64_t value = static_cast<int64_t>(labels[b * a.voxels + n]);
    const bool ignored = a.has_ignore && value == a.ignore_index;
    const int64_t valid_max = a.regions ? a.region_labels : valid_label_max(a.channels, a.activation);
    const bool valid = label_is_valid(value, valid_max);
    *invalid = !ignored && !valid;
    if (ignored || !valid) w = A(0);
    *label = value;
    if (a.regions && w != A(0)) *bits = region_bits(a.regions, a.region_labels, value);
  }
  return w;
}

// The target g of class c at a voxel with this label (and region bits).
template <typename A>
__device__ __forceinline__ A label_target(const KernelArgs<A>& a, int64_t label, int64_t bits, int64_t c) {
  if (a.regions) return region_member(bits, c) ? A(1) : A(0);
  return label == label_of_channel(c, a.channels, a.activation) ? A(1) : A(0);
}

// Softmax max and 1/Σexp over the classes of one voxel (NaN propagates).
template <typename T, typename A>
__device__ __forceinline__ void softmax_stats(const T* z, int64_t channels, int64_t stride, A* m, A* inv, A* lse) {
  A mx = to_acc(z[0]);
  for (int64_t c = 1; c < channels; ++c) {
    const A v = to_acc(z[c * stride]);
    mx = (v > mx || v != v) ? v : mx;
  }
  A s = A(0);
  for (int64_t c = 0; c < channels; ++c) s += seg_exp(to_acc(z[c * stride]) - mx);
  *m = mx;
  *inv = A(1) / s;
  *lse = mx + seg_log(s);
}

template <typename T, typename A>
__device__ __forceinline__ void element_terms(int activation, A z, A m, A inv, A lse, A* p, A* nlp, A* nl1mp) {
  if (activation == kSoftmax) {
    *p = seg_exp(z - m) * inv;
    *nlp = lse - z;
    *nl1mp = A(0);
  } else if (activation == kSigmoid) {
    sigmoid_terms(z, p, nlp, nl1mp);
  } else {
    *p = z;
    *nlp = -seg_log(z);
    *nl1mp = -seg_log(A(1) - z);
  }
}

// Lane 0 of each warp gets the sum over the warp's warpSize lanes (32 on NVIDIA GPUs, 64 on the
// emulated target's wavefronts).
template <typename A>
__device__ __forceinline__ A warp_sum(A value) {
  for (int offset = warpSize / 2; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  return value;
}

template <typename A>
__device__ __forceinline__ KernelArgs<A> make_kernel_args(const A* mask, int64_t mask_batch_stride, int64_t batch,
                                                          int64_t channels, int64_t voxels, int activation,
                                                          int64_t ignore_index, int has_ignore, int want_ce_neg,
                                                          const int64_t* regions, int64_t region_labels,
                                                          const A* field_pred, const A* field_sq_err) {
  KernelArgs<A> a;
  a.batch = batch;
  a.channels = channels;
  a.voxels = voxels;
  a.mask = mask;
  a.mask_batch_stride = mask_batch_stride;
  a.activation = activation;
  a.ignore_index = ignore_index;
  a.has_ignore = has_ignore != 0;
  a.want_ce_neg = want_ce_neg != 0;
  a.regions = regions;
  a.region_labels = region_labels;
  a.field_pred = field_pred;
  a.field_sq_err = field_sq_err;
  return a;
}

// The fields' values of element (b, c, n) of weight w: 0 where a field is absent or w == 0 (so a
// non-finite field value at an ignored voxel adds nothing).
template <typename A>
__device__ __forceinline__ void field_values(const KernelArgs<A>& a, int64_t index, A w, A* phi, A* field) {
  const bool on = w != A(0);
  *phi = on && a.field_pred != nullptr ? a.field_pred[index] : A(0);
  *field = on && a.field_sq_err != nullptr ? a.field_sq_err[index] : A(0);
}

// Kernel parameters are scalars and pointers only (no structs), so CuPy can launch them too.
#define SEGLOSS_REGION_ARGS                                                                                 \
  const A *mask, int64_t mask_batch_stride, int64_t batch, int64_t channels, int64_t voxels, int activation, \
      int64_t ignore_index, int has_ignore, int want_ce_neg, const int64_t *regions, int64_t region_labels, \
      const A *field_pred, const A *field_sq_err
#define SEGLOSS_REGION_ARGS_PASS                                                                                \
  make_kernel_args<A>(mask, mask_batch_stride, batch, channels, voxels, activation, ignore_index, has_ignore, \
                      want_ce_neg, regions, region_labels, field_pred, field_sq_err)

// partials: (B, groups, chunks, kGroup, kNumSlots). Grid: (chunks · groups, 1, B) with the class
// group varying fastest, so that the ⌈C/8⌉ blocks of one chunk of voxels run next to each other
// and the later groups find the chunk's labels and logits in L2: DRAM reads them about once for
// any C (C <= 8: one group, one read).
template <typename T, typename L, typename A, bool LABELS>
__global__ void __launch_bounds__(kBlock) region_stats_partials_kernel(const T* logits, const L* labels, const T* target,
                                                                SEGLOSS_REGION_ARGS, A* partials) {
  const KernelArgs<A> a = SEGLOSS_REGION_ARGS_PASS;
  const int64_t C = a.channels, N = a.voxels;
  const int64_t groups = (C + kGroup - 1) / kGroup;
  const int64_t chunk = blockIdx.x / groups, group = blockIdx.x % groups, b = blockIdx.z;
  const int64_t chunks = gridDim.x / groups;
  const int64_t c0 = group * kGroup;
  const bool fields = a.field_pred != nullptr || a.field_sq_err != nullptr;
  A acc[kGroup][kNumSlots];
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
#pragma unroll
    for (int s = 0; s < kNumSlots; ++s) acc[j][s] = A(0);
  }
  const int64_t n_end = min(N, (chunk + 1) * static_cast<int64_t>(kChunkVoxels));
  for (int64_t n = chunk * kChunkVoxels + threadIdx.x; n < n_end; n += kBlock) {
    int64_t label, bits;
    bool invalid;
    const A w =
        voxel_weight<L, A>(a, LABELS ? labels : static_cast<const L*>(nullptr), b, n, &label, &invalid, &bits);
    if (invalid && group == 0) acc[0][kInvalid] += A(1);
    if (w == A(0)) continue;  // contributes exactly 0, whatever its logits
    const T* z = logits + b * C * N + n;
    A m = A(0), inv = A(1), lse = A(0);
    if (a.activation == kSoftmax) softmax_stats<T, A>(z, C, N, &m, &inv, &lse);
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const int64_t c = c0 + j;
      if (c < C) {
        A p, nlp, nl1mp;
        element_terms<T, A>(a.activation, to_acc(z[c * N]), m, inv, lse, &p, &nlp, &nl1mp);
        const A g = LABELS ? label_target(a, label, bits, c) : to_acc(target[(b * C + c) * N + n]);
        accumulate_element(p, g, w, nlp, nl1mp, a.want_ce_neg, acc[j]);
        if (fields) {
          A phi, field;
          field_values(a, (b * C + c) * N + n, w, &phi, &field);
          accumulate_field_element_strided<1>(p, g, w, phi, field, acc[j]);
        }
      }
    }
  }
  // fixed-order block reduction: warps of warpSize lanes (at least kMinWarp), then the warps in order
  __shared__ A shared[kBlock / kMinWarp][kGroup * kNumSlots];
  const int warp = threadIdx.x / warpSize, lane = threadIdx.x % warpSize, warps = kBlock / warpSize;
#pragma unroll
  for (int j = 0; j < kGroup; ++j) {
#pragma unroll
    for (int s = 0; s < kNumSlots; ++s) {
      const A total = warp_sum(acc[j][s]);
      if (lane == 0) shared[warp][j * kNumSlots + s] = total;
    }
  }
  __syncthreads();
  A* out = partials + ((b * groups + group) * chunks + chunk) * (kGroup * kNumSlots);
  for (int k = threadIdx.x; k < kGroup * kNumSlots; k += kBlock) {
    A total = A(0);
    for (int w = 0; w < warps; ++w) total += shared[w][k];
    out[k] = total;
  }
}

// out (B, C, kNumSlots) = Σ over chunks, in chunk order.
template <typename A>
__global__ void region_stats_finish_kernel(const A* partials, int64_t batch, int64_t channels, int64_t groups,
                                    int64_t chunks, A* out) {
  const int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t total = batch * channels * kNumSlots;
  if (index >= total) return;
  const int64_t s = index % kNumSlots;
  const int64_t c = (index / kNumSlots) % channels;
  const int64_t b = index / (kNumSlots * channels);
  const int64_t group = c / kGroup, j = c % kGroup;
  const A* src = partials + ((b * groups + group) * chunks) * (kGroup * kNumSlots) + j * kNumSlots + s;
  A sum = A(0);
  for (int64_t k = 0; k < chunks; ++k) sum += src[k * (kGroup * kNumSlots)];
  out[index] = sum;
}

// grad (B, C, N): one thread per voxel; upstream (B, C, kNumSlots).
template <typename T, typename L, typename A, bool LABELS>
__global__ void __launch_bounds__(kBlock) region_stats_backward_kernel(const T* logits, const L* labels, const T* target,
                                                                SEGLOSS_REGION_ARGS, const A* upstream, T* grad) {
  const KernelArgs<A> a = SEGLOSS_REGION_ARGS_PASS;
  const int64_t C = a.channels, N = a.voxels;
  const int64_t total = a.batch * N;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = index / N, n = index % N;
    int64_t label, bits;
    bool invalid;
    const A w =
        voxel_weight<L, A>(a, LABELS ? labels : static_cast<const L*>(nullptr), b, n, &label, &invalid, &bits);
    const T* z = logits + b * C * N + n;
    T* out = grad + b * C * N + n;
    const A* u = upstream + b * C * kNumSlots;
    A m = A(0), inv = A(1), lse = A(0);
    A dot = A(0), sum_dlogp = A(0);
    if (a.activation == kSoftmax) {
      softmax_stats<T, A>(z, C, N, &m, &inv, &lse);
      for (int64_t c = 0; c < C; ++c) {
        A p, nlp, nl1mp, dp, dl, dl1m;
        element_terms<T, A>(a.activation, to_acc(z[c * N]), m, inv, lse, &p, &nlp, &nl1mp);
        const A g = LABELS ? label_target(a, label, bits, c) : to_acc(target[(b * C + c) * N + n]);
        A phi, field;
        field_values(a, (b * C + c) * N + n, w, &phi, &field);
        element_gradient(p, g, w, load_stat_gradient(u + c * kNumSlots), phi, field, &dp, &dl, &dl1m);
        dot += p * dp;
        sum_dlogp += dl;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      A p, nlp, nl1mp, dp, dl, dl1m;
      element_terms<T, A>(a.activation, to_acc(z[c * N]), m, inv, lse, &p, &nlp, &nl1mp);
      const A g = LABELS ? label_target(a, label, bits, c) : to_acc(target[(b * C + c) * N + n]);
      A phi, field;
      field_values(a, (b * C + c) * N + n, w, &phi, &field);
      element_gradient(p, g, w, load_stat_gradient(u + c * kNumSlots), phi, field, &dp, &dl, &dl1m);
      out[c * N] = from_acc<T>(activation_backward(a.activation, p, dp, dl, dl1m, dot, sum_dlogp));
    }
  }
}

}  // namespace segloss

#endif  // SEGLOSS_DEVICE_CODE
