// CPU implementation of the distance-map ops: one two-label transform per map (a class of a
// label map, or a binary mask), plane by plane (csrc/torch/edt_planes.h), threads over
// (map, columns) and (map, plane) taking tasks in turn from one queue (no static split and one
// join, so a thread that the system holds back on a loaded machine does not hold the others). Maps without a boundary (a class absent from a
// sample, or filling it) are filled with no_boundary_value and cost nothing else.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <thread>
#include <vector>

#include "edt.h"
#include "edt_planes.h"
#include "host_buffers.h"


namespace segloss {
namespace {

// Spatial sizes as (n0, n1, n2): 1D (n) is (n, 1, 1), 2D (h, w) is (h, 1, w); spacing likewise.
struct Volume3 {
  int64_t n0 = 1, n1 = 1, n2 = 1;
  double spacing[3] = {1.0, 1.0, 1.0};
  int64_t voxels() const { return n0 * n1 * n2; }
};

Volume3 volume_of(at::IntArrayRef spatial, at::ArrayRef<double> spacing) {
  Volume3 vol;
  const int nd = static_cast<int>(spatial.size());
  TORCH_CHECK(static_cast<int>(spacing.size()) == nd, "segloss distance maps: spacing has ", spacing.size(),
              " values for ", nd, " spatial dims");
  for (double s : spacing) TORCH_CHECK(s > 0, "segloss distance maps: spacing must be positive, got ", s);
  vol.n0 = spatial[0];
  vol.spacing[0] = spacing[0];
  if (nd >= 2) {
    vol.n2 = spatial[nd - 1];
    vol.spacing[2] = spacing[nd - 1];
  }
  if (nd == 3) {
    vol.n1 = spatial[1];
    vol.spacing[1] = spacing[1];
  }
  return vol;
}

// Runs task(i) for i in [0, count) on the intra-op threads, each thread taking the next task.
template <typename Task>
void run_tasks(int64_t count, Task task) {
  if (count <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(count, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) task(i);
  });
}

// A fresh output of many MiB costs a page fault per 4 KiB page when it is first written (as much
// CPU time as a fifth of the transforms at 128³ × 4 classes): the maps come from the host block
// cache (host_buffers.h), where the block a previous step freed has its pages resident.
at::Tensor empty_maps(at::IntArrayRef shape, const at::TensorOptions& options) {
  TORCH_CHECK(options.device().is_cpu(), "segloss: CPU distance maps on ", options.device());
  return host_buffers::empty(shape, at::kFloat);
}

constexpr int64_t kColumns = 1024;  // phase-A task: this many columns of a plane

// The maps of `maps` volumes into out (maps × voxels): inside(m, x) says whether voxel x is in the
// set of map m; has_boundary(m) whether map m has both sides (else it gets no_boundary).
template <typename Inside, typename HasBoundary>
void two_label_maps(const Volume3& vol, int64_t maps, int kind, float no_boundary, Inside inside,
                    HasBoundary has_boundary, float* out) {
  const int64_t voxels = vol.voxels(), plane = vol.n1 * vol.n2;
  std::vector<int64_t> active, flat;
  for (int64_t m = 0; m < maps; ++m) (has_boundary(m) ? active : flat).push_back(m);
  run_tasks(static_cast<int64_t>(flat.size()), [&](int64_t i) {
    std::fill(out + flat[i] * voxels, out + (flat[i] + 1) * voxels, no_boundary);
  });
  const int64_t chunks = (plane + kColumns - 1) / kColumns;
  const int64_t count = static_cast<int64_t>(active.size());
  // one queue of tasks: map 0's phase-A chunks, then map 1's chunks and map 0's planes, map 2's
  // chunks and map 1's planes, …, the last map's planes. A plane task of map m waits until m's
  // chunks are all done: they were all taken before it (so this cannot deadlock) and one map's
  // chunks earlier (so they have almost always finished, and are still in cache)
  std::vector<std::atomic<int64_t>> chunks_done(count);
  for (auto& d : chunks_done) d.store(0);
  const int64_t group = chunks + vol.n0;
  run_tasks(count * group, [&](int64_t task) {
    int64_t i, r;  // task r of map active[i]'s chunks (r < chunks) or planes (r - chunks)
    if (task < chunks) {
      i = 0;
      r = task;
    } else {
      const int64_t g = (task - chunks) / group, in_group = (task - chunks) % group;
      const bool chunk = g + 1 < count && in_group < chunks;
      i = chunk ? g + 1 : g;
      r = chunk ? in_group : chunks + in_group - (g + 1 < count ? chunks : 0);
    }
    const int64_t m = active[i];
    if (r < chunks) {  // phase A: along axis 0
      const int64_t j0 = r * kColumns, j1 = std::min(plane, j0 + kColumns);
      thread_local std::vector<float> next;
      if (next.size() < static_cast<size_t>(kColumns)) next.resize(kColumns);
      edt_planes::axis0_counts(
          vol.n0, plane, j0, j1, [&](int64_t x) { return inside(m, x); }, out + m * voxels, next.data());
      chunks_done[i].fetch_add(1, std::memory_order_release);
      return;
    }
    while (chunks_done[i].load(std::memory_order_acquire) < chunks) std::this_thread::yield();
    thread_local edt_planes::PlaneScratch scratch;  // phase B: plane r − chunks
    edt_planes::plane_maps(
        vol.n1, vol.n2, r - chunks, vol.spacing, kind, [&](int64_t x) { return inside(m, x); }, out + m * voxels,
        scratch);
  });
}

// Labels as class codes, one byte (C <= 255) or four, with a code matching no class for
// ignore_index and labels outside [0, C); voxel counts per (sample, class).
template <typename Code, typename L>
void class_codes(const L* lab, int64_t batch, int64_t voxels, int64_t classes, int64_t ignore_index,
                 bool has_ignore, Code none, Code* codes, int64_t* counts) {
  run_tasks(batch, [&](int64_t b) {
    int64_t* cb = counts + b * classes;
    for (int64_t x = 0; x < voxels; ++x) {
      const int64_t l = static_cast<int64_t>(lab[b * voxels + x]);
      const bool counted = l >= 0 && l < classes && !(has_ignore && l == ignore_index);
      codes[b * voxels + x] = counted ? static_cast<Code>(l) : none;
      if (counted) ++cb[l];
    }
  });
}

template <typename Code, typename L>
at::Tensor label_maps_typed(const at::Tensor& labels, int64_t classes, const Volume3& vol, int64_t kind,
                            double no_boundary, int64_t ignore_index, bool has_ignore, Code none) {
  const int64_t batch = labels.size(0), voxels = vol.voxels();
  std::vector<Code> codes(batch * voxels);
  std::vector<int64_t> counts(batch * classes, 0);
  class_codes<Code>(labels.data_ptr<L>(), batch, voxels, classes, ignore_index, has_ignore, none, codes.data(),
                    counts.data());
  at::Tensor out = empty_maps({batch, classes, voxels}, labels.options());
  const Code* cd = codes.data();
  two_label_maps(
      vol, batch * classes, static_cast<int>(kind), static_cast<float>(no_boundary),
      [&](int64_t m, int64_t x) { return cd[(m / classes) * voxels + x] == static_cast<Code>(m % classes); },
      [&](int64_t m) { return counts[m] > 0 && counts[m] < voxels; }, out.data_ptr<float>());
  std::vector<int64_t> shape = {batch, classes};
  shape.insert(shape.end(), labels.sizes().begin() + 1, labels.sizes().end());
  return out.view(shape);
}

template <typename L>
at::Tensor label_maps_for(const at::Tensor& labels, int64_t classes, const Volume3& vol, int64_t kind,
                          double no_boundary, int64_t ignore_index, bool has_ignore) {
  if (classes <= 255) {
    return label_maps_typed<uint8_t, L>(labels, classes, vol, kind, no_boundary, ignore_index, has_ignore, 255);
  }
  return label_maps_typed<int32_t, L>(labels, classes, vol, kind, no_boundary, ignore_index, has_ignore, -1);
}

}  // namespace

