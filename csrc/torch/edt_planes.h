// The CPU's exact distance maps, one two-label transform per map, plane by plane (host only,
// framework-free: the threading is the caller's, csrc/torch/edt_cpu.cpp).
//
// Every map is the distance of each voxel to the nearest voxel on the other side of one set S
// (a class of a label map, or a binary mask): d_in inside S, d_out outside. One transform gives
// both, so a label map with K classes costs K transforms (not K outside + 1 multi-label inside).
// A volume (n0, n1, n2) (fewer dims: n1 = 1 and/or n2 = 1, spacing 1 there) is done in two phases:
//
//  A. along axis 0, the slowest one: for every column, the number of voxels to the nearest voxel
//     of the other side (a forward and a backward sweep, one plane of n1·n2 columns at a time, so
//     memory is streamed and the loops vectorise). Stored as a float count (exact) in the output.
//  B. plane by plane (x0 fixed): the plane's squared distances are transposed into a padded
//     buffer of doubles (160 KiB at 128²: it stays in the core's L2 cache), the lower envelope of
//     parabolas is taken along axis 1 on its rows, then along axis 2 (the contiguous one, last),
//     and the requested map is composed and written over the plane.
//
// On each line the envelope is taken separately over every run of voxels on the same side,
// bounded by zero-valued sites just outside the run (a voxel there is on the other side; anything
// farther along the line is dominated by it) — Felzenszwalb & Huttenlocher's linear-time algorithm
// (Theory of Computing 8, 2012). With F(p) = f(p) + s²p², the parabola of k is hidden by those of
// k' < k < q when (F(q) − F(k))(k − k') ≤ (F(k) − F(k'))(q − k) (no division), and parabola j + 1
// takes over from j after their intersection (F(j+1) − F(j)) / (2s²(j+1 − j)), so each parabola
// writes its stretch of the line in one loop. Runs of up to kDirectRun voxels take the minimum by
// its definition instead (direct_run). Anisotropic spacing is exact; everything is double until
// the composed distance is rounded to float once.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace segloss {
namespace edt_planes {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Per-thread scratch of phase B.
struct PlaneScratch {
  std::vector<double> columns;                // the plane transposed, (n2, leading(n1))
  std::vector<unsigned char> side_t;          // which side each voxel is on, same layout
  std::vector<double> rows;                   // one row of the last envelope
  std::vector<unsigned char> side;            // one row of sides
  std::vector<int> v;                         // envelope: positions p of the parabolas
  std::vector<double> F, f;                   // envelope: f(p) + s²p², f(p)
  static int64_t leading(int64_t n) { return n + 8; }  // padded rows: no cache-set conflicts
  void reserve(int64_t n1, int64_t n2) {
    const size_t line = static_cast<size_t>(std::max(n1, n2)) + 4;
    const size_t cells = static_cast<size_t>(leading(n1) * n2);
    if (columns.size() < cells) {
      columns.resize(cells);
      side_t.resize(cells);
    }
    if (rows.size() < static_cast<size_t>(n2)) {
      rows.resize(n2);
      side.resize(n2);
    }
    if (v.size() < line) {
      v.resize(line);
      F.resize(line);
      f.resize(line);
    }
  }
};

// Runs up to this long take the minimum over their voxels directly (below).
constexpr int kDirectRun = 128;

// The envelope of run [a, b) of a line of n voxels by its definition: for every q the minimum of
// s²(q − p)² + f(p) over the run's voxels p and the zero sites at a − 1 and b (where they exist).
// (b − a)² multiply-adds in a loop without branches that vectorises: for runs this short, faster
// than the stack algorithm, whose branches a processor cannot predict; and exact.
template <typename Value, typename Write>
inline void direct_run(int a, int b, int n, double s2, Value value, Write write) {
  alignas(64) double best[kDirectRun];
  const int length = b - a;
  for (int i = 0; i < length; ++i) {
    const double left = a > 0 ? static_cast<double>(i + 1) : kInf;
    const double right = b < n ? static_cast<double>(length - i) : kInf;
    const double m = left < right ? left : right;
    best[i] = s2 * m * m;  // inf stays inf
  }
  for (int p = 0; p < length; ++p) {
    const double fp = value(a + p);
    if (!(fp < kInf)) continue;
    const double pd = static_cast<double>(p);
    for (int i = 0; i < length; ++i) {
      const double d = static_cast<double>(i) - pd;
      const double c = s2 * d * d + fp;
      best[i] = c < best[i] ? c : best[i];
    }
  }
  for (int i = 0; i < length; ++i) write(a + i, best[i]);
}

// The envelope of one line of n voxels, run by run. value(q): the squared distance so far (+inf:
// none); side(q): which side q is on; write(q, squared distance). v, F, f: n + 2 entries each.
template <typename Value, typename Side, typename Write>
inline void envelope_line(int n, double s2, Value value, Side side, Write write, int* v, double* F, double* f) {
  int a = 0;
  while (a < n) {
    const bool s = side(a);
    int b = a + 1;
    while (b < n && side(b) == s) ++b;
    if (b - a <= kDirectRun) {
      direct_run(a, b, n, s2, value, write);
      a = b;
      continue;
    }
    int k = -1;  // top of the stack
    auto push = [&](int q, double fq) {
      const double qd = static_cast<double>(q);
      const double Fq = fq + s2 * qd * qd;
      while (k > 0 && (Fq - F[k]) * static_cast<double>(v[k] - v[k - 1]) <=
                          (F[k] - F[k - 1]) * static_cast<double>(q - v[k])) {
        --k;
      }
      ++k;
      v[k] = q;
      F[k] = Fq;
      f[k] = fq;
    };
    if (a > 0) push(a - 1, 0.0);
    for (int q = a; q < b; ++q) {
      const double fq = value(q);
      if (fq < kInf) push(q, fq);
    }
    if (b < n) push(b, 0.0);
    if (k < 0) {
      for (int q = a; q < b; ++q) write(q, kInf);
    } else {
      // parabola j is the lowest from the first integer after its intersection with j − 1 on
      int q = a;
      for (int j = 0; j <= k && q < b; ++j) {
        int end = b;
        if (j < k) {
          const double z = (F[j + 1] - F[j]) / (2.0 * s2 * static_cast<double>(v[j + 1] - v[j]));
          if (z < static_cast<double>(q)) {
            end = q;  // lowest at no voxel
          } else if (z < static_cast<double>(b)) {
            end = static_cast<int>(z) + 1;  // z >= q >= 0: the cast is the floor
          }
        }
        const double vj = static_cast<double>(v[j]), fj = f[j];
        for (; q < end; ++q) {
          const double d = static_cast<double>(q) - vj;
          write(q, s2 * d * d + fj);
        }
      }
    }
    a = b;
  }
}

// What a map holds, per voxel, from the squared distance d² to the other side (the codes of
// DistanceKind in csrc/kernels/edt.cuh).
inline float compose(int kind, bool inside, double d2) {
  const double d = std::sqrt(d2);
  switch (kind) {
    case 0:  // boundary_loss: −(d_in − 1) inside, d_out outside
      return static_cast<float>(inside ? -(d - 1.0) : d);
    case 1:  // signed: −d_in, d_out
      return static_cast<float>(inside ? -d : d);
    case 2:  // signed_inside_positive: d_in, −d_out
      return static_cast<float>(inside ? d : -d);
    case 3:  // boundary: d_in + d_out
      return static_cast<float>(d);
    case 4:  // inside: d_in
      return inside ? static_cast<float>(d) : 0.0f;
    default:  // outside: d_out
      return inside ? 0.0f : static_cast<float>(d);
  }
}

// out[i] = compose(kind, side[i], d2[i]) for i < n, one loop per kind (they vectorise).
template <int Kind>
inline void compose_row(int64_t n, const double* d2, const unsigned char* side, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = compose(Kind, side[i] != 0, d2[i]);
}

inline void compose_row(int kind, int64_t n, const double* d2, const unsigned char* side, float* out) {
  switch (kind) {
    case 0: return compose_row<0>(n, d2, side, out);
    case 1: return compose_row<1>(n, d2, side, out);
    case 2: return compose_row<2>(n, d2, side, out);
    case 3: return compose_row<3>(n, d2, side, out);
    case 4: return compose_row<4>(n, d2, side, out);
    default: return compose_row<5>(n, d2, side, out);
  }
}

// Phase A on columns [j0, j1) of a volume (n0, plane = n1·n2): out[x0·plane + j] = voxels along
// axis 0 from (x0, j) to the nearest voxel on the other side, +inf if the column has none.
// inside(x) tells the side of voxel x (flat index). next: scratch of j1 − j0 floats.
template <typename Inside>
inline void axis0_counts(int64_t n0, int64_t plane, int64_t j0, int64_t j1, Inside inside, float* out, float* next) {
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t j = j0; j < j1; ++j) out[j] = inf;
  for (int64_t x0 = 1; x0 < n0; ++x0) {
    float* row = out + x0 * plane;
    const float* prev = row - plane;
    for (int64_t j = j0; j < j1; ++j) {
      row[j] = inside(x0 * plane + j) != inside((x0 - 1) * plane + j) ? 1.0f : prev[j] + 1.0f;
    }
  }
  for (int64_t j = j0; j < j1; ++j) next[j - j0] = inf;
  for (int64_t x0 = n0 - 2; x0 >= 0; --x0) {
    float* row = out + x0 * plane;
    for (int64_t j = j0; j < j1; ++j) {
      const float d = inside(x0 * plane + j) != inside((x0 + 1) * plane + j) ? 1.0f : next[j - j0] + 1.0f;
      next[j - j0] = d;
      row[j] = std::min(row[j], d);
    }
  }
}

