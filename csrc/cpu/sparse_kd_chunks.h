// Chunk math of the sparse KD loss's CPU kernels, included by sparse_kd_cpu.cpp only (one copy
// per instruction-set variant, inside its namespace kdfast::cpu::KDFAST_CPU_VARIANT): a row's
// kept tokens (`load_kept`) and per-thread scratch (`RowScratch`), what a call streams from the
// student row (`StreamPlan`), and the lanes sweeps over one chunk of it: the tail's sums of
// exponentials in the forward pass (`tail_chunk_sums`) and the tail entries' gradient
// (`tail_chunk_grad`, chosen for a call by `pick_tail_grad`). Contract: types.h and
// sparse_rowmath.h; the row drivers are sparse_kd_cpu.cpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "convert.h"
#include "exp_lanes.h"
#include "kernel_common.h"
#include "memory_policy.h"
#include "kdfast/rowmath.h"
#include "kdfast/sparse_rowmath.h"
#include "kdfast/types.h"

#ifndef KDFAST_CPU_VARIANT
#error "KDFAST_CPU_VARIANT must name the instruction-set variant"
#endif

namespace kdfast {
namespace cpu {
namespace KDFAST_CPU_VARIANT {

using sparse::SparseCoefficients;

namespace {


constexpr int64_t kChunk = 2048;
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();


// A kept token: vocabulary index and its slot (position along k in the soft labels).
struct KeptEntry {
  int64_t index;
  int64_t slot;
};


// Reads row `row` of the kept indices into `kept`, sorted by vocabulary index. Returns false
// when an index is outside [0, vocab) or appears twice.
bool load_kept(const SoftLabelView& labels, int64_t row, int64_t vocab, std::vector<KeptEntry>& kept) {
  const int64_t k = labels.k;
  kept.resize(static_cast<size_t>(k));
  for (int64_t j = 0; j < k; ++j) {
    const int64_t index = sparse::load_index(labels.indices, labels.index_type, row * k + j);
    if (index < 0 || index >= vocab) return false;
    kept[j] = KeptEntry{index, j};
  }
  std::sort(kept.begin(), kept.end(), [](const KeptEntry& a, const KeptEntry& b) { return a.index < b.index; });
  for (int64_t j = 1; j < k; ++j)
    if (kept[j].index == kept[j - 1].index) return false;
  return true;
}

// log Σ_i exp(values[i]); -inf for none or only -inf, NaN when one is NaN.
double log_sum_exp(const double* values, int64_t n) {
  double top = -kInf;
  for (int64_t i = 0; i < n; ++i) {
    if (values[i] != values[i]) return kNaN;
    top = std::max(top, values[i]);
  }
  if (top == -kInf) return -kInf;
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(values[i] - top);
  return top + std::log(sum);
}

// log Σ_i exp((x_i - reference) scale) over n raw logits.
double shifted_log_sum_exp(const double* x, int64_t n, double reference, double scale, double* scratch) {
  for (int64_t i = 0; i < n; ++i) scratch[i] = (x[i] - reference) * scale;
  return log_sum_exp(scratch, n);
}


// What a call needs streamed from the student row.
struct StreamPlan {
  bool tail_at_t;   // log-sum-exp of the non-kept s/T: the tail bucket
  bool tail_at_1;   // log-sum-exp of the non-kept s: cross-entropy when it cannot reuse the above
  bool smoothing;   // sum of all s: label smoothing
  int power_1;      // T = 2 or 4 with both sums: exp(x - m) = exp((x - m)/T)^T, one exp per entry
  bool prefetch;    // the tail sums ask for the row's next chunk as they go (large calls)
  bool any() const { return tail_at_t || tail_at_1 || smoothing; }
};

// `call_bytes`: the student logits of the call (kPrefetchCallBytes, memory_policy.h).
template <class C>
StreamPlan plan_for(const SparseCoefficients<C>& k, double temperature, int64_t call_bytes) {
  StreamPlan plan;
  plan.tail_at_t = k.bucket && k.need_kd;
  plan.tail_at_1 = k.need_ce && !(plan.tail_at_t && temperature == 1.0);
  plan.smoothing = k.need_ce && k.label_smoothing > C(0);
  plan.power_1 = plan.tail_at_t && plan.tail_at_1 && (temperature == 2.0 || temperature == 4.0)
                     ? static_cast<int>(temperature)
                     : 0;
  plan.prefetch = call_bytes > kPrefetchCallBytes;
  return plan;
}

// Copies a chunk into the writable compute-type buffer (the kept entries get masked there).
template <class S, class C>
void copy_chunk(const S* src, int64_t n, C* buffer) {
  if constexpr (std::is_same_v<S, C>) {
    std::memcpy(buffer, src, sizeof(C) * static_cast<size_t>(n));
  } else {
    const C* converted = load_chunk<S, C>(src, n, buffer);
    if (converted != buffer) std::memcpy(buffer, converted, sizeof(C) * static_cast<size_t>(n));
  }
}

// exp(x/T) and exp(x) on the variant's lanes (exp_lanes.h), for x <= 0: built once per call.
template <class C>
struct TailExps {
  ExpLanes<C> t, one;
  explicit TailExps(double inv_t) : t(inv_t), one(1.0) {}
};

// sum_t += sum exp((x_i - m)/T), sum_1 += sum exp(x_i - m) over a chunk whose entries are at
// most m (or -inf, or NaN, which propagates), on the lanes. POW_1 = T (2 or 4, with SUM_T):
// exp(x_i - m) as that power of exp((x_i - m)/T). `ahead`: the bytes of the row's next chunk
// (sizeof(S) per element, as an address: it may lie past the tensor; 0 for none), asked for a
// vector step at a time; `next`: the thread's next row, asked for in streams (memory_policy.h;
// next.next_row null for none).
template <class C, bool SUM_T, bool SUM_1, int POW_1 = 0, class S = C>
void tail_chunk_sums(const C* x, int64_t n, C m, const TailExps<C>& exps, uintptr_t ahead, const AheadPlan& next,
                     C& sum_t, C& sum_1) {
  static_assert(POW_1 == 0 || (SUM_T && SUM_1), "the power form derives sum_1 from the terms of sum_t");
  const ExpLanes<C> exp_t = exps.t, exp_1 = exps.one;  // local copies: constants stay in registers
  LaneSums<C, 2> acc;
  sweep_lanes<C>(n, [&](auto lane, int64_t i) {
    using L = Lane<decltype(lane)>;
    if constexpr (!std::is_same_v<decltype(lane), C>) {
      if (ahead) __builtin_prefetch(reinterpret_cast<const void*>(ahead + i * sizeof(S)), 0, 2);  // never faults
      constexpr int64_t kStep = static_cast<int64_t>(sizeof(decltype(lane)) / sizeof(C) * sizeof(S));
      if (next.next_row) prefetch_next_row<kStep>(next, i * static_cast<int64_t>(sizeof(S)));
    }
    auto* sums = acc.sums(lane);
    const auto centred = L::load(x + i) - L::splat(m);
    if constexpr (POW_1 != 0) {
      const auto e = exp_t(centred);
      sums[0] = sums[0] + e;
      sums[1] = sums[1] + rowmath::integer_power<POW_1>(e);
      return;
    }
    if constexpr (SUM_T) sums[0] = sums[0] + exp_t(centred);
    if constexpr (SUM_1) sums[1] = sums[1] + exp_1(centred);
  });
  sum_t = acc.total(0);
  sum_1 = acc.total(1);
}

// Per-thread working memory of a row.
struct RowScratch {
  std::vector<KeptEntry> kept;
  std::vector<double> kept_logits;  // raw student logits at the kept tokens, by slot
  std::vector<double> scaled_kept;  // (kept logit - kd reference) / T, by slot
  std::vector<double> bucket_values;

