// CPU implementation of the distance-map ops, parallel over lines with at::parallel_for.
//
// Label maps (B, *S) with C classes: one multi-label transform per sample gives every class's
// inside distance; one binary transform per (sample, present class) gives its outside distance
// (classes absent or filling the sample are skipped and filled); a last pass composes the
// requested map. Binary masks (B, C, *S): one multi-label transform per mask (a 0/1 map) gives
// both distances at once. Strided axes are processed kBatch adjacent lines at a time through
// small row-major buffers, so every read and write touches consecutive memory.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../kernels/edt.cuh"
#include "edt.h"

namespace segloss {
namespace {

constexpr int64_t kBatch = 16;

struct Geometry {
  std::vector<int64_t> sizes;  // spatial sizes
  int64_t voxels = 1;
  int ndim() const { return static_cast<int>(sizes.size()); }
  int64_t stride(int axis) const {
    int64_t s = 1;
    for (int a = axis + 1; a < ndim(); ++a) s *= sizes[a];
    return s;
  }
};

struct Scratch {
  std::vector<int> v;
  std::vector<double> z, fk;
  std::vector<float> g, rows;
  std::vector<int64_t> label_rows;
  explicit Scratch(int64_t n)
      : v(n + 2), z(n + 3), fk(n + 2), g(n + 2), rows(n * kBatch), label_rows(n * kBatch) {}
};

// One transform over `volumes` volumes of geometry `geo`, writing squared distances to
// out + volume · voxels. label_of(volume, voxel) gives the label (multi-label) and
// site_of(volume, voxel) the binary site; `multilabel` selects which is used. Volumes listed in
// `active` are transformed, the others left untouched.
template <typename LabelOf, typename SiteOf>
void transform(const Geometry& geo, const std::vector<int64_t>& active, float* out, const std::vector<double>& spacing,
               bool multilabel, LabelOf label_of, SiteOf site_of) {
  const int ndim = geo.ndim();
  const int last = ndim - 1;
  const int64_t n_last = geo.sizes[last];
  const int64_t lines_last = geo.voxels / n_last;
  const int64_t count = static_cast<int64_t>(active.size());
  // pass 1 along the contiguous axis
  at::parallel_for(0, count * lines_last, std::max<int64_t>(1, 4096 / n_last), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t vol = active[task / lines_last];
      const int64_t start = (task % lines_last) * n_last;
      float* f = out + vol * geo.voxels + start;
      if (multilabel) {
        edt_first_pass_multilabel([&](int q) { return label_of(vol, start + q); }, static_cast<int>(n_last), f, 1,
                                  spacing[last]);
      } else {
        edt_first_pass([&](int q) { return site_of(vol, start + q); }, static_cast<int>(n_last), f, 1,
                       spacing[last]);
      }
    }
  });
  // envelope passes along the other axes
  for (int axis = last - 1; axis >= 0; --axis) {
    const int64_t n = geo.sizes[axis];
    const int64_t stride = geo.stride(axis);
    const int64_t outer = geo.voxels / (stride * n);
    const int64_t batches = (stride + kBatch - 1) / kBatch;
    const double s2 = spacing[axis] * spacing[axis];
    at::parallel_for(0, count * outer * batches, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch(n);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t vol = active[task / (outer * batches)];
        const int64_t rest = task % (outer * batches);
        const int64_t o = rest / batches, i0 = (rest % batches) * kBatch;
        const int64_t width = std::min(kBatch, stride - i0);
        const int64_t base = o * n * stride + i0;
        float* f = out + vol * geo.voxels + base;
        for (int64_t q = 0; q < n; ++q) {
          for (int64_t j = 0; j < width; ++j) scratch.rows[q * kBatch + j] = f[q * stride + j];
          if (multilabel) {
            for (int64_t j = 0; j < width; ++j) {
              scratch.label_rows[q * kBatch + j] = label_of(vol, base + q * stride + j);
            }
          }
        }
        for (int64_t j = 0; j < width; ++j) {
          float* line = scratch.rows.data() + j;
          if (multilabel) {
            const int64_t* labels = scratch.label_rows.data() + j;
            edt_parabola_pass_multilabel([&](int q) { return labels[q * kBatch]; }, line, kBatch, static_cast<int>(n),
                                         s2, scratch.v.data(), scratch.z.data(), scratch.fk.data(), scratch.g.data());
          } else {
            edt_parabola_pass(line, kBatch, static_cast<int>(n), s2, scratch.v.data(), scratch.z.data(),
                              scratch.fk.data());
          }
        }
        for (int64_t q = 0; q < n; ++q) {
          for (int64_t j = 0; j < width; ++j) f[q * stride + j] = scratch.rows[q * kBatch + j];
        }
      }
    });
  }
}