at::Tensor label_distance_maps_cpu(const at::Tensor& labels, int64_t num_classes, at::ArrayRef<double> spacing,
                                   int64_t kind, double no_boundary_value, int64_t ignore_index, bool has_ignore) {
  TORCH_CHECK(labels.dim() >= 2 && labels.dim() <= 4, "segloss::label_distance_maps: labels must be (B, *spatial) ",
              "with 1 to 3 spatial dims, got ", labels.sizes());
  TORCH_CHECK(num_classes >= 1, "segloss::label_distance_maps: num_classes must be >= 1");
  TORCH_CHECK(kind >= 0 && kind <= 5, "segloss::label_distance_maps: unknown kind ", kind);
  TORCH_CHECK(num_classes < (int64_t(1) << 31), "segloss::label_distance_maps: num_classes too large");
  const Volume3 vol = volume_of(labels.sizes().slice(1), spacing);
  at::Tensor l = labels.contiguous();
  switch (l.scalar_type()) {
    case at::kLong:
      return label_maps_for<int64_t>(l, num_classes, vol, kind, no_boundary_value, ignore_index, has_ignore);
    case at::kInt:
      return label_maps_for<int32_t>(l, num_classes, vol, kind, no_boundary_value, ignore_index, has_ignore);
    case at::kByte:
      return label_maps_for<uint8_t>(l, num_classes, vol, kind, no_boundary_value, ignore_index, has_ignore);
    default:
      return label_maps_for<int64_t>(l.to(at::kLong), num_classes, vol, kind, no_boundary_value, ignore_index,
                                     has_ignore);
  }
}

at::Tensor mask_distance_maps_cpu(const at::Tensor& masks, at::ArrayRef<double> spacing, int64_t kind,
                                  double no_boundary_value) {
  TORCH_CHECK(masks.dim() >= 3 && masks.dim() <= 5, "segloss::mask_distance_maps: masks must be (B, C, *spatial) ",
              "with 1 to 3 spatial dims, got ", masks.sizes());
  TORCH_CHECK(kind >= 0 && kind <= 5, "segloss::mask_distance_maps: unknown kind ", kind);
  const Volume3 vol = volume_of(masks.sizes().slice(2), spacing);
  at::Tensor m = masks.to(at::kByte).contiguous();
  const int64_t volumes = m.size(0) * m.size(1), voxels = vol.voxels();
  const uint8_t* mk = m.data_ptr<uint8_t>();
  std::vector<int64_t> counts(volumes, 0);
  run_tasks(volumes, [&](int64_t v) {
    int64_t c = 0;
    for (int64_t x = 0; x < voxels; ++x) c += mk[v * voxels + x] != 0;
    counts[v] = c;
  });
  at::Tensor out = empty_maps(m.sizes(), m.options());
  two_label_maps(
      vol, volumes, static_cast<int>(kind), static_cast<float>(no_boundary_value),
      [&](int64_t v, int64_t x) { return mk[v * voxels + x] != 0; },
      [&](int64_t v) { return counts[v] > 0 && counts[v] < voxels; }, out.data_ptr<float>());
  return out;
}

}  // namespace segloss
