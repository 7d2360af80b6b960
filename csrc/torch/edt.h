// Glue declarations of the distance-map ops (segloss::label_distance_maps, mask_distance_maps).
#pragma once

#include <ATen/ATen.h>

namespace segloss {

at::Tensor label_distance_maps_cpu(const at::Tensor& labels, int64_t num_classes, at::ArrayRef<double> spacing,
                                   int64_t kind, double no_boundary_value, int64_t ignore_index, bool has_ignore);
at::Tensor mask_distance_maps_cpu(const at::Tensor& masks, at::ArrayRef<double> spacing, int64_t kind,
                                  double no_boundary_value);

}  // namespace segloss