Geometry geometry_of(const at::Tensor& t, int skip) {
  Geometry geo;
  geo.sizes.assign(t.sizes().begin() + skip, t.sizes().end());
  for (int64_t s : geo.sizes) geo.voxels *= s;
  return geo;
}

std::vector<double> checked_spacing(at::ArrayRef<double> spacing, int ndim) {
  TORCH_CHECK(static_cast<int>(spacing.size()) == ndim, "segloss distance maps: spacing has ", spacing.size(),
              " values for ", ndim, " spatial dims");
  for (double s : spacing) TORCH_CHECK(s > 0, "segloss distance maps: spacing must be positive, got ", s);
  return std::vector<double>(spacing.begin(), spacing.end());
}

template <typename L>
at::Tensor label_maps_typed(const at::Tensor& labels, int64_t classes, const std::vector<double>& spacing,
                            int64_t kind, double no_boundary, int64_t ignore_index, bool has_ignore) {
  const Geometry geo = geometry_of(labels, 1);
  const int64_t batch = labels.size(0);
  const L* lab = labels.data_ptr<L>();
  at::Tensor out = at::empty({batch, classes, geo.voxels}, labels.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  // class presence: voxel counts per (sample, class), in a fixed order
  std::vector<int64_t> counts(batch * classes, 0);
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t x = 0; x < geo.voxels; ++x) {
        const int64_t l = static_cast<int64_t>(lab[b * geo.voxels + x]);
        if (l >= 0 && l < classes && !(has_ignore && l == ignore_index)) ++counts[b * classes + l];
      }
    }
  });
  std::vector<int64_t> with_boundary;
  for (int64_t i = 0; i < batch * classes; ++i) {
    if (counts[i] > 0 && counts[i] < geo.voxels) with_boundary.push_back(i);
  }
  const bool need_in = kind != kUnsignedOutside;
  const bool need_out = kind != kUnsignedInside;
  at::Tensor inside_sq;
  if (need_in && !with_boundary.empty()) {  // every class's inside distance, one transform per sample
    inside_sq = at::empty({batch, geo.voxels}, out.options());
    std::vector<int64_t> samples(batch);
    for (int64_t b = 0; b < batch; ++b) samples[b] = b;
    transform(geo, samples, inside_sq.data_ptr<float>(), spacing, true,
              [&](int64_t b, int64_t x) { return static_cast<int64_t>(lab[b * geo.voxels + x]); },
              [](int64_t, int64_t) { return false; });
  }
  if (need_out && !with_boundary.empty()) {  // outside distance of each class that has a boundary
    transform(geo, with_boundary, o, spacing, false, [](int64_t, int64_t) { return int64_t(0); },
              [&](int64_t vol, int64_t x) {
                const int64_t b = vol / classes, c = vol % classes;
                return static_cast<int64_t>(lab[b * geo.voxels + x]) == c;
              });
  }
  const float* din = inside_sq.defined() ? inside_sq.data_ptr<float>() : nullptr;
  at::parallel_for(0, batch * classes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t vol = begin; vol < end; ++vol) {
      const int64_t b = vol / classes, c = vol % classes;
      float* dst = o + vol * geo.voxels;
      const bool boundary = counts[vol] > 0 && counts[vol] < geo.voxels;
      if (!boundary) {
        std::fill(dst, dst + geo.voxels, static_cast<float>(no_boundary));
        continue;
      }
      const L* lb = lab + b * geo.voxels;
      const float* db = din ? din + b * geo.voxels : nullptr;
      for (int64_t x = 0; x < geo.voxels; ++x) {
        const bool inside = static_cast<int64_t>(lb[x]) == c;
        dst[x] = compose_distance(static_cast<int>(kind), inside, db ? db[x] : 0.0f, need_out ? dst[x] : 0.0f);
      }
    }
  });
  std::vector<int64_t> shape = {batch, classes};
  shape.insert(shape.end(), geo.sizes.begin(), geo.sizes.end());
  return out.view(shape);
}

}  // namespace

