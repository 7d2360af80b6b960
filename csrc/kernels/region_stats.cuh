// Per-voxel math of the fused region statistics (segloss_core.statistics), shared by the CPU
// loops (csrc/torch/region_stats_cpu.cpp), the CUDA kernels (csrc/cuda/region_stats.cu) and
// the CuPy backend (NVRTC). Framework-free.
//
// For voxel x of sample b, with p_c the activation of the logits z, g_c the target (one-hot of
// the label, or the soft target) and w the voxel weight (0 if ignored, else the mask value):
//   kIntersection  Σ w p g        kPredSum  Σ w p        kTargetSum  Σ w g
//   kPredSq        Σ w p²         kTargetSq Σ w g²       kAbsDiff    Σ w |p − g|
//   kCePos         Σ w g (−log p) kCeNeg    Σ w (1−g)(−log(1−p))     kCount      Σ w
//   kFieldPred     Σ w p φ        kFieldSqErr Σ w (p − g)² F   (fields φ, F: per-voxel constants,
//                                  e.g. a signed distance map and d_p^α + d_g^α; 0 without them)
// With a region membership table g_c = [label ∈ region c] (region_bits below); the valid labels
// are then [0, table size) instead of [0, C).
// kInvalid (class 0 only) counts voxels whose label is outside [0, C) and not ignore_index;
// such voxels contribute nothing else (the glue raises when asked to check).
//
// Backward: given u[c][s] = ∂L/∂stat[b][c][s],
//   dp_c      = w (u_I g + u_P + 2 u_P2 p + u_L1 sign(p − g) + u_Fφ φ + 2 u_FE (p − g) F)
//   dlogp_c   = −w u_CE+ g           dlog1mp_c = −w u_CE− (1 − g)
//   softmax:  ∂L/∂z_c = p_c (dp_c − Σ_k p_k dp_k) + dlogp_c − p_c Σ_k dlogp_k
//   sigmoid:  ∂L/∂z_c = dp_c p (1 − p) + dlogp_c (1 − p) − dlog1mp_c p
//   none:     ∂L/∂p_c = dp_c + dlogp_c / p − dlog1mp_c / (1 − p)
#pragma once

#include "common.cuh"