// Phase B on plane x0 of a volume whose phase A is in out: envelopes along axis 1 (rows of the
// transposed plane, in place), then along axis 2, then the map of `kind`, written over the plane.
// spacing: the three axes' voxel sizes.
template <typename Inside>
inline void plane_maps(int64_t n1, int64_t n2, int64_t x0, const double* spacing, int kind, Inside inside,
                       float* out, PlaneScratch& scratch) {
  scratch.reserve(n1, n2);
  const int64_t base = x0 * n1 * n2;
  const int64_t ld = PlaneScratch::leading(n1);
  float* p = out + base;
  double* t = scratch.columns.data();             // (n2, ld): the plane transposed
  unsigned char* side_t = scratch.side_t.data();  // (n2, ld)
  unsigned char* side = scratch.side.data();      // one row
  double* row = scratch.rows.data();              // one row
  const double s0 = spacing[0], s1sq = spacing[1] * spacing[1], s2sq = spacing[2] * spacing[2];
  int* v = scratch.v.data();
  double* F = scratch.F.data();
  double* f = scratch.f.data();
  for (int64_t y = 0; y < n1; ++y) {  // squared phase-A distances and sides, transposed
    const float* prow = p + y * n2;
    for (int64_t z = 0; z < n2; ++z) {
      const double c = static_cast<double>(prow[z]) * s0;
      t[z * ld + y] = c * c;  // inf stays inf
      side_t[z * ld + y] = inside(base + y * n2 + z) ? 1 : 0;
    }
  }
  for (int64_t z = 0; z < n2; ++z) {  // along axis 1: row z of t, in place
    double* c = t + z * ld;
    const unsigned char* sc = side_t + z * ld;
    envelope_line(
        static_cast<int>(n1), s1sq, [&](int q) { return c[q]; }, [&](int q) { return sc[q] != 0; },
        [&](int q, double d2) { c[q] = d2; }, v, F, f);
  }
  for (int64_t y = 0; y < n1; ++y) {  // along axis 2: row y of the plane, composed
    for (int64_t z = 0; z < n2; ++z) side[z] = side_t[z * ld + y];
    envelope_line(
        static_cast<int>(n2), s2sq, [&](int q) { return t[q * ld + y]; }, [&](int q) { return side[q] != 0; },
        [&](int q, double d2) { row[q] = d2; }, v, F, f);
    compose_row(kind, n2, row, side, p + y * n2);
  }
}

}  // namespace edt_planes
}  // namespace segloss
