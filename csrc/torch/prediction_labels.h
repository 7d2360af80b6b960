// Glue declaration of segloss::softmax_prediction_labels (the thresholded softmax as a label map).
#pragma once

#include <ATen/ATen.h>

namespace segloss {

at::Tensor softmax_prediction_labels_cpu(const at::Tensor& logits, double threshold);

}  // namespace segloss