namespace segloss {

enum Stat : int {
  kIntersection = 0,
  kPredSum = 1,
  kTargetSum = 2,
  kPredSq = 3,
  kTargetSq = 4,
  kAbsDiff = 5,
  kCePos = 6,
  kCeNeg = 7,
  kCount = 8,
  kInvalid = 9,
  kFieldPred = 10,
  kFieldSqErr = 11,
  kNumSlots = 12,
};

enum Activation : int { kSoftmax = 0, kSigmoid = 1, kNone = 2 };

// The class index whose one-hot is "foreground" for channel c: a single sigmoid (or
// probability) channel is the foreground of binary 0/1 labels.
SEGLOSS_HD int64_t label_of_channel(int64_t c, int64_t channels, int activation) {
  return (channels == 1 && activation != kSoftmax) ? 1 : c;
}

// Labels 0..valid_max-1 are valid (2 for a single sigmoid channel, else C).
SEGLOSS_HD int64_t valid_label_max(int64_t channels, int activation) {
  return (channels == 1 && activation != kSoftmax) ? 2 : channels;
}

// Voxel weight from its label: 0 for ignore_index and for invalid labels.
SEGLOSS_HD bool label_is_valid(int64_t label, int64_t valid_max) { return label >= 0 && label < valid_max; }

// Region-based training (segloss_core.regions): table[l] is the bitmask of the regions containing
// label l, for l in [0, table_size); channel c's target is bit c of the voxel's entry. A label
// outside the table reads entry 0 and gets no bits (the caller gives it weight 0 as invalid), so
// no label is ever used as an index out of bounds. Written as selects so CPU loops vectorise.
SEGLOSS_HD int64_t region_bits(const int64_t* table, int64_t table_size, int64_t label) {
  const bool inside = (label >= 0) & (label < table_size);
  const int64_t entry = table[inside ? label : 0];
  return inside ? entry : 0;
}

SEGLOSS_HD bool region_member(int64_t bits, int64_t channel) {
  return ((static_cast<uint64_t>(bits) >> channel) & 1u) != 0;
}

// Statistics contributions of one element (b, c, x), into acc[s * STRIDE] for each statistic s
// (STRIDE 1: an array of kNumSlots; the CPU loops keep kLanes independent lanes per statistic and
// pass STRIDE = kLanes). A weight-0 element adds exact zeros if its p, g and logs are finite.
// neg_log_p = −log p, neg_log_1mp = −log(1 − p) (only read with CE_NEG). TARGET_SQ false skips
// kTargetSq (one-hot targets: the caller copies kTargetSum, as g² = g).
template <int STRIDE, bool TARGET_SQ, bool CE_NEG, typename A>
SEGLOSS_HD void accumulate_element_strided(A p, A g, A w, A neg_log_p, A neg_log_1mp, A* acc) {
  const A wp = w * p, wg = w * g, diff = p - g;
  acc[kIntersection * STRIDE] += wp * g;
  acc[kPredSum * STRIDE] += wp;
  acc[kTargetSum * STRIDE] += wg;
  acc[kPredSq * STRIDE] += wp * p;
  if (TARGET_SQ) acc[kTargetSq * STRIDE] += wg * g;
  acc[kAbsDiff * STRIDE] += w * (diff < A(0) ? -diff : diff);
  acc[kCePos * STRIDE] += g == A(0) ? A(0) : wg * neg_log_p;
  if (CE_NEG) {
    const A h = A(1) - g;
    acc[kCeNeg * STRIDE] += h == A(0) ? A(0) : w * h * neg_log_1mp;
  }
  acc[kCount * STRIDE] += w;
}

// Which field statistics a kernel computes (FIELDS below): the bits of kFieldPred and kFieldSqErr.
enum FieldBits : int { kNoFields = 0, kFieldPredBit = 1, kFieldSqErrBit = 2, kBothFields = 3 };

// The field statistics of one element into acc[s * STRIDE]: Σ w p φ and Σ w (p − g)² F, those whose
// bit is in FIELDS (phi, field 0 where the caller has no such field; a weight-0 element adds exact
// zeros if φ and F are finite).
template <int STRIDE, int FIELDS = kBothFields, typename A>
SEGLOSS_HD void accumulate_field_element_strided(A p, A g, A w, A phi, A field, A* acc) {
  if (FIELDS & kFieldPredBit) acc[kFieldPred * STRIDE] += w * p * phi;
  if (FIELDS & kFieldSqErrBit) {
    const A diff = p - g;
    acc[kFieldSqErr * STRIDE] += w * diff * diff * field;
  }
}

// The same for an element of weight w > 0 into acc[kNumSlots], with a run-time want_ce_neg.
template <typename A>
SEGLOSS_HD void accumulate_element(A p, A g, A w, A neg_log_p, A neg_log_1mp, bool want_ce_neg, A* acc) {
  if (want_ce_neg) {
    accumulate_element_strided<1, true, true>(p, g, w, neg_log_p, neg_log_1mp, acc);
  } else {
    accumulate_element_strided<1, true, false>(p, g, w, neg_log_p, neg_log_1mp, acc);
  }
}

// The upstream gradient ∂L/∂stat of one (sample, class), read once from its kNumSlots values.
template <typename A>
struct StatGradient {
  A intersection, pred_sum, twice_pred_sq, abs_diff, ce_pos, ce_neg, field_pred, twice_field_sq_err;
};

template <typename A>
SEGLOSS_HD StatGradient<A> load_stat_gradient(const A* u) {
  StatGradient<A> out;
  out.intersection = u[kIntersection];
  out.pred_sum = u[kPredSum];
  out.twice_pred_sq = A(2) * u[kPredSq];
  out.abs_diff = u[kAbsDiff];
  out.ce_pos = u[kCePos];
  out.ce_neg = u[kCeNeg];
  out.field_pred = u[kFieldPred];
  out.twice_field_sq_err = A(2) * u[kFieldSqErr];
  return out;
}

// Whether the upstream gradient u[count][kNumSlots] is 0 on kPredSq and kAbsDiff: it reaches only
// kIntersection, kPredSum, kCePos, kCeNeg, the fields (and those without a gradient, kTargetSum/Sq,
// kCount, kInvalid) — dice, jaccard, tversky, generalized dice, CE, BCE, boundary, Hausdorff-DT and
// their compounds. Then element_gradient<true> leaves out the terms of kPredSq and kAbsDiff, whose
// factor u is an exact 0: the same gradient (an exact 0 added is no change), with less work.
template <typename A>
SEGLOSS_HD bool lean_gradient(const A* u, int64_t count) {
  bool lean = true;
  for (int64_t k = 0; k < count; ++k) {
    const A* v = u + k * kNumSlots;
    lean = lean & (v[kPredSq] == A(0)) & (v[kAbsDiff] == A(0));
  }
  return lean;
}

// The FieldBits of the field slots on which the upstream gradient u[count][kNumSlots] is not 0
// everywhere: the field terms element_gradient needs (the others' factor u is an exact 0).
template <typename A>
SEGLOSS_HD int field_gradient_bits(const A* u, int64_t count) {
  int bits = kNoFields;
  for (int64_t k = 0; k < count; ++k) {
    const A* v = u + k * kNumSlots;
    bits |= (v[kFieldPred] != A(0) ? kFieldPredBit : 0) | (v[kFieldSqErr] != A(0) ? kFieldSqErrBit : 0);
  }
  return bits;
}

// Whether the upstream gradient v[kNumSlots] of one (sample, class) is 0 on every statistic with a
// gradient: that class's d/dp, d/dlog p and d/dlog(1 − p) are then exact zeros (finite p, g, fields).
template <typename A>
SEGLOSS_HD bool class_without_gradient(const A* v) {
  return (v[kIntersection] == A(0)) & (v[kPredSum] == A(0)) & (v[kPredSq] == A(0)) & (v[kAbsDiff] == A(0)) &
         (v[kCePos] == A(0)) & (v[kCeNeg] == A(0)) & (v[kFieldPred] == A(0)) & (v[kFieldSqErr] == A(0));
}

// ∂L/∂p, ∂L/∂log p and ∂L/∂log(1 − p) of one element (branch-free, so the CPU loops vectorise);
// phi and field are the element's field values (0 without fields). LEAN: only for an upstream
// gradient that lean_gradient accepts; FIELDS: the field terms computed (a field whose bit is not
// set is not read; its upstream must be 0). The terms are added in the same order either way.
template <bool LEAN = false, int FIELDS = kBothFields, typename A>
SEGLOSS_HD void element_gradient(A p, A g, A w, const StatGradient<A>& u, A phi, A field, A* dp, A* dlogp,
                                 A* dlog1mp) {
  const A diff = p - g;
  A sum = u.intersection * g + u.pred_sum;
  if (!LEAN) {
    const A sign = (diff > A(0) ? A(1) : A(0)) - (diff < A(0) ? A(1) : A(0));
    sum += u.twice_pred_sq * p;
    sum += u.abs_diff * sign;
  }
  if (FIELDS & kFieldPredBit) sum += u.field_pred * phi;
  if (FIELDS & kFieldSqErrBit) sum += u.twice_field_sq_err * diff * field;
  *dp = w * sum;
  *dlogp = -w * u.ce_pos * g;
  *dlog1mp = -w * u.ce_neg * (A(1) - g);
}

// Sigmoid pieces from the logit: p, −log p, −log(1 − p), stable for both signs.
template <typename A>
SEGLOSS_HD void sigmoid_terms(A z, A* p, A* neg_log_p, A* neg_log_1mp) {
  A a = z < A(0) ? -z : z;
  A e = seg_exp(-a);                 // in (0, 1]
  A softplus_neg_a = seg_log(A(1) + e);
  A pos = A(1) / (A(1) + e);         // sigmoid(|z|)
  *p = z >= A(0) ? pos : A(1) - pos;
  *neg_log_p = (z >= A(0) ? A(0) : -z) + softplus_neg_a;   // softplus(−z)
  *neg_log_1mp = (z >= A(0) ? z : A(0)) + softplus_neg_a;  // softplus(z)
}

// Chain rule through the activation for one element (softmax needs the voxel sums).
template <typename A>
SEGLOSS_HD A activation_backward(int activation, A p, A dp, A dlogp, A dlog1mp, A dot_p_dp, A sum_dlogp) {
  if (activation == kSoftmax) {
    return p * (dp - dot_p_dp) + dlogp - p * sum_dlogp;
  }
  if (activation == kSigmoid) {
    return dp * p * (A(1) - p) + dlogp * (A(1) - p) - dlog1mp * p;
  }
  A out = dp;
  out += dlogp == A(0) ? A(0) : dlogp / p;
  out -= dlog1mp == A(0) ? A(0) : dlog1mp / (A(1) - p);
  return out;
}

}  // namespace segloss
