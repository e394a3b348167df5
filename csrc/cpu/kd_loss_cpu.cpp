// CPU kernels of the dense KD loss (forward statistics + loss, backward gradient).
// This file is compiled once per instruction-set variant (baseline x86-64, AVX2+FMA+F16C,
// AVX-512) into the namespace kdfast::cpu::KDFAST_CPU_VARIANT; dispatch.cpp picks one at run
// time. Contract: see types.h (KDForwardArgs / KDBackwardArgs) and rowmath.h (the math).
// Rows are split over OpenMP threads (args.num_threads, no more); each row is streamed in
// chunks of kChunk elements: converted to the compute type into a stack buffer (or used in
// place for float32 / float64), then swept with vectorised loops; the exp-bound sweeps (the
// forward statistics, forward_kl's gradient) run on the lanes of lanes.h with its exp(x/T).
// The forward pass reads the row once (JSD/TVD: a second sweep over the same, cache-resident
// chunks); the backward pass reads it once more and writes the gradient once, multiplied by
// grad_output, or NaN for a row whose loss is NaN (NaN in, NaN out: rowmath::row_sums_defined).
// Logits enter as scaled differences h x - h max (rowmath::difference_scale) and the per-row
// finishing (loss, gradient factors) runs in double.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "convert.h"
#include "kernel_common.h"
#include "lanes.h"
#include "kdfast/rowmath.h"
#include "kdfast/types.h"

#ifndef KDFAST_CPU_VARIANT
#error "KDFAST_CPU_VARIANT must name the instruction-set variant"
#endif

