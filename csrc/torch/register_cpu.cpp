// CPU kernels of the segloss ops (schemas: plugins/segloss_torch/ops.py). Built with the C++
// compiler alone, into the library of its own that build.py calls the "cpu" part.
#include <torch/library.h>

#include "edt.h"
#include "prediction_labels.h"
#include "region_stats.h"

TORCH_LIBRARY_IMPL(segloss, CPU, m) {
  m.impl("region_stats", &segloss::region_stats_cpu);
  m.impl("region_stats_backward", &segloss::region_stats_backward_cpu);
  m.impl("label_distance_maps", &segloss::label_distance_maps_cpu);
  m.impl("mask_distance_maps", &segloss::mask_distance_maps_cpu);
  m.impl("softmax_prediction_labels", &segloss::softmax_prediction_labels_cpu);
}
