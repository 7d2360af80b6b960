// CUDA kernels of the exact distance maps (device code only: nvcc via csrc/cuda/edt.cu, NVRTC
// via CuPy). Batched over all volumes × lines in one launch per axis: no per-image or per-class
// launches, no padding to a cube. One thread per line; consecutive threads take adjacent lines,
// so the strided passes read and write coalesced. Volumes without a boundary cost almost nothing
// (their lines are all +inf or all 0 and are skipped).
#pragma once

#include "cuda_target.cuh"
#include "edt.cuh"

#if SEGLOSS_DEVICE_CODE

namespace segloss {

constexpr int kEdtBlock = 128;

// Voxel counts of each class per sample (labels mode) or of each mask (masks mode): a block
// histogram in shared memory, then one integer atomic per bin (integer sums: deterministic).
template <typename L>
__global__ void edt_count_kernel(const L* labels, int64_t volumes, int64_t voxels, int64_t classes,
                                 int64_t ignore_index, bool has_ignore, unsigned long long* counts) {
  SEGLOSS_DYNAMIC_SHARED(unsigned long long, histogram);
  const int64_t v = blockIdx.y;  // sample (labels) or mask volume (classes == 1)
  for (int64_t c = threadIdx.x; c < classes; c += blockDim.x) histogram[c] = 0;
  __syncthreads();
  for (int64_t x = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; x < voxels;
       x += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t l = static_cast<int64_t>(labels[v * voxels + x]);
    if (classes == 1) {
      if (l != 0) atomicAdd(&histogram[0], 1ULL);
    } else if (l >= 0 && l < classes && !(has_ignore && l == ignore_index)) {
      atomicAdd(&histogram[l], 1ULL);
    }
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < classes; c += blockDim.x) {
    if (histogram[c]) atomicAdd(&counts[v * classes + c], histogram[c]);
  }
}

// Pass 1 along the last axis. Volume `vol` reads labels of sample vol / label_div; in binary
// mode the site test is label == vol % label_div (the class), in multi-label mode the label itself.
template <typename L>
__global__ void edt_first_pass_kernel(const L* labels, float* out, int64_t volumes, int64_t voxels, int n,
                                      int64_t label_div, bool multilabel, bool mask_mode, double spacing) {
  const int64_t lines_per_volume = voxels / n;
  const int64_t lines = volumes * lines_per_volume;
  for (int64_t task = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; task < lines;
       task += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t vol = task / lines_per_volume;
    const int64_t start = (task % lines_per_volume) * n;
    const L* lab = labels + (vol / label_div) * voxels + start;
    float* f = out + vol * voxels + start;
    if (multilabel) {
      if (mask_mode) {
        edt_first_pass_multilabel([&](int q) { return lab[q] != 0; }, n, f, 1, spacing);
      } else {
        edt_first_pass_multilabel([&](int q) { return static_cast<int64_t>(lab[q]); }, n, f, 1, spacing);
      }
    } else {
      const int64_t cls = vol % label_div;
      edt_first_pass([&](int q) { return static_cast<int64_t>(lab[q]) == cls; }, n, f, 1, spacing);
    }
  }
}

// An envelope pass along an axis of length n with `stride` (elements) for every volume.
// Scratch per thread: v (n + 2 ints), z (n + 3), fk (n + 2 doubles), g (n + 2 floats).
template <typename L>
__global__ void edt_parabola_kernel(const L* labels, float* out, int64_t volumes, int64_t voxels, int n,
                                    int64_t stride, int64_t label_div, bool multilabel, bool mask_mode,
                                    double spacing, int* v_scratch, double* z_scratch, double* f_scratch,
                                    float* g_scratch) {
  const int64_t outer = voxels / (stride * n);
  const int64_t lines_per_volume = outer * stride;
  const int64_t lines = volumes * lines_per_volume;
  const int64_t thread = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  int* v = v_scratch + thread * (n + 2);
  double* z = z_scratch + thread * (n + 3);
  double* fk = f_scratch + thread * (n + 2);
  float* g = g_scratch + thread * (n + 2);
  const double s2 = spacing * spacing;
  for (int64_t task = thread; task < lines; task += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t vol = task / lines_per_volume;
    const int64_t rest = task % lines_per_volume;
    const int64_t base = (rest / stride) * n * stride + rest % stride;
    float* f = out + vol * voxels + base;
    if (multilabel) {
      const L* lab = labels + (vol / label_div) * voxels + base;
      if (mask_mode) {
        edt_parabola_pass_multilabel([&](int q) { return lab[q * stride] != 0; }, f, stride, n, s2, v, z, fk, g);
      } else {
        edt_parabola_pass_multilabel([&](int q) { return static_cast<int64_t>(lab[q * stride]); }, f, stride, n,
                                     s2, v, z, fk, g);
      }
    } else {
      edt_parabola_pass(f, stride, n, s2, v, z, fk);
    }
  }
}

// Label maps: out (B, C, N) from the outside transforms in out and the inside transform din (B, N).
template <typename L>
__global__ void edt_compose_labels_kernel(const L* labels, const float* din, float* out, int64_t batch,
                                          int64_t classes, int64_t voxels, const unsigned long long* counts,
                                          int kind, float no_boundary) {
  const int64_t total = batch * classes * voxels;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t x = i % voxels, vol = i / voxels, b = vol / classes, c = vol % classes;
    const unsigned long long count = counts[vol];
    if (count == 0 || count == static_cast<unsigned long long>(voxels)) {
      out[i] = no_boundary;
      continue;
    }
    const bool inside = static_cast<int64_t>(labels[b * voxels + x]) == c;
    out[i] = compose_distance(kind, inside, din[b * voxels + x], out[i]);
  }
}

// Binary masks: out (V, N) holds the distance to the other side; compose in place.
__global__ void edt_compose_masks_kernel(const unsigned char* masks, float* out, int64_t volumes, int64_t voxels,
                                         const unsigned long long* counts, int kind, float no_boundary) {
  const int64_t total = volumes * voxels;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const unsigned long long count = counts[i / voxels];
    if (count == 0 || count == static_cast<unsigned long long>(voxels)) {
      out[i] = no_boundary;
      continue;
    }
    out[i] = compose_distance(kind, masks[i] != 0, out[i], out[i]);
  }
}

}  // namespace segloss

#endif  // SEGLOSS_DEVICE_CODE
