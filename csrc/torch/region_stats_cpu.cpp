// CPU implementation of segloss::region_stats and its backward.
//
// Work is split into fixed chunks of kChunk voxels of one sample (independent of the number
// of threads), each chunk into tiles of kTile voxels whose per-class values live in small
// buffers; sums are kept in kLanes independent lanes per (class, statistic) and reduced in a
// fixed order, so results are bitwise identical run to run and for any thread count. The
// loops over a tile are written so the compiler can vectorise them (seg_exp is branch-free).
// The gradient comes from the host block cache when large (host_buffers.h): its first-touch page
// faults are otherwise a large part of the cost of a backward pass. float16/bfloat16 logits are
// converted to float32 a row of a tile at a time and the gradient written back the same way, in
// loops that vectorise (bfloat16: bit shifts; float16: F16C's 8-wide conversions where the CPU
// has them), rounding to nearest even exactly as c10's scalar conversions do.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>


#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "../kernels/region_stats.cuh"
#include "host_buffers.h"
#include "region_stats.h"

namespace segloss {
namespace {

constexpr int64_t kChunk = 16384;
constexpr int kTile = 128;
constexpr int kLanes = 8;

struct Problem {
  int64_t batch, channels, voxels;
  int activation;
  bool has_ignore;
  int64_t ignore_index;
  const void* mask;  // accumulation dtype (float or double), or null
  int64_t mask_batch_stride;
  bool want_ce_neg;
  const int64_t* regions;  // membership table of region-based training, or null
  int64_t region_labels;   // its length: labels [0, region_labels) are valid with regions
  const void* field_pred;    // φ of kFieldPred, (B, C, N) in the accumulation dtype, or null
  const void* field_sq_err;  // F of kFieldSqErr, likewise
};

inline float float_from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint32_t bits_of_float(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

// dst[i] = src[i] in the accumulation type A, i < len.
template <typename T, typename A>
inline void load_row(const T* __restrict src, A* __restrict dst, int len) {
  int i = 0;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint16_t* __restrict bits = reinterpret_cast<const uint16_t*>(src);
    for (; i < len; ++i) dst[i] = static_cast<A>(float_from_bits(static_cast<uint32_t>(bits[i]) << 16));
  } else if constexpr (std::is_same_v<T, c10::Half>) {
#if defined(__F16C__)
    if constexpr (std::is_same_v<A, float>) {
      const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
      for (; i + 8 <= len; i += 8) {
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bits + i))));
      }
    }
#endif
    for (; i < len; ++i) dst[i] = static_cast<A>(src[i]);
  } else {
    for (; i < len; ++i) dst[i] = static_cast<A>(src[i]);
  }
}