namespace kdfast {
namespace cpu {
namespace KDFAST_CPU_VARIANT {

using rowmath::Coefficients;
using rowmath::GradRow;
using rowmath::RowPartial;
using rowmath::RowStats;

namespace {

constexpr int64_t kChunk = 512;

// ---- chunk math: operates on compute-type buffers, independent of the storage dtypes ----

// exp((x - max)/T) and exp(x - max) of a scaled difference d = h x - h max (rowmath.h,
// difference_scale) on the variant's lanes (lanes.h): exp(d κ) and exp(d / h), built once per call.
template <class C>
struct RowExps {
  ExpLanes<C> t, one;
  explicit RowExps(const Coefficients<C>& k)
      : t(k.inv_scaled_t_d), one(1.0 / static_cast<double>(k.diff_scale)) {}
};

// One row's gradient factors (rowmath::GradRow) and the inverse sums 1/Z = exp(-log-sum)
// that forward_kl's gradient on the lanes multiplies by; built once per row.
template <class C>
struct ChunkGradRow {
  GradRow<C> row;
  C inv_zq, inv_zp, inv_z1;  // 1/Z of exp(ds/T), exp(dt/T), exp(ds)
};

// Folds one chunk into the streamed statistics of a row in a single sweep: both maxima
// first (one loop), then every sum of the chunk relative to the new running maxima (one
// loop), then a merge into the row's partial (rowmath::merge_partials).
// FOLD: exp(d κ) with the folded polynomial (lanes.h; when RowExps::t is foldable).
template <class C, Divergence D, bool KD, int S1, bool SMOOTH, bool FOLD>
void chunk_stats(const C* s, const C* t, int64_t n, const Coefficients<C>& coefficients, const RowExps<C>& exps,
                 RowPartial<C>& part) {
  const Coefficients<C> k = coefficients;
  const C h = k.diff_scale;
  C chunk_max_s = kNegInf<C>, chunk_max_t = kNegInf<C>;
  if constexpr (KD) {
#pragma omp simd reduction(max : chunk_max_s, chunk_max_t)
    for (int64_t i = 0; i < n; ++i) {
      chunk_max_s = s[i] > chunk_max_s ? s[i] : chunk_max_s;
      chunk_max_t = t[i] > chunk_max_t ? t[i] : chunk_max_t;
    }
  } else {
#pragma omp simd reduction(max : chunk_max_s)
    for (int64_t i = 0; i < n; ++i) chunk_max_s = s[i] > chunk_max_s ? s[i] : chunk_max_s;
  }
  RowPartial<C> chunk = rowmath::empty_partial<C>();
  chunk.student_max = std::max(part.student_max, chunk_max_s);
  chunk.teacher_max = std::max(part.teacher_max, chunk_max_t);
  chunk.count = static_cast<C>(n);
  // A maximum of -inf (every entry so far masked) shifts by 0 instead: the entries stay
  // -inf and their exponentials 0, with no inf - inf. Differences are scaled: d = h x - h max.
  const C shift_s = (chunk.student_max == kNegInf<C> ? C(0) : chunk.student_max) * h;
  const C shift_t = (chunk.teacher_max == kNegInf<C> ? C(0) : chunk.teacher_max) * h;
  // Local copies: they must not alias the sums for the constants to stay in registers.
  const ExpLanes<C> exp_t = exps.t, exp_1 = exps.one;
  LaneSums<C, 5> acc;  // sums of e_q, of exp(ds) or e_q^S1, e_p, weighted, centered
  sweep_lanes<C>(n, [&](auto lane, int64_t i) {
    using L = Lane<decltype(lane)>;
    auto* sums = acc.sums(lane);
    const auto ds = fma_(L::load(s + i), L::splat(h), L::splat(-shift_s));
    const auto e_q = exp_t.template apply<true, FOLD>(ds);
    sums[0] = sums[0] + e_q;
    if constexpr (S1 == rowmath::kStudent1Exp) sums[1] = sums[1] + exp_1(ds);
    if constexpr (S1 == 2 || S1 == 4) sums[1] = sums[1] + rowmath::integer_power<S1>(e_q);
    if constexpr (SMOOTH) sums[4] = sums[4] + ds;
    if constexpr (KD) {
      const auto dt = fma_(L::load(t + i), L::splat(h), L::splat(-shift_t));
      const auto e_p = exp_t.template apply<true, FOLD>(dt);
      sums[2] = sums[2] + e_p;
      if constexpr (D == Divergence::ForwardKL) sums[3] = sums[3] + where_positive(e_p, e_p * (dt - ds));
      if constexpr (D == Divergence::ReverseKL) sums[3] = sums[3] + where_positive(e_q, e_q * (ds - dt));
    }
  });
  const C sum_q = acc.total(0), sum_1 = acc.total(1), sum_p = acc.total(2), weighted = acc.total(3),
          centered = acc.total(4);
  chunk.student_sum_T = sum_q;
  chunk.student_sum_1 = sum_1;
  chunk.student_centered_total = centered;
  chunk.teacher_sum = sum_p;
  chunk.weighted = weighted;
  rowmath::merge_partials(part, chunk, k, k.divergence);
}

// Second sweep of JSD / TVD over one chunk, with the row's maxima and log-sums known.
template <class C, Divergence D>
void chunk_sweep(const C* s, const C* t, int64_t n, const Coefficients<C>& coefficients, const RowStats<C>& stats,
                 C& acc0, C& acc1) {
  const Coefficients<C> k = coefficients;
  const RowStats<C> st = stats;
  const C h = k.diff_scale, kappa = k.inv_scaled_t;
  const C max_t = st.teacher_max * h, max_s = st.student_max * h;
  C sum0 = 0, sum1 = 0;
#pragma omp simd reduction(+ : sum0, sum1)
  for (int64_t i = 0; i < n; ++i) {
    const C log_p = rowmath::scaled_difference(t[i], h, max_t) * kappa - st.teacher_log_sum;
    const C log_q = rowmath::scaled_difference(s[i], h, max_s) * kappa - st.student_log_sum_T;
    C x0 = 0, x1 = 0;
    if constexpr (D == Divergence::JSD) rowmath::jsd_terms(log_p, log_q, k, x0, x1);
    else rowmath::tvd_terms(log_p, log_q, x0, x1);
    sum0 += x0;
    sum1 += x1;
  }
  acc0 += sum0;
  acc1 += sum1;
}

// forward_kl's gradient of one chunk on the lanes (the same as chunk_grad<ForwardKL>):
// q = exp(ds/T) / Z_q and p = exp(dt/T) / Z_p with the row's sums Z = exp(log-sum), so each
// element takes the lanes' exp(x/T) and one product instead of a rounded x/T - log-sum.
template <class C, bool CE, bool KD, int S1, bool FOLD>
void chunk_grad_forward_kl(const C* s, const C* t, int64_t n, const Coefficients<C>& coefficients,
                           const RowExps<C>& exps, const ChunkGradRow<C>& grad_row, C* out) {
  const GradRow<C> g = grad_row.row;
  const C h = coefficients.diff_scale;
  const C max_s = g.stats.student_max * h, max_t = g.stats.teacher_max * h;
  const C inv_zq = grad_row.inv_zq, inv_zp = grad_row.inv_zp, inv_z1 = grad_row.inv_z1;
  const ExpLanes<C> exp_t = exps.t, exp_1 = exps.one;  // local copies, as in chunk_stats
  sweep_lanes<C>(n, [&](auto lane, int64_t i) {
    using L = Lane<decltype(lane)>;
    const auto ds = fma_(L::load(s + i), L::splat(h), L::splat(-max_s));
    const auto q = exp_t.template apply<true, FOLD>(ds) * L::splat(inv_zq);
    auto value = L::zero();
    if constexpr (KD) {
      const auto p = exp_t.template apply<true, FOLD>(fma_(L::load(t + i), L::splat(h), L::splat(-max_t))) *
                     L::splat(inv_zp);
      value = L::splat(g.kd_factor) * (q - p);
    }
    if constexpr (CE) {
      auto r = q;  // T == 1
      if constexpr (S1 == rowmath::kStudent1Exp) r = exp_1(ds) * L::splat(inv_z1);
      if constexpr (S1 == 2 || S1 == 4) r = rowmath::integer_power<S1>(q) * L::splat(g.r_scale);
      value = fma_(L::splat(g.ce_factor), r - L::splat(g.smooth), value);
    }
    store(out + i, value);
  });
}

// Gradient of one chunk (before the label fix-up), written to `out`; forward_kl's is
// chunk_grad_forward_kl above.
template <class C, Divergence D, bool CE, bool KD, int S1, bool FOLD>
void chunk_grad(const C* s, const C* t, int64_t n, const Coefficients<C>& coefficients, const RowExps<C>& exps,
                const ChunkGradRow<C>& grad_row, C* out) {
  if constexpr (D == Divergence::ForwardKL) {
    return chunk_grad_forward_kl<C, CE, KD, S1, FOLD>(s, t, n, coefficients, exps, grad_row, out);
  }
  (void)exps;
  // Local copies: the loop's invariants must not alias `out` for the loop to vectorise.
  const Coefficients<C> k = coefficients;
  const GradRow<C> g = grad_row.row;
  const C h = k.diff_scale, kappa = k.inv_scaled_t, inv_h = k.inv_diff_scale;
  const C max_s = g.stats.student_max * h, max_t = g.stats.teacher_max * h;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const C ds = rowmath::scaled_difference(s[i], h, max_s);
    const C log_q = ds * kappa - g.stats.student_log_sum_T;
    const C q = rowmath::exp_c(log_q);
    C value = 0;
    if constexpr (KD) {
      const C dt = rowmath::scaled_difference(t[i], h, max_t);
      if constexpr (D == Divergence::ReverseKL) {
        value += rowmath::reverse_kl_grad(ds, dt, q, g.rkl_a, g.rkl_b, g.rkl_c);
      } else {
        const C log_p = dt * kappa - g.stats.teacher_log_sum;
        value += g.kd_factor * rowmath::divergence_grad<D>(log_p, log_q, q, g.stats.aux, k);
      }
    }
    if constexpr (CE) {
      C r = q;  // T == 1
      if constexpr (S1 == rowmath::kStudent1Exp) r = rowmath::exp_c(ds * inv_h - g.stats.student_log_sum_1);
      if constexpr (S1 == 2 || S1 == 4) r = rowmath::integer_power<S1>(q) * g.r_scale;
      value += g.ce_factor * (r - g.smooth);
    }
    out[i] = value;
  }
}

// ---- selection of the chunk-math instantiation for a call's runtime options ----

template <class C>
using StatsFn = void (*)(const C*, const C*, int64_t, const Coefficients<C>&, const RowExps<C>&, RowPartial<C>&);
template <class C>
using SweepFn = void (*)(const C*, const C*, int64_t, const Coefficients<C>&, const RowStats<C>&, C&, C&);
template <class C>
using GradFn = void (*)(const C*, const C*, int64_t, const Coefficients<C>&, const RowExps<C>&,
                        const ChunkGradRow<C>&, C*);

// FOLD: the lanes' exp with folded coefficients (lanes.h), chosen per call where foldable;
// the other chunk functions do not use the lanes' exp and ignore it.
template <class C, Divergence D, bool KD, bool SMOOTH, bool FOLD>
StatsFn<C> pick_stats_mode(int student_1_mode) {
  switch (student_1_mode) {
    case rowmath::kStudent1Exp: return chunk_stats<C, D, KD, rowmath::kStudent1Exp, SMOOTH, FOLD>;
    case 2: return chunk_stats<C, D, KD, 2, SMOOTH, FOLD>;
    case 4: return chunk_stats<C, D, KD, 4, SMOOTH, FOLD>;
    default: return chunk_stats<C, D, KD, rowmath::kStudent1None, SMOOTH, FOLD>;
  }
}

template <class C, Divergence D, bool FOLD>
StatsFn<C> pick_stats(bool kd, int student_1_mode, bool smooth) {
  if (kd) {
    return smooth ? pick_stats_mode<C, D, true, true, FOLD>(student_1_mode)
                  : pick_stats_mode<C, D, true, false, FOLD>(student_1_mode);
  }
  return smooth ? pick_stats_mode<C, D, false, true, FOLD>(student_1_mode)
                : pick_stats_mode<C, D, false, false, FOLD>(student_1_mode);
}

template <class C, Divergence D, bool KD, bool FOLD>
GradFn<C> pick_grad_mode(int student_1_mode) {
  switch (student_1_mode) {
    case rowmath::kStudent1Exp: return chunk_grad<C, D, true, KD, rowmath::kStudent1Exp, FOLD>;
    case 2: return chunk_grad<C, D, true, KD, 2, FOLD>;
    case 4: return chunk_grad<C, D, true, KD, 4, FOLD>;
    default: return chunk_grad<C, D, true, KD, rowmath::kStudent1None, FOLD>;
  }
}

template <class C, Divergence D, bool FOLD>
GradFn<C> pick_grad(bool ce, bool kd, int student_1_mode) {
  if (!ce) return chunk_grad<C, D, false, true, rowmath::kStudent1None, FOLD>;
  return kd ? pick_grad_mode<C, D, true, FOLD>(student_1_mode) : pick_grad_mode<C, D, false, FOLD>(student_1_mode);
}

template <class C>
struct ChunkKernels {
  StatsFn<C> stats;
  SweepFn<C> sweep;  // null for the one-pass divergences
  GradFn<C> grad;
};

template <class C, Divergence D, bool FOLD>
ChunkKernels<C> pick_for(const Coefficients<C>& k) {
  ChunkKernels<C> kernels;
  // Only forward_kl's gradient uses the lanes' exp: the other divergences share one instantiation.
  constexpr bool kGradFold = FOLD && D == Divergence::ForwardKL;
  kernels.stats = pick_stats<C, D, FOLD>(k.need_kd, k.student_1_mode, k.need_ce && k.label_smoothing > C(0));
  kernels.sweep = (D == Divergence::JSD || D == Divergence::TVD) && k.need_kd ? chunk_sweep<C, D> : nullptr;
  kernels.grad = pick_grad<C, D, kGradFold>(k.need_ce, k.need_kd, k.student_1_mode);
  return kernels;
}

template <class C, bool FOLD>
ChunkKernels<C> pick_kernels_folded(const Coefficients<C>& k) {
  switch (k.divergence) {
    case Divergence::ForwardKL: return pick_for<C, Divergence::ForwardKL, FOLD>(k);
    case Divergence::ReverseKL: return pick_for<C, Divergence::ReverseKL, FOLD>(k);
    case Divergence::JSD: return pick_for<C, Divergence::JSD, FOLD>(k);
    case Divergence::TVD: break;
  }
  return pick_for<C, Divergence::TVD, FOLD>(k);
}

template <class C>
ChunkKernels<C> pick_kernels(const Coefficients<C>& k, const RowExps<C>& exps) {
  if constexpr (std::is_same_v<C, float>) {
    if (exps.t.foldable()) return pick_kernels_folded<C, true>(k);
  }
  return pick_kernels_folded<C, false>(k);
}


// ---- row drivers: storage dtypes S (student), T (teacher), compute type C ----

template <class S, class T, class C>
int64_t forward_impl(const KDForwardArgs& args) {
  const Coefficients<C> k = rowmath::make_coefficients<C>(args.options, args.vocab);
  const RowExps<C> exps(k);
  const ChunkKernels<C> kernels = pick_kernels<C>(k, exps);
  const int64_t rows = args.rows, vocab = args.vocab;
  const S* student = static_cast<const S*>(args.student);
  const T* teacher = static_cast<const T*>(args.teacher);
  C* row_stats = static_cast<C*>(args.row_stats);
  int64_t bad_labels = 0;

#pragma omp parallel for num_threads(threads_for(args.num_threads, rows, vocab)) schedule(static) reduction(+ : bad_labels)
  for (int64_t row = 0; row < rows; ++row) {
    C* stats_out = row_stats + row * kRowStats;
    if (!label_valid(args.labels, row, args.options.ignore_index)) {
      for (int j = 0; j < kRowStats; ++j) stats_out[j] = C(0);
      continue;
    }
    const int64_t label = args.labels ? args.labels[row] : -1;
    if (args.labels && (label < 0 || label >= vocab)) {
      ++bad_labels;
      for (int j = 0; j < kRowStats; ++j) stats_out[j] = std::numeric_limits<C>::quiet_NaN();
      continue;
    }
    alignas(64) C student_buf[kChunk];
    alignas(64) C teacher_buf[kChunk];
    const S* s_row = student + row * args.student_row_stride;
    const T* t_row = teacher + row * args.teacher_row_stride;
    RowPartial<C> part = rowmath::empty_partial<C>();
    for (int64_t start = 0; start < vocab; start += kChunk) {
      const int64_t n = std::min(kChunk, vocab - start);
      const C* s = load_chunk<S, C>(s_row + start, n, student_buf);
      const C* t = k.need_kd ? load_chunk<T, C>(t_row + start, n, teacher_buf) : nullptr;
      kernels.stats(s, t, n, k, exps, part);
    }
    double divergence = 0.0;
    RowStats<C> st = rowmath::finish_stats(part, k, &divergence);
    if (kernels.sweep) {
      C acc0 = 0, acc1 = 0;
      for (int64_t start = 0; start < vocab; start += kChunk) {
        const int64_t n = std::min(kChunk, vocab - start);
        const C* s = load_chunk<S, C>(s_row + start, n, student_buf);
        const C* t = load_chunk<T, C>(t_row + start, n, teacher_buf);
        kernels.sweep(s, t, n, k, st, acc0, acc1);
      }
      divergence = static_cast<double>(k.divergence == Divergence::JSD ? rowmath::finish_jsd(acc0, acc1, k, st)
                                                                        : rowmath::finish_tvd(acc0, acc1, st));
    }
    double ce = 0.0;
    if (k.need_ce) {
      const double label_logit =
          static_cast<double>(load_one<S, C>(s_row + label)) - static_cast<double>(st.student_max);
      const double centered = static_cast<double>(part.student_centered_total) / static_cast<double>(k.diff_scale);
      ce = rowmath::cross_entropy(label_logit, static_cast<double>(st.student_log_sum_1), centered, vocab,
                                  k.label_smoothing_d);
    }
    // A sum the loss needs that is NaN (NaN or +inf logits) or zero (only -inf logits) makes
    // the row NaN; the backward pass then writes a NaN gradient row.
    const double row_loss =
        rowmath::row_sums_defined(part, k) ? rowmath::combine_loss(ce, divergence, k) : kNaN<double>;
    stats_out[0] = st.teacher_max;
    stats_out[1] = st.teacher_log_sum;
    stats_out[2] = st.student_max;
    stats_out[3] = st.student_log_sum_T;
    stats_out[4] = st.student_log_sum_1;
    stats_out[5] = st.aux;
    stats_out[6] = static_cast<C>(row_loss);
    stats_out[7] = C(0);
  }

  reduce_row_losses(row_stats, kRowStats, 6, rows, args.labels, args.options, static_cast<C*>(args.loss),
                    static_cast<C*>(args.valid_rows));
  return bad_labels;
}

template <class S, class T, class C>
void backward_impl(const KDBackwardArgs& args) {
  const Coefficients<C> k = rowmath::make_coefficients<C>(args.options, args.vocab);
  const RowExps<C> exps(k);
  const ChunkKernels<C> kernels = pick_kernels<C>(k, exps);
  const int64_t rows = args.rows, vocab = args.vocab;
  const S* student = static_cast<const S*>(args.student);
  const T* teacher = static_cast<const T*>(args.teacher);
  const C* row_stats = static_cast<const C*>(args.row_stats);
  const C* grad_output = static_cast<const C*>(args.grad_output);
  S* grad_student = static_cast<S*>(args.grad_student);

  double reduction_scale = 1.0;
  if (args.options.reduction == Reduction::Mean) {
    const double valid = static_cast<double>(*static_cast<const C*>(args.valid_rows));
    reduction_scale = valid > 0 ? 1.0 / valid : 0.0;
  } else if (args.options.reduction == Reduction::BatchMean) {
    reduction_scale = rows > 0 ? 1.0 / static_cast<double>(rows) : 0.0;
  }

#pragma omp parallel for num_threads(threads_for(args.num_threads, rows, vocab)) schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    S* g_row = grad_student + row * vocab;
    if (!label_valid(args.labels, row, args.options.ignore_index)) {
      std::memset(static_cast<void*>(g_row), 0, sizeof(S) * vocab);
      continue;
    }
    const C* st = row_stats + row * kRowStats;
    if (st[6] != st[6]) {  // a NaN row loss (NaN input, or a bad label): a NaN gradient row
      fill_nan(g_row, vocab);
      continue;
    }
    const double g = static_cast<double>(grad_output[row * args.grad_output_stride]) * reduction_scale;
    ChunkGradRow<C> row_grad;
    row_grad.row = rowmath::make_grad_row(g, k, RowStats<C>{st[0], st[1], st[2], st[3], st[4], st[5]}, vocab);
    GradRow<C>& gr = row_grad.row;
    gr.r_scale = k.student_1_mode == 2 || k.student_1_mode == 4
                     ? static_cast<C>(std::exp(static_cast<double>(k.student_1_mode) * static_cast<double>(st[3]) -
                                               static_cast<double>(st[4])))
                     : C(0);
    row_grad.inv_zq = static_cast<C>(std::exp(-static_cast<double>(gr.stats.student_log_sum_T)));
    row_grad.inv_zp = static_cast<C>(std::exp(-static_cast<double>(gr.stats.teacher_log_sum)));
    row_grad.inv_z1 = static_cast<C>(std::exp(-static_cast<double>(gr.stats.student_log_sum_1)));
    const int64_t label = args.labels ? args.labels[row] : -1;
    const C label_step = gr.label_step;
    alignas(64) C student_buf[kChunk];
    alignas(64) C teacher_buf[kChunk];
    alignas(64) C grad_buf[kChunk];
    const S* s_row = student + row * args.student_row_stride;
    const T* t_row = teacher + row * args.teacher_row_stride;
    for (int64_t start = 0; start < vocab; start += kChunk) {
      const int64_t n = std::min(kChunk, vocab - start);
      const C* s = load_chunk<S, C>(s_row + start, n, student_buf);
      const C* t = k.need_kd ? load_chunk<T, C>(t_row + start, n, teacher_buf) : nullptr;
      C* out;
      if constexpr (std::is_same_v<S, C>) out = g_row + start;
      else out = grad_buf;
      kernels.grad(s, t, n, k, exps, row_grad, out);
      if (k.need_ce && label >= start && label < start + n) out[label - start] -= label_step;
      store_chunk<S, C>(out, n, g_row + start);
    }
  }
}

// ---- dtype dispatch ----

template <class S, class T>
int64_t forward_for(const KDForwardArgs& args) {
  if constexpr (std::is_same_v<S, double>) return forward_impl<S, T, double>(args);
  else return forward_impl<S, T, float>(args);
}

template <class S, class T>
void backward_for(const KDBackwardArgs& args) {
  if constexpr (std::is_same_v<S, double>) backward_impl<S, T, double>(args);
  else backward_impl<S, T, float>(args);
}

}  // namespace

int64_t kd_forward(const KDForwardArgs& args) {
  if (args.student_dtype == DType::Float64) return forward_for<double, double>(args);
  return with_float_types(args.student_dtype, args.teacher_dtype, [&](auto s, auto t) {
    return forward_for<decltype(s), decltype(t)>(args);
  });
}

void kd_backward(const KDBackwardArgs& args) {
  if (args.student_dtype == DType::Float64) return backward_for<double, double>(args);
  with_float_types(args.student_dtype, args.teacher_dtype, [&](auto s, auto t) {
    backward_for<decltype(s), decltype(t)>(args);
  });
}

}  // namespace KDFAST_CPU_VARIANT
}  // namespace cpu
}  // namespace kdfast
