// Exact Euclidean distance transforms, one line at a time (framework-free, host and device).
//
// The squared distance to the nearest site separates over axes (Saito & Toriwaki 1994):
// pass 1 scans each line along one axis for the nearest site; every further pass replaces f
// on each line along the next axis by the lower envelope of parabolas
//     f'(q) = min_p ( s² (q − p)² + f(p) ),
// in linear time (Felzenszwalb & Huttenlocher, Theory of Computing 8, 2012). s is the voxel
// spacing along that axis, so anisotropic spacing is exact. Values are squared physical
// distances (float between passes, double inside a line); +inf means "no site reached".
//
// Multi-label variant (one pass set for every class of a label map at once): the distance of
// each voxel to the nearest voxel with a *different* label, i.e. the inside distance d_in of
// every class. Pass 1 measures runs of equal labels; later passes apply the envelope to each run
// separately, with a zero-valued site just outside each end of the run (the neighbouring voxel
// has another label; any voxel farther away is dominated by it).
#pragma once

#include "common.cuh"

namespace segloss {

#if defined(__CUDACC_RTC__) || defined(__CUDA_ARCH__)
#define SEGLOSS_EDT_INF __longlong_as_double(0x7ff0000000000000LL)
#else
#define SEGLOSS_EDT_INF HUGE_VAL
#endif

// Pass 1, binary sites: f[q·stride_out] = (s · voxels from q to the nearest q' with site(q'))²,
// +inf if the line has no site.
template <typename SiteFn>
SEGLOSS_HD void edt_first_pass(SiteFn site, int n, float* f, int64_t stride_out, double s) {
  const float inf = static_cast<float>(SEGLOSS_EDT_INF);
  int last = -1;
  for (int q = 0; q < n; ++q) {
    if (site(q)) last = q;
    f[q * stride_out] = last >= 0 ? static_cast<float>(q - last) : inf;
  }
  int next = -1;
  for (int q = n - 1; q >= 0; --q) {
    if (site(q)) next = q;
    float d = f[q * stride_out];
    if (next >= 0 && static_cast<float>(next - q) < d) d = static_cast<float>(next - q);
    const double physical = static_cast<double>(d) * s;
    f[q * stride_out] = d == inf ? inf : static_cast<float>(physical * physical);
  }
}

// Pass 1, multi-label: distance from q to the nearest voxel of the line whose label differs.
template <typename LabelFn>
SEGLOSS_HD void edt_first_pass_multilabel(LabelFn label, int n, float* f, int64_t stride_out, double s) {
  const float inf = static_cast<float>(SEGLOSS_EDT_INF);
  int run_start = 0;
  for (int q = 0; q < n; ++q) {
    if (q > 0 && label(q) != label(q - 1)) run_start = q;
    f[q * stride_out] = run_start > 0 ? static_cast<float>(q - run_start + 1) : inf;
  }
  int run_end = n - 1;
  for (int q = n - 1; q >= 0; --q) {
    if (q < n - 1 && label(q) != label(q + 1)) run_end = q;
    float d = f[q * stride_out];
    if (run_end < n - 1 && static_cast<float>(run_end - q + 1) < d) d = static_cast<float>(run_end - q + 1);
    const double physical = static_cast<double>(d) * s;
    f[q * stride_out] = d == inf ? inf : static_cast<float>(physical * physical);
  }
}

// Lower envelope on a contiguous array g[0..n) in place. Scratch: v (n ints), z (n + 1), fk (n).
SEGLOSS_HD void edt_envelope(float* g, int64_t stride, int n, double s2, int* v, double* z, double* fk) {
  const double inf = SEGLOSS_EDT_INF;
  int k = -1;
  for (int q = 0; q < n; ++q) {
    const double fq = static_cast<double>(g[q * stride]);
    if (!(fq < inf)) continue;  // +inf: no parabola here
    if (k < 0) {
      k = 0;
      v[0] = q;
      fk[0] = fq;
      z[0] = -inf;
      z[1] = inf;
      continue;
    }
    const double qq = static_cast<double>(q);
    double sect;
    for (;;) {
      const double p = static_cast<double>(v[k]);
      sect = ((fq + s2 * qq * qq) - (fk[k] + s2 * p * p)) / (2.0 * s2 * (qq - p));
      if (sect <= z[k]) {
        --k;  // z[0] = −inf stops this at k = 0
        continue;
      }
      break;
    }
    ++k;
    v[k] = q;
    fk[k] = fq;
    z[k] = sect;
    z[k + 1] = inf;
  }
  if (k < 0) return;  // the whole line is +inf and stays so
  int j = 0;
  for (int q = 0; q < n; ++q) {
    const double qq = static_cast<double>(q);
    while (z[j + 1] < qq) ++j;
    const double d = qq - static_cast<double>(v[j]);
    g[q * stride] = static_cast<float>(s2 * d * d + fk[j]);
  }
}

// A later pass, binary: the envelope of the whole strided line (zero and +inf lines skipped).
SEGLOSS_HD void edt_parabola_pass(float* f, int64_t stride, int n, double s2, int* v, double* z, double* fk) {
  const float inf = static_cast<float>(SEGLOSS_EDT_INF);
  bool all_zero = true, all_inf = true;
  for (int q = 0; q < n; ++q) {
    const float fq = f[q * stride];
    all_zero = all_zero && fq == 0.0f;
    all_inf = all_inf && !(fq < inf);
  }
  if (all_zero || all_inf) return;
  edt_envelope(f, stride, n, s2, v, z, fk);
}

// A later pass, multi-label: the envelope of each run of equal labels, bounded by zero sites just
// outside it. Scratch: g (n + 2 floats) besides v, z, fk (each for n + 2).
template <typename LabelFn>
SEGLOSS_HD void edt_parabola_pass_multilabel(LabelFn label, float* f, int64_t stride, int n, double s2, int* v,
                                             double* z, double* fk, float* g) {
  int a = 0;
  while (a < n) {
    int b = a + 1;
    while (b < n && label(b) == label(a)) ++b;
    // run [a, b): g = [0 if a > 0] f[a..b) [0 if b < n]
    const int lead = a > 0 ? 1 : 0;
    const int m = (b - a) + lead + (b < n ? 1 : 0);
    if (lead) g[0] = 0.0f;
    for (int q = a; q < b; ++q) g[lead + q - a] = f[q * stride];
    if (b < n) g[m - 1] = 0.0f;
    edt_envelope(g, 1, m, s2, v, z, fk);
    for (int q = a; q < b; ++q) f[q * stride] = g[lead + q - a];
    a = b;
  }
}

// What the distance-map op writes, per voxel of class c, from the squared distances.
enum DistanceKind : int {
  kSignedBoundaryLoss = 0,  // inside −(d_in − 1), outside d_out (LIVIAETS one_hot2dist)
  kSigned = 1,              // inside −d_in, outside d_out
  kSignedInsidePositive = 2,  // inside d_in, outside −d_out
  kUnsignedBoundary = 3,    // d_in + d_out
  kUnsignedInside = 4,      // d_in
  kUnsignedOutside = 5,     // d_out
};

SEGLOSS_HD float compose_distance(int kind, bool inside, float d_in_sq, float d_out_sq) {
  const float d_in = inside ? sqrtf(d_in_sq) : 0.0f;
  const float d_out = inside ? 0.0f : sqrtf(d_out_sq);
  switch (kind) {
    case kSignedBoundaryLoss:
      return inside ? -(d_in - 1.0f) : d_out;
    case kSigned:
      return inside ? -d_in : d_out;
    case kSignedInsidePositive:
      return inside ? d_in : -d_out;
    case kUnsignedBoundary:
      return d_in + d_out;
    case kUnsignedInside:
      return d_in;
    default:
      return d_out;
  }
}

}  // namespace segloss