  RowScratch() = default;
  // Buffers for the forward sweeps of rows with k kept tokens.
  explicit RowScratch(int64_t k)
      : kept_logits(static_cast<size_t>(k)), scaled_kept(static_cast<size_t>(k)), bucket_values(static_cast<size_t>(k)) {}
};

// ---- backward ----

// Gradient of the tail (non-kept) entries of one chunk on the lanes; kept entries are
// overwritten later (their logits may exceed tail_max: the exponentials' argument is clamped
// at 0 so that they stay finite until then).
//   bucket D term:   kd_tail * e,  e = exp((s - tail_max)/T) / Z_tail (inv_z_tail = 1/Z_tail)
//   cross-entropy:   ce_factor * (r - eps/V),  r = softmax(s): e * Q_tail when T == 1 and the
//                    tail bucket is streamed, else exp(s - tail_max) * r_factor, where with
//                    POW_1 = T (2 or 4, both terms) exp(s - tail_max) = exp((s - tail_max)/T)^T
template <class C, bool KD_TAIL, bool CE, bool CE_FROM_TAIL, int POW_1 = 0>
void tail_chunk_grad(const C* s, int64_t n, C* out, C tail_max, const TailExps<C>& exps, C inv_z_tail, C kd_tail,
                     C q_tail, C ce_factor, C smooth, C r_factor) {
  const ExpLanes<C> exp_t = exps.t, exp_1 = exps.one;  // local copies: constants stay in registers
  sweep_lanes<C>(n, [&](auto lane, int64_t i) {
    using L = Lane<decltype(lane)>;
    const auto centred = min_(L::load(s + i) - L::splat(tail_max), L::zero());
    auto value = L::zero();
    if constexpr (POW_1 != 0) {
      static_assert(KD_TAIL && CE && !CE_FROM_TAIL, "the power form serves both terms");
      const auto e = exp_t(centred);
      value = L::splat(kd_tail) * (e * L::splat(inv_z_tail));
      value = fma_(L::splat(ce_factor), rowmath::integer_power<POW_1>(e) * L::splat(r_factor) - L::splat(smooth), value);
      store(out + i, value);
      return;
    }
    if constexpr (KD_TAIL) {
      const auto e = exp_t(centred) * L::splat(inv_z_tail);
      value = L::splat(kd_tail) * e;
      if constexpr (CE && CE_FROM_TAIL) value = fma_(L::splat(ce_factor), e * L::splat(q_tail) - L::splat(smooth), value);
    }
    if constexpr (CE && !CE_FROM_TAIL) {
      value = fma_(L::splat(ce_factor), exp_1(centred) * L::splat(r_factor) - L::splat(smooth), value);
    }
    store(out + i, value);
  });
}

template <class C>
using TailGradFn = void (*)(const C*, int64_t, C*, C, const TailExps<C>&, C, C, C, C, C, C);

// power_1: StreamPlan's (with both terms and the cross-entropy not from the tail bucket).
template <class C>
TailGradFn<C> pick_tail_grad(bool kd_tail, bool ce, bool ce_from_tail, int power_1) {
  if (kd_tail) {
    if (!ce) return tail_chunk_grad<C, true, false, false>;
    if (ce_from_tail) return tail_chunk_grad<C, true, true, true>;
    if (power_1 == 2) return tail_chunk_grad<C, true, true, false, 2>;
    if (power_1 == 4) return tail_chunk_grad<C, true, true, false, 4>;
    return tail_chunk_grad<C, true, true, false>;
  }
  if (ce) return tail_chunk_grad<C, false, true, false>;
  return nullptr;  // no gradient reaches tail entries: zeros
}

}  // namespace
}  // namespace KDFAST_CPU_VARIANT
}  // namespace cpu
}  // namespace kdfast
