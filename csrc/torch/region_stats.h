// Glue shared by the CPU and CUDA implementations of the segloss::region_stats ops.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace segloss {

struct RegionStatsInputs {
  at::Tensor logits;  // (B, C, N) contiguous
  at::Tensor labels;  // (B, N) contiguous int64/int32/uint8, or undefined
  at::Tensor target;  // (B, C, N) contiguous, logits' dtype, or undefined
  at::Tensor mask;    // (Mb, N) contiguous, accumulation dtype, Mb in {1, B}, or undefined
  at::Tensor regions;  // (L + 1,) contiguous int64 membership table of region-based training, or undefined
  at::Tensor field_pred;    // φ of Σ w p φ: (B, C, N) contiguous, accumulation dtype, or undefined
  at::Tensor field_sq_err;  // F of Σ w (p − g)² F: likewise
  int64_t batch = 0;
  int64_t channels = 0;
  int64_t voxels = 0;
};

// Checks shapes, dtypes and devices (the Python side has already validated values) and
// brings every input to the canonical contiguous layout above.
RegionStatsInputs canonical_inputs(const at::Tensor& logits, const std::optional<at::Tensor>& labels,
                                   const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& mask,
                                   int64_t activation, const std::optional<at::Tensor>& regions);

// Labels 0..valid_max-1 are valid: the membership table's length with regions, else
// valid_label_max(channels, activation).
int64_t valid_label_count(const RegionStatsInputs& in, int64_t activation);

// Adds the fields of the field statistics (kFieldPred, kFieldSqErr), each of the logits' shape, in
// the accumulation dtype; without them those statistics are 0.
void add_fields(RegionStatsInputs& in, const std::optional<at::Tensor>& field_pred,
                const std::optional<at::Tensor>& field_sq_err);

at::ScalarType accumulation_type(at::ScalarType dtype);

at::Tensor region_stats_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& labels,
                            const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& mask,
                            int64_t activation, int64_t ignore_index, bool has_ignore, bool want_ce_neg,
                            bool check_labels, const std::optional<at::Tensor>& regions,
                            const std::optional<at::Tensor>& field_pred, const std::optional<at::Tensor>& field_sq_err);

at::Tensor region_stats_backward_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                     const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& target,
                                     const std::optional<at::Tensor>& mask, int64_t activation, int64_t ignore_index,
                                     bool has_ignore, const std::optional<at::Tensor>& regions,
                                     const std::optional<at::Tensor>& field_pred,
                                     const std::optional<at::Tensor>& field_sq_err);

// Raise, naming the offending label values and their count, if the kInvalid slot of ``stats`` is
// non-zero (the values are looked up in ``labels`` only then).
void check_invalid_labels(const at::Tensor& stats, const at::Tensor& labels, int64_t valid_max, bool has_ignore,
                          int64_t ignore_index);

}  // namespace segloss