at::Tensor label_distance_maps_cpu(const at::Tensor& labels, int64_t num_classes, at::ArrayRef<double> spacing,
                                   int64_t kind, double no_boundary_value, int64_t ignore_index, bool has_ignore) {
  TORCH_CHECK(labels.dim() >= 2 && labels.dim() <= 4, "segloss::label_distance_maps: labels must be (B, *spatial) ",
              "with 1 to 3 spatial dims, got ", labels.sizes());
  TORCH_CHECK(num_classes >= 1, "segloss::label_distance_maps: num_classes must be >= 1");
  TORCH_CHECK(kind >= 0 && kind <= 5, "segloss::label_distance_maps: unknown kind ", kind);
  const std::vector<double> sp = checked_spacing(spacing, static_cast<int>(labels.dim() - 1));
  at::Tensor l = labels.contiguous();
  switch (l.scalar_type()) {
    case at::kLong:
      return label_maps_typed<int64_t>(l, num_classes, sp, kind, no_boundary_value, ignore_index, has_ignore);
    case at::kInt:
      return label_maps_typed<int32_t>(l, num_classes, sp, kind, no_boundary_value, ignore_index, has_ignore);
    case at::kByte:
      return label_maps_typed<uint8_t>(l, num_classes, sp, kind, no_boundary_value, ignore_index, has_ignore);
    default:
      return label_maps_typed<int64_t>(l.to(at::kLong), num_classes, sp, kind, no_boundary_value, ignore_index,
                                       has_ignore);
  }
}

at::Tensor mask_distance_maps_cpu(const at::Tensor& masks, at::ArrayRef<double> spacing, int64_t kind,
                                  double no_boundary_value) {
  TORCH_CHECK(masks.dim() >= 3 && masks.dim() <= 5, "segloss::mask_distance_maps: masks must be (B, C, *spatial) ",
              "with 1 to 3 spatial dims, got ", masks.sizes());
  TORCH_CHECK(kind >= 0 && kind <= 5, "segloss::mask_distance_maps: unknown kind ", kind);
  const std::vector<double> sp = checked_spacing(spacing, static_cast<int>(masks.dim() - 2));
  at::Tensor m = masks.to(at::kByte).contiguous();
  const Geometry geo = geometry_of(m, 2);
  const int64_t volumes = m.size(0) * m.size(1);
  const uint8_t* mk = m.data_ptr<uint8_t>();
  at::Tensor out = at::empty(m.sizes(), m.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  std::vector<int64_t> counts(volumes, 0);
  at::parallel_for(0, volumes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t v = begin; v < end; ++v) {
      int64_t c = 0;
      for (int64_t x = 0; x < geo.voxels; ++x) c += mk[v * geo.voxels + x] != 0;
      counts[v] = c;
    }
  });
  std::vector<int64_t> active;
  for (int64_t v = 0; v < volumes; ++v) {
    if (counts[v] > 0 && counts[v] < geo.voxels) active.push_back(v);
  }
  // a 0/1 map is a two-label map: the distance to the other label is d_in inside, d_out outside
  transform(geo, active, o, sp, true,
            [&](int64_t v, int64_t x) { return static_cast<int64_t>(mk[v * geo.voxels + x] != 0); },
            [](int64_t, int64_t) { return false; });
  at::parallel_for(0, volumes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t v = begin; v < end; ++v) {
      float* dst = o + v * geo.voxels;
      if (!(counts[v] > 0 && counts[v] < geo.voxels)) {
        std::fill(dst, dst + geo.voxels, static_cast<float>(no_boundary_value));
        continue;
      }
      const uint8_t* mv = mk + v * geo.voxels;
      for (int64_t x = 0; x < geo.voxels; ++x) {
        dst[x] = compose_distance(static_cast<int>(kind), mv[x] != 0, dst[x], dst[x]);
      }
    }
  });
  return out;
}

}  // namespace segloss