// dst[i] = src[i] rounded to T (nearest even; bfloat16 NaN → 0x7FC0, as c10), i < len.
template <typename T, typename A>
inline void store_row(const A* __restrict src, T* __restrict dst, int len) {
  int i = 0;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint16_t* __restrict bits = reinterpret_cast<uint16_t*>(dst);
    for (; i < len; ++i) {
      const float f = static_cast<float>(src[i]);
      const uint32_t u = bits_of_float(f);
      const uint16_t rounded = static_cast<uint16_t>((u + UINT32_C(0x7FFF) + ((u >> 16) & 1)) >> 16);
      bits[i] = f != f ? static_cast<uint16_t>(0x7FC0) : rounded;
    }
  } else if constexpr (std::is_same_v<T, c10::Half>) {
#if defined(__F16C__)
    if constexpr (std::is_same_v<A, float>) {
      uint16_t* bits = reinterpret_cast<uint16_t*>(dst);
      for (; i + 8 <= len; i += 8) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(bits + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
      }
    }
#endif
    for (; i < len; ++i) dst[i] = static_cast<T>(src[i]);
  } else {
    for (; i < len; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

template <typename A>
struct Tile {
  std::vector<A> z, e, t, dp, dl;  // C × kTile
  std::vector<A> phi, field;       // C × kTile: the fields' values of a ragged tile, 0 where a field is absent
  std::vector<const A*> phi_row, field_row;  // C: where the tile's field values are (in place, or phi/field)
  std::vector<A> m, inv, lse, w, dot, sdl;
  std::vector<A> label;  // the label as A (exact below 2^24), −1 for weight-0 voxels
  std::vector<int64_t> bits;  // regions: each voxel's membership bits (0 for weight-0 voxels)
  explicit Tile(int64_t channels)
      : z(channels * kTile), e(channels * kTile), t(channels * kTile), dp(channels * kTile), dl(channels * kTile),
        phi(channels * kTile, A(0)), field(channels * kTile, A(0)), m(kTile), inv(kTile), lse(kTile), w(kTile),
        dot(kTile), sdl(kTile), label(kTile), bits(kTile), phi_row(channels), field_row(channels) {
    for (int64_t c = 0; c < channels; ++c) phi_row[c] = &phi[c * kTile], field_row[c] = &field[c * kTile];
  }
};

// Loads logits (and soft targets, weights, labels) of voxels [n0, n0 + len) of sample b into the
// tile, padded to a multiple of kLanes with weight 0. A voxel of weight 0 (padding, ignored,
// invalid label, mask 0) is loaded as logits 0, label −1 and target 0, so every term it adds is
// an exact 0 whatever its real logits are. With regions (LABELS false, pb.regions set) the labels
// are read as well and each class's target g_c = [label ∈ region c] is written into the tile's
// target rows (kTile voxels: no (B, C, N) target exists). Computes the activation: for softmax
// e = exp(z − m), inv = 1/Σe, lse = m + log Σe (LSE false: lse is not computed, the backward needs no
// log p). The fields are not copied: a full tile reads them in place (phi_row, field_row), a ragged
// one (len < padded, the end of a sample) from the tile's rows, padded with 0; the element loops
// take 0 where w = 0 (field_value), so a non-finite field value at a weight-0 voxel adds nothing.
// Returns the number of invalid labels.
template <int ACT, bool LABELS, typename T, typename L, typename A, bool LSE = true>
int64_t load_tile(const Problem& pb, const T* logits, const L* labels, const T* target, int64_t b, int64_t n0,
                  int len, int padded, Tile<A>& tile) {
  const int64_t C = pb.channels, N = pb.voxels;
  const bool regions = !LABELS && pb.regions != nullptr;
  const int64_t valid_max = regions ? pb.region_labels : valid_label_max(C, ACT);
  int64_t invalid = 0;
  A* __restrict w = tile.w.data();
  A* __restrict lab = tile.label.data();
  if (pb.mask) {
    const A* __restrict mask = static_cast<const A*>(pb.mask) + b * pb.mask_batch_stride + n0;
    for (int i = 0; i < len; ++i) w[i] = mask[i];
  } else {
    for (int i = 0; i < len; ++i) w[i] = A(1);
  }
  for (int i = len; i < padded; ++i) w[i] = A(0);
  if (LABELS || regions) {
    const L* __restrict src = labels + b * N + n0;
    const bool has_ignore = pb.has_ignore;
    const int64_t ignore_index = pb.ignore_index;
    // bitwise (not short-circuit) logic keeps the loop branch-free, so it vectorises
    for (int i = 0; i < len; ++i) {
      const int64_t label = static_cast<int64_t>(src[i]);
      const bool ignored = has_ignore & (label == ignore_index);
      const bool valid = (label >= 0) & (label < valid_max);
      const bool bad = !ignored & !valid;
      invalid += static_cast<int64_t>(bad);
      const bool off = ignored | bad | (w[i] == A(0));
      w[i] = off ? A(0) : w[i];
      lab[i] = off ? A(-1) : static_cast<A>(label);
    }
    for (int i = len; i < padded; ++i) lab[i] = A(-1);
    if (regions) {
      const int64_t* __restrict table = pb.regions;
      int64_t* __restrict bits = tile.bits.data();
      for (int i = 0; i < len; ++i) {
        const int64_t label = static_cast<int64_t>(src[i]);
        bits[i] = w[i] == A(0) ? 0 : region_bits(table, valid_max, label);
      }
      for (int i = len; i < padded; ++i) bits[i] = 0;
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    const T* __restrict zc = logits + (b * C + c) * N + n0;
    A* __restrict zt = &tile.z[c * kTile];
    load_row(zc, zt, len);
    for (int i = 0; i < len; ++i) zt[i] = w[i] == A(0) ? A(0) : zt[i];
    for (int i = len; i < padded; ++i) zt[i] = A(0);
    if (regions) {
      const int64_t* __restrict bits = tile.bits.data();
      A* __restrict tt = &tile.t[c * kTile];
      for (int i = 0; i < padded; ++i) tt[i] = region_member(bits[i], c) ? A(1) : A(0);
    } else if (!LABELS) {
      const T* __restrict tc = target + (b * C + c) * N + n0;
      A* __restrict tt = &tile.t[c * kTile];
      load_row(tc, tt, len);
      for (int i = 0; i < len; ++i) tt[i] = w[i] == A(0) ? A(0) : tt[i];
      for (int i = len; i < padded; ++i) tt[i] = A(0);
    }
    const A* fields[2] = {static_cast<const A*>(pb.field_pred), static_cast<const A*>(pb.field_sq_err)};
    A* tiles[2] = {&tile.phi[c * kTile], &tile.field[c * kTile]};
    const A** rows[2] = {&tile.phi_row[c], &tile.field_row[c]};
    for (int f = 0; f < 2; ++f) {
      if (fields[f] == nullptr) continue;  // the tile's values stay 0
      const A* __restrict fc = fields[f] + (b * C + c) * N + n0;
      if (len == padded) {
        *rows[f] = fc;
        continue;
      }
      A* __restrict ft = tiles[f];
      for (int i = 0; i < len; ++i) ft[i] = fc[i];
      for (int i = len; i < padded; ++i) ft[i] = A(0);
      *rows[f] = ft;
    }
  }
  if (ACT == kSoftmax) {
    A* __restrict m = tile.m.data();
    const A* __restrict z0 = tile.z.data();
    for (int i = 0; i < padded; ++i) m[i] = z0[i];
    for (int64_t c = 1; c < C; ++c) {
      const A* __restrict zt = &tile.z[c * kTile];
      for (int i = 0; i < padded; ++i) m[i] = (zt[i] > m[i] || zt[i] != zt[i]) ? zt[i] : m[i];
    }
    A* __restrict s = tile.inv.data();
    A* __restrict lse = tile.lse.data();
    for (int i = 0; i < padded; ++i) s[i] = A(0);
    for (int64_t c = 0; c < C; ++c) {
      const A* __restrict zt = &tile.z[c * kTile];
      A* __restrict et = &tile.e[c * kTile];
#pragma GCC ivdep
      for (int i = 0; i < padded; ++i) {
        const A e = seg_exp(zt[i] - m[i]);
        et[i] = e;
        s[i] += e;
      }
    }
    if (LSE) {
      for (int i = 0; i < padded; ++i) lse[i] = m[i] + seg_log(s[i]);
    }
    for (int i = 0; i < padded; ++i) s[i] = A(1) / s[i];
  }
  return invalid;
}

// Raw (restrict) views of one class of a loaded tile: plain pointers let the compiler
// vectorise the element loops (std::vector members could alias the outputs).
template <typename A>
struct ClassView {
  const A* __restrict z;
  const A* __restrict e;
  const A* __restrict t;
  const A* __restrict inv;
  const A* __restrict lse;
  const A* __restrict w;
  const A* __restrict label;
  const A* __restrict phi;
  const A* __restrict field;
  ClassView(const Tile<A>& tile, int64_t c)
      : z(&tile.z[c * kTile]), e(&tile.e[c * kTile]), t(&tile.t[c * kTile]), inv(tile.inv.data()),
        lse(tile.lse.data()), w(tile.w.data()), label(tile.label.data()), phi(tile.phi_row[c]),
        field(tile.field_row[c]) {}
};

// A field value of element i (row phi or field of a class view): 0 where the weight is 0.
template <typename A>
inline A field_value(const ClassView<A>& v, const A* __restrict row, int i) {
  return v.w[i] == A(0) ? A(0) : row[i];
}

template <bool LABELS, typename A>
inline A target_value(const ClassView<A>& v, A cls, int i) {
  if (LABELS) return v.label[i] == cls ? A(1) : A(0);
  return v.t[i];
}

// p, −log p, −log(1 − p) of element i of a class view.
template <int ACT, typename A>
inline void element_terms(const ClassView<A>& v, int i, A* p, A* nlp, A* nl1mp) {
  const A z = v.z[i];
  if (ACT == kSoftmax) {
    *p = v.e[i] * v.inv[i];
    *nlp = v.lse[i] - z;
    *nl1mp = A(0);
  } else if (ACT == kSigmoid) {
    sigmoid_terms(z, p, nlp, nl1mp);
  } else {
    *p = z;
    *nlp = -seg_log(z);
    *nl1mp = -seg_log(A(1) - z);
  }
}

// The statistics of voxels [n0, n1) of sample b; FIELDS: the FieldBits of the fields given (their
// statistics in the same loop as the others, from the same p and g).
template <int ACT, bool LABELS, bool CE_NEG, int FIELDS, typename T, typename L, typename A>
void forward_chunk(const Problem& pb, const T* logits, const L* labels, const T* target, int64_t b, int64_t n0,
                   int64_t n1, A* out /* C × kNumSlots */, Tile<A>& tile, std::vector<A>& lanes) {
  const int64_t C = pb.channels;
  std::fill(lanes.begin(), lanes.end(), A(0));
  A invalid_total = A(0);
  for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
    const int len = static_cast<int>(std::min<int64_t>(kTile, n1 - t0));
    const int padded = (len + kLanes - 1) / kLanes * kLanes;
    invalid_total += static_cast<A>(load_tile<ACT, LABELS, T, L, A>(pb, logits, labels, target, b, t0, len, padded, tile));
    for (int64_t c = 0; c < C; ++c) {
      A* __restrict acc = &lanes[c * kNumSlots * kLanes];
      const A cls = static_cast<A>(label_of_channel(c, C, ACT));
      const ClassView<A> v(tile, c);
      for (int i0 = 0; i0 < padded; i0 += kLanes) {
#pragma GCC ivdep
        for (int l = 0; l < kLanes; ++l) {
          const int i = i0 + l;
          const A w = v.w[i];
          const A g = target_value<LABELS>(v, cls, i);
          A p, nlp, nl1mp;
          element_terms<ACT>(v, i, &p, &nlp, &nl1mp);
          accumulate_element_strided<kLanes, !LABELS, CE_NEG>(p, g, w, nlp, nl1mp, acc + l);
          if (FIELDS != kNoFields) {
            const A phi = (FIELDS & kFieldPredBit) ? field_value(v, v.phi, i) : A(0);
            const A field = (FIELDS & kFieldSqErrBit) ? field_value(v, v.field, i) : A(0);
            accumulate_field_element_strided<kLanes, FIELDS>(p, g, w, phi, field, acc + l);
          }
        }
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    for (int s = 0; s < kNumSlots; ++s) {
      const A* lane = &lanes[(c * kNumSlots + s) * kLanes];
      A total = A(0);
      for (int l = 0; l < kLanes; ++l) total += lane[l];
      out[c * kNumSlots + s] = total;
    }
    if (LABELS) out[c * kNumSlots + kTargetSq] = out[c * kNumSlots + kTargetSum];  // g² = g for one-hot
  }
  out[kInvalid] = invalid_total;
}

template <int V>
using IntTag = std::integral_constant<int, V>;
template <bool V>
using BoolTag = std::integral_constant<bool, V>;

// The gradient of voxels [n0, n1) of sample b. LEAN (lean_gradient(upstream)): the terms of kPredSq and
// kAbsDiff are left out; a class whose upstream gradient is 0 on every statistic with a gradient
// (active[c] false, class_without_gradient: e.g. the background of a boundary loss without it) gets no
// d/dp and reads no field; for softmax, d/dp and d/dlog p are recomputed in the second pass instead of
// kept in the tile (C × kTile values less to write and read back: for C = 14 the tile then stays in
// L1; a field row is read a second time, from cache). The same values either way. FIELDS: the field
// terms computed (field_gradient_bits of the fields given; the generic path takes both, reading the
// tile's zero rows for an absent field).
template <int ACT, bool LABELS, bool LEAN, int FIELDS, typename T, typename L, typename A>
void backward_chunk(const Problem& pb, const T* logits, const L* labels, const T* target, const A* upstream,
                    const char* active, int64_t b, int64_t n0, int64_t n1, T* grad, Tile<A>& tile) {
  const int64_t C = pb.channels, N = pb.voxels;
  const StatGradient<A> none{};  // all 0
  for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
    const int len = static_cast<int>(std::min<int64_t>(kTile, n1 - t0));
    const int padded = (len + kLanes - 1) / kLanes * kLanes;
    load_tile<ACT, LABELS, T, L, A, false>(pb, logits, labels, target, b, t0, len, padded, tile);
    A* __restrict dot = tile.dot.data();
    A* __restrict sdl = tile.sdl.data();
    if (ACT == kSoftmax) {
      for (int i = 0; i < padded; ++i) dot[i] = sdl[i] = A(0);
    }
    for (int64_t c = 0; c < C; ++c) {
      T* __restrict gc = grad + (b * C + c) * N + t0;
      if (LEAN && !active[b * C + c]) {  // d/dp = d/dlog p = 0: nothing to add to dot and sdl
        if (ACT != kSoftmax) std::fill(gc, gc + len, T(0));
        continue;
      }
      const A* u = upstream + (b * C + c) * kNumSlots;
      const StatGradient<A> su = load_stat_gradient(u);
      const A cls = static_cast<A>(label_of_channel(c, C, ACT));
      const ClassView<A> v(tile, c);
      A* __restrict dpt = &tile.dp[c * kTile];
      A* __restrict dlt = &tile.dl[c * kTile];
#pragma GCC ivdep
      for (int i = 0; i < padded; ++i) {
        const A w = v.w[i];
        const A g = target_value<LABELS>(v, cls, i);
        A p, nlp, nl1mp;
        element_terms<ACT>(v, i, &p, &nlp, &nl1mp);
        const A phi = (FIELDS & kFieldPredBit) ? field_value(v, v.phi, i) : A(0);
        const A field = (FIELDS & kFieldSqErrBit) ? field_value(v, v.field, i) : A(0);
        A dp, dl, dl1m;
        element_gradient<LEAN, FIELDS>(p, g, w, su, phi, field, &dp, &dl, &dl1m);
        if (ACT == kSoftmax) {
          if (!LEAN) {
            dpt[i] = dp;
            dlt[i] = dl;
          }
          dot[i] += p * dp;
          sdl[i] += dl;
        } else {
          dpt[i] = activation_backward(ACT, p, dp, dl, dl1m, A(0), A(0));
        }
      }
      if (ACT != kSoftmax) store_row(dpt, gc, len);
    }
    if (ACT == kSoftmax) {
      const A* __restrict inv = tile.inv.data();
      for (int64_t c = 0; c < C; ++c) {
        const A cls = static_cast<A>(label_of_channel(c, C, ACT));
        const ClassView<A> v(tile, c);
        const A* __restrict et = &tile.e[c * kTile];
        const A* __restrict dpt = &tile.dp[c * kTile];
        const A* __restrict dlt = &tile.dl[c * kTile];
        A* __restrict dz = &tile.dp[c * kTile];  // T != A: dz replaces d/dp in the tile, then one rounding pass
        T* __restrict gc = grad + (b * C + c) * N + t0;
        // F: the field terms of this class (none for an inactive class, whose su is then 0)
        auto second_pass = [&](auto fields_tag, const StatGradient<A>& su) {
          constexpr int F = decltype(fields_tag)::value;
#pragma GCC ivdep
          for (int i = 0; i < len; ++i) {
            const A p = et[i] * inv[i];
            A dp, dl;
            if (LEAN) {
              const A phi = (F & kFieldPredBit) ? field_value(v, v.phi, i) : A(0);
              const A field = (F & kFieldSqErrBit) ? field_value(v, v.field, i) : A(0);
              A dl1m;
              element_gradient<true, F>(p, target_value<LABELS>(v, cls, i), v.w[i], su, phi, field, &dp, &dl, &dl1m);
            } else {
              dp = dpt[i];
              dl = dlt[i];
            }
            const A out = p * (dp - dot[i]) + dl - p * sdl[i];
            if constexpr (std::is_same_v<T, A>) {
              gc[i] = out;
            } else {
              dz[i] = out;
            }
          }
        };
        if (LEAN && !active[b * C + c]) {
          second_pass(IntTag<kNoFields>{}, none);
        } else {
          second_pass(IntTag<FIELDS>{}, load_stat_gradient(upstream + (b * C + c) * kNumSlots));
        }
        if constexpr (!std::is_same_v<T, A>) store_row(dz, gc, len);
      }
    }
  }
}

Problem make_problem(const RegionStatsInputs& in, int64_t activation, int64_t ignore_index, bool has_ignore,
                     bool want_ce_neg) {
  Problem pb;
  pb.batch = in.batch;
  pb.channels = in.channels;
  pb.voxels = in.voxels;
  pb.activation = static_cast<int>(activation);
  pb.has_ignore = has_ignore;
  pb.ignore_index = ignore_index;
  pb.mask = in.mask.defined() ? in.mask.data_ptr() : nullptr;
  pb.mask_batch_stride = in.mask.defined() && in.mask.size(0) > 1 ? in.voxels : 0;
  pb.want_ce_neg = want_ce_neg;
  pb.regions = in.regions.defined() ? in.regions.data_ptr<int64_t>() : nullptr;
  pb.region_labels = in.regions.defined() ? in.regions.numel() : 0;
  pb.field_pred = in.field_pred.defined() ? in.field_pred.data_ptr() : nullptr;
  pb.field_sq_err = in.field_sq_err.defined() ? in.field_sq_err.data_ptr() : nullptr;
  return pb;
}

// Calls f(activation, has_labels, want_ce_neg) with each as a compile-time constant.
template <typename F>
void dispatch_flags(int activation, bool labels, bool ce_neg, F&& f) {
  auto with_ce = [&](auto act, auto lab) {
    if (ce_neg && decltype(act)::value != kSoftmax) {
      f(act, lab, BoolTag<true>{});
    } else {
      f(act, lab, BoolTag<false>{});
    }
  };
  auto with_labels = [&](auto act) {
    if (labels) {
      with_ce(act, BoolTag<true>{});
    } else {
      with_ce(act, BoolTag<false>{});
    }
  };
  if (activation == kSoftmax) {
    with_labels(IntTag<kSoftmax>{});
  } else if (activation == kSigmoid) {
    with_labels(IntTag<kSigmoid>{});
  } else {
    with_labels(IntTag<kNone>{});
  }
}

// Calls f(IntTag<bits>{}) with the FieldBits bits as a compile-time constant.
template <typename F>
void dispatch_fields(int bits, F&& f) {
  switch (bits) {
    case kFieldPredBit:
      f(IntTag<kFieldPredBit>{});
      break;
    case kFieldSqErrBit:
      f(IntTag<kFieldSqErrBit>{});
      break;
    case kBothFields:
      f(IntTag<kBothFields>{});
      break;
    default:
      f(IntTag<kNoFields>{});
      break;
  }
}

// The FieldBits of the fields given.
int given_fields(const Problem& pb) {
  return (pb.field_pred != nullptr ? kFieldPredBit : 0) | (pb.field_sq_err != nullptr ? kFieldSqErrBit : 0);
}

// Dispatch on the label type (or soft targets): f(labels_ptr_or_null) with the right L.
template <typename T, typename F>
void with_labels(const RegionStatsInputs& in, F&& f) {
  if (!in.labels.defined()) {
    f(static_cast<const int64_t*>(nullptr), in.target.data_ptr<T>());
    return;
  }
  switch (in.labels.scalar_type()) {
    case at::kLong:
      f(in.labels.data_ptr<int64_t>(), static_cast<const T*>(nullptr));
      break;
    case at::kInt:
      f(in.labels.data_ptr<int32_t>(), static_cast<const T*>(nullptr));
      break;
    default:
      f(in.labels.data_ptr<uint8_t>(), static_cast<const T*>(nullptr));
      break;
  }
}

// The gradient: from the host block cache when large (csrc/torch/host_buffers.cpp: a block the
// last step freed has its pages resident; a fresh one is advised to use huge pages).
at::Tensor empty_for_gradient(const at::Tensor& like) {
  return host_buffers::empty(like.sizes(), like.scalar_type());
}

}  // namespace

at::Tensor region_stats_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& labels,
                            const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& mask,
                            int64_t activation, int64_t ignore_index, bool has_ignore, bool want_ce_neg,
                            bool check_labels, const std::optional<at::Tensor>& regions,
                            const std::optional<at::Tensor>& field_pred,
                            const std::optional<at::Tensor>& field_sq_err) {
  RegionStatsInputs in = canonical_inputs(logits, labels, target, mask, activation, regions);
  add_fields(in, field_pred, field_sq_err);
  const at::ScalarType acc_type = accumulation_type(logits.scalar_type());
  at::Tensor out = at::zeros({in.batch, in.channels, kNumSlots}, logits.options().dtype(acc_type));
  if (in.batch == 0 || in.voxels == 0) return out;
  const Problem pb = make_problem(in, activation, ignore_index, has_ignore, want_ce_neg);
  const int64_t chunks = (in.voxels + kChunk - 1) / kChunk;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "segloss_region_stats_cpu", [&] {
    using A = typename AccType<scalar_t>::type;
    const scalar_t* z = in.logits.data_ptr<scalar_t>();
    std::vector<A> partial(static_cast<size_t>(in.batch * chunks * in.channels * kNumSlots), A(0));
    with_labels<scalar_t>(in, [&](auto* label_ptr, const scalar_t* target_ptr) {
      using L = std::remove_const_t<std::remove_pointer_t<decltype(label_ptr)>>;
      auto run = [&](auto act_tag, auto labels_tag, auto ce_neg_tag) {
        constexpr int ACT = decltype(act_tag)::value;
        constexpr bool LABELS = decltype(labels_tag)::value;
        constexpr bool CE_NEG = decltype(ce_neg_tag)::value;
        dispatch_fields(given_fields(pb), [&](auto fields_tag) {
          constexpr int FIELDS = decltype(fields_tag)::value;
          at::parallel_for(0, in.batch * chunks, 1, [&](int64_t begin, int64_t end) {
            Tile<A> tile(in.channels);
            std::vector<A> lanes(static_cast<size_t>(in.channels * kNumSlots * kLanes));
            for (int64_t task = begin; task < end; ++task) {
              const int64_t b = task / chunks, k = task % chunks;
              const int64_t n0 = k * kChunk, n1 = std::min(in.voxels, n0 + kChunk);
              forward_chunk<ACT, LABELS, CE_NEG, FIELDS, scalar_t, L, A>(
                  pb, z, label_ptr, target_ptr, b, n0, n1, &partial[task * in.channels * kNumSlots], tile, lanes);
            }
          });
        });
      };
      // regions: the target path, its rows filled from the labels (load_tile)
      dispatch_flags(pb.activation, label_ptr != nullptr && pb.regions == nullptr, want_ce_neg, run);
    });
    // fixed-order reduction over chunks
    A* o = out.data_ptr<A>();
    const int64_t per_sample = in.channels * kNumSlots;
    for (int64_t b = 0; b < in.batch; ++b) {
      for (int64_t k = 0; k < chunks; ++k) {
        const A* src = &partial[(b * chunks + k) * per_sample];
        for (int64_t j = 0; j < per_sample; ++j) o[b * per_sample + j] += src[j];
      }
    }
  });
  if (check_labels && in.labels.defined()) {
    check_invalid_labels(out, in.labels, valid_label_count(in, activation), has_ignore, ignore_index);
  }
  return out;
}

