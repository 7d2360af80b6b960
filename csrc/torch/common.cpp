// Device-independent glue of the segloss ops (input canonicalisation, label check), compiled into
// both the CPU and the CUDA library. The op schemas are defined from Python
// (plugins/segloss_torch/ops.py), so the NVRTC path needs no compiled code at all.
#include <ATen/ATen.h>

#include <string>

#include "../kernels/region_stats.cuh"
#include "region_stats.h"

namespace segloss {

at::ScalarType accumulation_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

RegionStatsInputs canonical_inputs(const at::Tensor& logits, const std::optional<at::Tensor>& labels,
                                   const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& mask,
                                   int64_t activation, const std::optional<at::Tensor>& regions) {
  TORCH_CHECK(logits.dim() >= 3 && logits.dim() <= 5, "segloss::region_stats: logits must be (B, C, *spatial) with ",
              "1 to 3 spatial dims, got ", logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "segloss::region_stats: logits must be floating, got ",
              logits.scalar_type());
  TORCH_CHECK(activation >= 0 && activation <= 2, "segloss::region_stats: activation must be 0, 1 or 2");
  TORCH_CHECK(labels.has_value() != target.has_value(), "segloss::region_stats: give exactly one of labels, target");
  RegionStatsInputs out;
  out.batch = logits.size(0);
  out.channels = logits.size(1);
  out.voxels = out.batch == 0 || out.channels == 0 ? 0 : logits.numel() / (out.batch * out.channels);
  out.logits = logits.contiguous().view({out.batch, out.channels, out.voxels});
  if (labels.has_value()) {
    const at::Tensor& l = *labels;
    TORCH_CHECK(l.device() == logits.device(), "segloss::region_stats: labels on ", l.device(), ", logits on ",
                logits.device());
    TORCH_CHECK(l.numel() == out.batch * out.voxels, "segloss::region_stats: labels have ", l.numel(),
                " elements, expected B*N = ", out.batch * out.voxels);
    TORCH_CHECK(!at::isFloatingType(l.scalar_type()), "segloss::region_stats: labels must be integer");
    at::Tensor canonical = l;
    auto t = l.scalar_type();
    if (t != at::kLong && t != at::kInt && t != at::kByte) {
      canonical = l.to(at::kLong);
    }
    out.labels = canonical.contiguous().view({out.batch, out.voxels});
  } else {
    const at::Tensor& g = *target;
    TORCH_CHECK(g.device() == logits.device(), "segloss::region_stats: target on ", g.device(), ", logits on ",
                logits.device());
    TORCH_CHECK(g.sizes() == logits.sizes(), "segloss::region_stats: target ", g.sizes(), " must match logits ",
                logits.sizes());
    out.target = g.to(logits.scalar_type()).contiguous().view({out.batch, out.channels, out.voxels});
  }
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.device() == logits.device(), "segloss::region_stats: mask on ", m.device(), ", logits on ",
                logits.device());
    int64_t mb = m.dim() > 0 ? m.size(0) : 1;
    TORCH_CHECK((mb == 1 || mb == out.batch) && m.numel() == mb * out.voxels,
                "segloss::region_stats: mask must be (B or 1, 1, *spatial), got ", m.sizes());
    out.mask = m.to(accumulation_type(logits.scalar_type())).contiguous().view({mb, out.voxels});
  }
  if (regions.has_value()) {
    const at::Tensor& r = *regions;
    TORCH_CHECK(labels.has_value(), "segloss::region_stats: regions need integer labels");
    TORCH_CHECK(r.device() == logits.device(), "segloss::region_stats: regions on ", r.device(), ", logits on ",
                logits.device());
    TORCH_CHECK(r.scalar_type() == at::kLong && r.dim() == 1 && r.numel() >= 1,
                "segloss::region_stats: regions must be a non-empty 1-D int64 membership table, got ", r.sizes(), " ",
                r.scalar_type());
    TORCH_CHECK(out.channels <= 64, "segloss::region_stats: at most 64 regions, got ", out.channels, " channels");
    out.regions = r.contiguous();
  }
  return out;
}

int64_t valid_label_count(const RegionStatsInputs& in, int64_t activation) {
  return in.regions.defined() ? in.regions.numel() : valid_label_max(in.channels, static_cast<int>(activation));
}

void add_fields(RegionStatsInputs& in, const std::optional<at::Tensor>& field_pred,
                const std::optional<at::Tensor>& field_sq_err) {
  const at::ScalarType acc = accumulation_type(in.logits.scalar_type());
  auto canonical = [&](const std::optional<at::Tensor>& field, const char* name) -> at::Tensor {
    if (!field.has_value()) return at::Tensor();
    const at::Tensor& f = *field;
    TORCH_CHECK(f.device() == in.logits.device(), "segloss::region_stats: ", name, " on ", f.device(), ", logits on ",
                in.logits.device());
    TORCH_CHECK(at::isFloatingType(f.scalar_type()), "segloss::region_stats: ", name, " must be floating, got ",
                f.scalar_type());
    TORCH_CHECK(f.numel() == in.batch * in.channels * in.voxels, "segloss::region_stats: ", name,
                " must have the logits' shape (B, C, *spatial), got ", f.sizes());
    return f.to(acc).contiguous().view({in.batch, in.channels, in.voxels});
  };
  in.field_pred = canonical(field_pred, "field_pred");
  in.field_sq_err = canonical(field_sq_err, "field_sq_err");
}

void check_invalid_labels(const at::Tensor& stats, const at::Tensor& labels, int64_t valid_max, bool has_ignore,
                          int64_t ignore_index) {
  double invalid = stats.select(2, kInvalid).select(1, 0).sum().item<double>();
  if (invalid > 0) {
    // error path only: find the offending values (the kernels counted them without indexing)
    at::Tensor values = labels.to(at::kLong);
    at::Tensor bad = values.lt(0).logical_or(values.ge(valid_max));
    if (has_ignore) {
      bad = bad.logical_and(values.ne(ignore_index));
    }
    at::Tensor offending = std::get<0>(at::_unique(values.masked_select(bad).cpu(), /*sorted=*/true));
    std::string shown;
    int64_t count = std::min<int64_t>(offending.numel(), 5);
    for (int64_t i = 0; i < count; ++i) {
      shown += (i ? ", " : "") + std::to_string(offending[i].item<int64_t>());
    }
    if (offending.numel() > count) {
      shown += ", ...";
    }
    std::string extra = has_ignore ? " or ignore_index=" + std::to_string(ignore_index) : std::string();
    TORCH_CHECK(false, "target has labels outside [0, ", valid_max, ")", extra, ": ", shown, " (",
                static_cast<int64_t>(invalid), " voxel(s))");
  }
}

}  // namespace segloss