at::Tensor region_stats_backward_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                     const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& target,
                                     const std::optional<at::Tensor>& mask, int64_t activation, int64_t ignore_index,
                                     bool has_ignore, const std::optional<at::Tensor>& regions,
                                     const std::optional<at::Tensor>& field_pred,
                                     const std::optional<at::Tensor>& field_sq_err) {
  RegionStatsInputs in = canonical_inputs(logits, labels, target, mask, activation, regions);
  add_fields(in, field_pred, field_sq_err);
  const at::ScalarType acc_type = accumulation_type(logits.scalar_type());
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == in.batch && grad.size(1) == in.channels && grad.size(2) == kNumSlots,
              "segloss::region_stats_backward: grad must be (B, C, ", static_cast<int>(kNumSlots), "), got ",
              grad.sizes());
  at::Tensor upstream = grad.to(acc_type).contiguous();
  at::Tensor result = empty_for_gradient(in.logits);
  if (in.batch == 0 || in.voxels == 0) return result.view(logits.sizes());
  const Problem pb = make_problem(in, activation, ignore_index, has_ignore, true);
  const int64_t chunks = (in.voxels + kChunk - 1) / kChunk;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "segloss_region_stats_bwd_cpu", [&] {
    using A = typename AccType<scalar_t>::type;
    const scalar_t* z = in.logits.data_ptr<scalar_t>();
    const A* u = upstream.data_ptr<A>();
    scalar_t* out = result.data_ptr<scalar_t>();
    const bool lean = lean_gradient(u, in.batch * in.channels);
    const int fields = field_gradient_bits(u, in.batch * in.channels) & given_fields(pb);
    std::vector<char> active(static_cast<size_t>(in.batch * in.channels));
    for (int64_t k = 0; k < in.batch * in.channels; ++k) active[k] = !class_without_gradient(u + k * kNumSlots);
    with_labels<scalar_t>(in, [&](auto* label_ptr, const scalar_t* target_ptr) {
      using L = std::remove_const_t<std::remove_pointer_t<decltype(label_ptr)>>;
      auto run = [&](auto act_tag, auto labels_tag, auto) {
        constexpr int ACT = decltype(act_tag)::value;
        constexpr bool LABELS = decltype(labels_tag)::value;
        auto chunks_of = [&](auto lean_tag, auto fields_tag) {
          constexpr bool LEAN = decltype(lean_tag)::value;
          constexpr int FIELDS = decltype(fields_tag)::value;
          at::parallel_for(0, in.batch * chunks, 1, [&](int64_t begin, int64_t end) {
            Tile<A> tile(in.channels);
            for (int64_t task = begin; task < end; ++task) {
              const int64_t b = task / chunks, k = task % chunks;
              const int64_t n0 = k * kChunk, n1 = std::min(in.voxels, n0 + kChunk);
              backward_chunk<ACT, LABELS, LEAN, FIELDS, scalar_t, L, A>(pb, z, label_ptr, target_ptr, u, active.data(),
                                                                        b, n0, n1, out, tile);
            }
          });
        };
        if (lean) {
          dispatch_fields(fields, [&](auto fields_tag) { chunks_of(BoolTag<true>{}, fields_tag); });
        } else {
          chunks_of(BoolTag<false>{}, IntTag<kBothFields>{});
        }
      };
      dispatch_flags(pb.activation, label_ptr != nullptr && pb.regions == nullptr, false, run);
    });
  });
  return result.view(logits.sizes());
}

}  // namespace segloss
