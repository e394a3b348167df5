// CPU kernels of the multi-teacher KD loss: the entry points of one instruction-set variant
// (multi_teacher_forward, multi_teacher_backward) and the chunked kernel behind the backward
// pass of every divergence and the forward pass of all but forward_kl, whose forward runs in
// multi_teacher_forward_kl_cpu.cpp. Compiled once per instruction-set variant like
// kd_loss_cpu.cpp (namespace kdfast::cpu::KDFAST_CPU_VARIANT); dispatch.cpp picks one at run
// time. Contract: types.h (MultiTeacherKDArgs) and rowmath.h (the per-row math, shared with
// the dense loss); the forward pass returns the number of rows with a label outside
// [0, vocab) that is not ignore_index (their statistics are NaN).
// Rows are split over OpenMP threads; each row is streamed in chunks of kChunk elements.
// Forward: one read of the student row and of every teacher row gives the student's
// statistics and, per teacher, its maximum, log-sum and (combine Sum with reverse_kl) the
// one-pass divergence sum. combine Mixture, and jsd / tvd, need normalised teacher
// distributions, so they sweep the row again (chunk by chunk; on a large vocabulary this
// second read comes from cache or memory). Backward: one more read of every row; the
// gradient row is written once, already multiplied by grad_output.
// No temporary holds more than one chunk per thread.
// The mixture (reverse_kl, jsd, tvd) enters through its log-probabilities, a log-sum-exp
// over the teachers per element (add_teacher_log_probs), so that tokens every teacher
// gives a vanishing probability keep their exact log p̄_i.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "convert.h"
#include "kernel_common.h"
#include "multi_teacher_common.h"
#include "kdfast/rowmath.h"
#include "kdfast/types.h"

#ifndef KDFAST_CPU_VARIANT
#error "KDFAST_CPU_VARIANT must name the instruction-set variant"
#endif

namespace kdfast {
namespace cpu {
namespace KDFAST_CPU_VARIANT {

using rowmath::Coefficients;
using rowmath::RowPartial;
using rowmath::RowStats;

namespace {

// Whether the forward pass finds D(p_m, q) in its first read (combine Sum, forward / reverse KL).
constexpr bool one_pass(Divergence d, Combine c) {
  return c == Combine::Sum && (d == Divergence::ForwardKL || d == Divergence::ReverseKL);
}

// ---- chunk math on compute-type buffers ----
// Logits enter as scaled differences d = h x - h max (rowmath.h, difference_scale), with
// κ = 1/(hT) and 1/h the scales of their exponentials at T and at 1.

// Student part of one chunk: with the running maximum max_s (times h: scaled_max) already
// raised to cover it, ds[i] = h s_i - scaled_max, e[i] = exp(ds κ); returns the chunk's sums
// in `chunk`.
template <class C, bool S1, bool SMOOTH>
void student_chunk(const C* s, int64_t n, C scaled_max, const Coefficients<C>& k, C* ds_out, C* e_out,
                   RowPartial<C>& chunk) {
  const C h = k.diff_scale, kappa = k.inv_scaled_t, inv_h = k.inv_diff_scale;
  C sum_t = 0, sum_1 = 0, centered = 0;
#pragma omp simd reduction(+ : sum_t, sum_1, centered)
  for (int64_t i = 0; i < n; ++i) {
    const C ds = rowmath::scaled_difference(s[i], h, scaled_max);
    const C e = rowmath::exp_c(ds * kappa);
    ds_out[i] = ds;
    e_out[i] = e;
    sum_t += e;
    if constexpr (S1) sum_1 += rowmath::exp_c(ds * inv_h);
    if constexpr (SMOOTH) centered += ds;
  }
  chunk.student_sum_T = sum_t;
  chunk.student_sum_1 = sum_1;
  chunk.student_centered_total = centered;
}

// Teacher part of one chunk (teacher maximum, times h, already raised to cover it): sum of
// exp(dt κ) and the one-pass weighted sum of the divergence D (h units, see RowPartial).
template <class C, Divergence D, bool WEIGHTED>
void teacher_chunk(const C* t, const C* ds, const C* es, int64_t n, C scaled_max, const Coefficients<C>& k,
                   C& sum_out, C& weighted_out) {
  const C h = k.diff_scale, kappa = k.inv_scaled_t;
  C sum = 0, weighted = 0;
#pragma omp simd reduction(+ : sum, weighted)
  for (int64_t i = 0; i < n; ++i) {
    const C dt = rowmath::scaled_difference(t[i], h, scaled_max);
    const C e = rowmath::exp_c(dt * kappa);
    sum += e;
    if constexpr (WEIGHTED && D == Divergence::ForwardKL) weighted += e > C(0) ? e * (dt - ds[i]) : C(0);
    if constexpr (WEIGHTED && D == Divergence::ReverseKL) weighted += es[i] > C(0) ? es[i] * (ds[i] - dt) : C(0);
  }
  sum_out = sum;
  weighted_out = weighted;
}

template <class C>
C chunk_max(const C* x, int64_t n) {
  C m = kNegInf<C>;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// Scaled differences ds and log q_i of one chunk from the row's student statistics.
template <class C>
void student_log_q(const C* s, int64_t n, C scaled_max, C log_sum_t, const Coefficients<C>& k, C* ds, C* log_q) {
  const C h = k.diff_scale, kappa = k.inv_scaled_t;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    ds[i] = rowmath::scaled_difference(s[i], h, scaled_max);
    log_q[i] = ds[i] * kappa - log_sum_t;
  }
}

// The mixture's log-probabilities in h units, y_i = log p̄_i / κ with p̄_i = Σ_m w_m p_mi,
// as a log-sum-exp over the teachers kept per element as (running maximum `top`, sum):
// teacher m adds y_mi = dt_mi + offset_m with offset_m = (log w_m - log Z_m)/κ. Each p_mi
// enters as exp of a difference, so a token every teacher gives a probability below the
// float range still has its exact (finite) log p̄_i.
template <class C>
void add_teacher_log_probs(const C* t, int64_t n, C scaled_max, C offset, const Coefficients<C>& k, bool first,
                           C* top, C* sum) {
  const C h = k.diff_scale, kappa = k.inv_scaled_t;
  if (first) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      top[i] = rowmath::scaled_difference(t[i], h, scaled_max) + offset;
      sum[i] = C(1);
    }
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const C y = rowmath::scaled_difference(t[i], h, scaled_max) + offset;
    const C new_top = y > top[i] ? y : top[i];
    const C shift = new_top == kNegInf<C> ? C(0) : new_top;  // both -inf: no inf - inf
    sum[i] = sum[i] * rowmath::exp_c((top[i] - shift) * kappa) + rowmath::exp_c((y - shift) * kappa);
    top[i] = new_top;
  }
}

// y_i = top_i + log(sum_i)/κ: the mixture's log-probabilities in h units (in place of top).
template <class C>
void finish_mixture_log_probs(int64_t n, const Coefficients<C>& k, C* top, const C* sum) {
  const C inv_kappa = static_cast<C>(1.0 / k.inv_scaled_t_d);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) top[i] = top[i] + rowmath::log_c(sum[i]) * inv_kappa;
}

// Second-sweep sums of D(p, q) over one chunk given log q (and the scaled differences ds),
// with p from teacher logits (`t` set: combine Sum, jsd / tvd) or from the mixture's
// log-probabilities y in h units (Mixture). reverse_kl (Mixture only) sums in h units:
// acc0 += q (ds - y), acc1 += q, so that D = κ acc0 - log Z_q acc1.
// The chunk's sums run in double. In float, the lane that holds a dominant term rounds away
// the small terms added to it: with one q near 0.93 (T = 0.7, 1271 logits), reverse_kl on the
// 4-lane baseline variant lost 1e-6 of Σ q and D was 3.2e-6 relative off the float64
// reference (2.9e-7 on 16 lanes); in double both are 5.9e-8, and jsd 6.2e-7 -> 1.3e-7, for
// about 4% more time on the multi-teacher jsd forward.
template <class C, Divergence D>
void sweep_terms(const C* t, const C* y, const C* ds, const C* log_q, int64_t n, C scaled_max, C log_sum,
                 const Coefficients<C>& coefficients, C& acc0, C& acc1) {
  const Coefficients<C> k = coefficients;
  const C h = k.diff_scale, kappa = k.inv_scaled_t;
  double sum0 = 0, sum1 = 0;
#pragma omp simd reduction(+ : sum0, sum1)
  for (int64_t i = 0; i < n; ++i) {
    C x0 = 0, x1 = 0;
    if constexpr (D == Divergence::ReverseKL) {
      const C q = rowmath::exp_c(log_q[i]);
      x0 = q > C(0) ? q * (ds[i] - y[i]) : C(0);
      x1 = q;
    } else {
      const C log_p = t != nullptr ? rowmath::scaled_difference(t[i], h, scaled_max) * kappa - log_sum : y[i] * kappa;
      if constexpr (D == Divergence::JSD) rowmath::jsd_terms(log_p, log_q[i], k, x0, x1);
      else rowmath::tvd_terms(log_p, log_q[i], x0, x1);
    }
    sum0 += x0;
    sum1 += x1;
  }
  acc0 += static_cast<C>(sum0);
  acc1 += static_cast<C>(sum1);
}

// D (double) and its aux value (rowmath::RowStats::aux) from the second-sweep sums.
template <class C, Divergence D>
double finish_sweep(C acc0, C acc1, C log_sum_q, const Coefficients<C>& k, C& aux) {
  RowStats<C> st{};
  double d = 0.0;
  if constexpr (D == Divergence::ReverseKL) {
    const double mean = static_cast<double>(acc0) / static_cast<double>(acc1);  // Σ q (ds - y) / Σ q
    d = mean * k.inv_scaled_t_d - static_cast<double>(log_sum_q);
    st.aux = static_cast<C>(mean - static_cast<double>(log_sum_q) / k.inv_scaled_t_d);  // D / κ
  } else if constexpr (D == Divergence::JSD) {
    d = static_cast<double>(rowmath::finish_jsd(acc0, acc1, k, st));
  } else if constexpr (D == Divergence::TVD) {
    d = static_cast<double>(rowmath::finish_tvd(acc0, acc1, st));
  }
  aux = st.aux;
  return d;
}

// Student part of the gradient of one chunk: out = ce_factor (r - eps/V) [+ kd_factor q for
// forward_kl, whose teacher part is -kd_factor p̄]; keeps ds, log q and q for the teacher part.
template <class C, bool CE, bool S1, bool ADD_Q>
void student_grad(const C* s, int64_t n, C scaled_max, C log_sum_t, C log_sum_1, const Coefficients<C>& k,
                  C ce_factor, C smooth, C kd_factor, C* ds_out, C* log_q_out, C* q_out, C* out) {
  const C h = k.diff_scale, kappa = k.inv_scaled_t, inv_h = k.inv_diff_scale;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const C ds = rowmath::scaled_difference(s[i], h, scaled_max);
    const C log_q = ds * kappa - log_sum_t;
    const C q = rowmath::exp_c(log_q);
    ds_out[i] = ds;
    log_q_out[i] = log_q;
    q_out[i] = q;
    C value = 0;
    if constexpr (CE) {
      const C r = S1 ? rowmath::exp_c(ds * inv_h - log_sum_1) : q;
      value += ce_factor * (r - smooth);
    }
    if constexpr (ADD_Q) value += kd_factor * q;
    out[i] = value;
  }
}

// out += dD/db terms for D(p, q), p from teacher logits (t set: combine Sum) or the mixture's
// log-probabilities y in h units (Mixture), with the row's factors g (rowmath::GradRow:
// kd_factor for jsd / tvd, rkl_a, rkl_b and rkl_c for reverse_kl).
template <class C, Divergence D>
void add_divergence_grad(const C* t, const C* y, const C* ds, const C* log_q, const C* q, int64_t n, C scaled_max,
                         C log_sum, const rowmath::GradRow<C>& g, const Coefficients<C>& coefficients, C* out) {
  const Coefficients<C> k = coefficients;
  const C h = k.diff_scale, kappa = k.inv_scaled_t;
  const C factor = g.kd_factor, a = g.rkl_a, b = g.rkl_b, c = g.rkl_c, aux = g.stats.aux;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const C dt = t != nullptr ? rowmath::scaled_difference(t[i], h, scaled_max) : y[i];
    if constexpr (D == Divergence::ReverseKL) {
      out[i] += rowmath::reverse_kl_grad(ds[i], dt, q[i], a, b, c);
    } else {
      const C log_p = t != nullptr ? dt * kappa - log_sum : dt * kappa;
      out[i] += factor * rowmath::divergence_grad<D>(log_p, log_q[i], q[i], aux, k);
    }
  }
}

// out -= factor p_i (forward_kl teacher part, per teacher for combine Sum).
template <class C>
void subtract_teacher_probs(const C* t, int64_t n, C scaled_max, C log_sum, const Coefficients<C>& k, C factor,
                            C* out) {
  const C h = k.diff_scale, kappa = k.inv_scaled_t;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    out[i] -= factor * rowmath::exp_c(rowmath::scaled_difference(t[i], h, scaled_max) * kappa - log_sum);
}

// The mixture's per-teacher offsets (log w_m - log Z_m)/κ in h units (-inf for a zero weight).
template <class C>
C mixture_offset(C weight, C teacher_log_sum, const Coefficients<C>& k) {
  const double log_w = weight > C(0) ? std::log(static_cast<double>(weight)) : -std::numeric_limits<double>::infinity();
  return static_cast<C>((log_w - static_cast<double>(teacher_log_sum)) / k.inv_scaled_t_d);
}

// ---- row drivers: storage dtypes S (student), T (teachers), compute type C ----

template <class S, class T, class C, Divergence D, Combine MODE>
int64_t forward_impl(const MultiTeacherKDArgs& args) {
  const Coefficients<C> k = rowmath::make_coefficients<C>(args.options, args.vocab);
  const int64_t rows = args.rows, vocab = args.vocab, num_teachers = args.num_teachers;
  const int64_t stats_width = kMultiTeacherRowStatsBase + kMultiTeacherStatsPerTeacher * num_teachers;
  const S* student = static_cast<const S*>(args.student);
  C* row_stats = static_cast<C*>(args.row_stats);
  const C h = k.diff_scale;
  const bool smooth = k.need_ce && k.label_smoothing > C(0);
  // The merge of per-teacher partials rebases the weighted sums only when they are kept.
  const Divergence merge_divergence = one_pass(D, MODE) ? D : Divergence::JSD;
  const bool need_sweep = k.need_kd && !one_pass(D, MODE);
  int64_t bad_labels = 0;

#pragma omp parallel num_threads(threads_for(args.num_threads, rows, vocab * (num_teachers + 1))) reduction(+ : bad_labels)
  {
    std::vector<RowPartial<C>> parts(static_cast<size_t>(num_teachers));
    std::vector<RowStats<C>> teacher_stats(static_cast<size_t>(num_teachers));
    std::vector<C> acc0(static_cast<size_t>(num_teachers)), acc1(static_cast<size_t>(num_teachers));
    std::vector<C> weights(static_cast<size_t>(num_teachers)), offsets(static_cast<size_t>(num_teachers));
    alignas(64) C student_buf[kChunk];
    alignas(64) C teacher_buf[kChunk];
    alignas(64) C ds_buf[kChunk];
    alignas(64) C es_buf[kChunk];
    alignas(64) C top_buf[kChunk];
    alignas(64) C sum_buf[kChunk];

#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      C* stats_out = row_stats + row * stats_width;
      if (!label_valid(args.labels, row, args.options.ignore_index)) {
        for (int64_t j = 0; j < stats_width; ++j) stats_out[j] = C(0);
        continue;
      }
      const int64_t label = args.labels ? args.labels[row] : -1;
      if (args.labels && (label < 0 || label >= vocab)) {
        ++bad_labels;
        for (int64_t j = 0; j < stats_width; ++j) stats_out[j] = kNaN<C>;
        continue;
      }
      const S* s_row = student + row * args.student_row_stride;
      auto teacher_row = [&](int64_t m) {
        return static_cast<const T*>(args.teachers[m]) + row * args.teacher_row_strides[m];
      };
      for (int64_t m = 0; m < num_teachers; ++m) {
        parts[m] = rowmath::empty_partial<C>();
        weights[m] = weight_of<C>(args, m, row);
      }
      RowPartial<C> student_part = rowmath::empty_partial<C>();

      // First read: student statistics, and per teacher its maximum, sum and weighted sum.
      // A maximum of -inf (every entry so far masked) shifts by 0: the entries stay -inf
      // (their exponentials 0, a smoothing total -inf) and NaN entries are kept.
      for (int64_t start = 0; start < vocab; start += kChunk) {
        const int64_t n = std::min(kChunk, vocab - start);
        const C* s = load_chunk<S, C>(s_row + start, n, student_buf);
        RowPartial<C> chunk = rowmath::empty_partial<C>();
        chunk.student_max = std::max(student_part.student_max, chunk_max(s, n));
        chunk.count = static_cast<C>(n);
        const C shift_s = (chunk.student_max == kNegInf<C> ? C(0) : chunk.student_max) * h;
        if (k.need_student_1) {
          if (smooth) student_chunk<C, true, true>(s, n, shift_s, k, ds_buf, es_buf, chunk);
          else student_chunk<C, true, false>(s, n, shift_s, k, ds_buf, es_buf, chunk);
        } else {
          if (smooth) student_chunk<C, false, true>(s, n, shift_s, k, ds_buf, es_buf, chunk);
          else student_chunk<C, false, false>(s, n, shift_s, k, ds_buf, es_buf, chunk);
        }
        if (k.need_kd) {
          for (int64_t m = 0; m < num_teachers; ++m) {
            const C* t = load_chunk<T, C>(teacher_row(m) + start, n, teacher_buf);
            RowPartial<C> teacher_part = chunk;
            teacher_part.teacher_max = std::max(parts[m].teacher_max, chunk_max(t, n));
            const C shift_t = (teacher_part.teacher_max == kNegInf<C> ? C(0) : teacher_part.teacher_max) * h;
            teacher_chunk<C, D, one_pass(D, MODE)>(t, ds_buf, es_buf, n, shift_t, k, teacher_part.teacher_sum,
                                                   teacher_part.weighted);
            rowmath::merge_partials(parts[m], teacher_part, k, merge_divergence);
          }
        }
        rowmath::merge_partials(student_part, chunk, k, merge_divergence);
      }
      double unused = 0.0;
      const RowStats<C> student_stats = rowmath::finish_stats(student_part, k, &unused);
      bool defined = rowmath::student_sums_defined(student_part.student_sum_T, student_part.student_sum_1, k);

      double divergence = 0.0;
      C mixture_aux = 0;
      if (k.need_kd) {
        for (int64_t m = 0; m < num_teachers; ++m) {
          double d_m = 0.0;
          teacher_stats[m] = rowmath::finish_stats(parts[m], k, &d_m);
          defined = defined && rowmath::sum_defined(parts[m].teacher_sum);
          // A zero weight drops the teacher's divergence (no 0 · inf); its NaN still counts (`defined`).
          if (one_pass(D, MODE) && weights[m] > C(0)) divergence += static_cast<double>(weights[m]) * d_m;
          offsets[m] = mixture_offset(weights[m], teacher_stats[m].teacher_log_sum, k);
          acc0[m] = acc1[m] = C(0);
        }
      }
      if (need_sweep && defined) {
        // Second read: divergence sums against normalised distributions.
        C mixture_acc0 = 0, mixture_acc1 = 0;
        const C student_shift = student_stats.student_max * h;
        for (int64_t start = 0; start < vocab; start += kChunk) {
          const int64_t n = std::min(kChunk, vocab - start);
          const C* s = load_chunk<S, C>(s_row + start, n, student_buf);
          student_log_q(s, n, student_shift, student_stats.student_log_sum_T, k, ds_buf, es_buf);
          for (int64_t m = 0; m < num_teachers; ++m) {
            const C* t = load_chunk<T, C>(teacher_row(m) + start, n, teacher_buf);
            const RowStats<C>& ts = teacher_stats[m];
            if constexpr (MODE == Combine::Sum) {
              sweep_terms<C, D>(t, nullptr, ds_buf, es_buf, n, ts.teacher_max * h, ts.teacher_log_sum, k, acc0[m],
                                acc1[m]);
            } else {
              add_teacher_log_probs(t, n, ts.teacher_max * h, offsets[m], k, m == 0, top_buf, sum_buf);
            }
          }
          if constexpr (MODE == Combine::Mixture) {
            finish_mixture_log_probs(n, k, top_buf, sum_buf);
            sweep_terms<C, D>(nullptr, top_buf, ds_buf, es_buf, n, C(0), C(0), k, mixture_acc0, mixture_acc1);
          }
        }
        if constexpr (MODE == Combine::Sum) {
          for (int64_t m = 0; m < num_teachers; ++m) {
            C aux = 0;
            const double d_m = finish_sweep<C, D>(acc0[m], acc1[m], student_stats.student_log_sum_T, k, aux);
            if (weights[m] > C(0)) divergence += static_cast<double>(weights[m]) * d_m;
            teacher_stats[m].aux = aux;
          }
        } else {
          divergence = finish_sweep<C, D>(mixture_acc0, mixture_acc1, student_stats.student_log_sum_T, k, mixture_aux);
        }
      }

      double ce = 0.0;
      if (k.need_ce) {
        const double label_logit =
            static_cast<double>(load_one<S, C>(s_row + label)) - static_cast<double>(student_stats.student_max);
        const double centered = static_cast<double>(student_part.student_centered_total) / static_cast<double>(h);
        ce = rowmath::cross_entropy(label_logit, static_cast<double>(student_stats.student_log_sum_1), centered, vocab,
                                    k.label_smoothing_d);
      }
      // NaN in, NaN out (rowmath::row_sums_defined): every teacher counts, whatever its weight.
      const double row_loss = defined ? rowmath::combine_loss(ce, divergence, k) : kNaN<double>;
      stats_out[0] = student_stats.student_max;
      stats_out[1] = student_stats.student_log_sum_T;
      stats_out[2] = student_stats.student_log_sum_1;
      stats_out[3] = mixture_aux;
      stats_out[4] = static_cast<C>(row_loss);
      stats_out[5] = C(0);
      for (int64_t m = 0; m < num_teachers; ++m) {
        C* teacher_out = stats_out + kMultiTeacherRowStatsBase + kMultiTeacherStatsPerTeacher * m;
        teacher_out[0] = k.need_kd ? teacher_stats[m].teacher_max : C(0);
        teacher_out[1] = k.need_kd ? teacher_stats[m].teacher_log_sum : C(0);
        teacher_out[2] = k.need_kd && MODE == Combine::Sum ? teacher_stats[m].aux : C(0);
      }
    }
  }

  reduce_row_losses(row_stats, stats_width, 4, rows, args.labels, args.options, static_cast<C*>(args.loss),
                    static_cast<C*>(args.valid_rows));
  return bad_labels;
}

template <class S, class T, class C, Divergence D, Combine MODE>
void backward_impl(const MultiTeacherKDArgs& args) {
  const Coefficients<C> k = rowmath::make_coefficients<C>(args.options, args.vocab);
  const int64_t rows = args.rows, vocab = args.vocab, num_teachers = args.num_teachers;
  const int64_t stats_width = kMultiTeacherRowStatsBase + kMultiTeacherStatsPerTeacher * num_teachers;
  const S* student = static_cast<const S*>(args.student);
  const C* row_stats = static_cast<const C*>(args.row_stats);
  const C* grad_output = static_cast<const C*>(args.grad_output);
  S* grad_student = static_cast<S*>(args.grad_student);
  const C h = k.diff_scale;
  constexpr bool kForwardKL = D == Divergence::ForwardKL;

  double reduction_scale = 1.0;
  if (args.options.reduction == Reduction::Mean) {
    const double valid = static_cast<double>(*static_cast<const C*>(args.valid_rows));
    reduction_scale = valid > 0 ? 1.0 / valid : 0.0;
  } else if (args.options.reduction == Reduction::BatchMean) {
    reduction_scale = rows > 0 ? 1.0 / static_cast<double>(rows) : 0.0;
  }

#pragma omp parallel num_threads(threads_for(args.num_threads, rows, vocab * (num_teachers + 1)))
  {
    alignas(64) C student_buf[kChunk];
    alignas(64) C teacher_buf[kChunk];
    alignas(64) C ds_buf[kChunk];
    alignas(64) C log_q_buf[kChunk];
    alignas(64) C q_buf[kChunk];
    alignas(64) C top_buf[kChunk];
    alignas(64) C sum_buf[kChunk];
    alignas(64) C grad_buf[kChunk];
    std::vector<rowmath::GradRow<C>> teacher_rows(static_cast<size_t>(num_teachers));

#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      S* g_row = grad_student + row * vocab;
      if (!label_valid(args.labels, row, args.options.ignore_index)) {
        std::memset(static_cast<void*>(g_row), 0, sizeof(S) * vocab);
        continue;
      }
      const C* st = row_stats + row * stats_width;
      if (st[4] != st[4]) {  // a NaN row loss (NaN input, or a bad label): a NaN gradient row
        fill_nan(g_row, vocab);
        continue;
      }
      const double g = static_cast<double>(grad_output[row * args.grad_output_stride]) * reduction_scale;
      const C max_s = st[0] * h, log_sum_t = st[1], log_sum_1 = st[2], mixture_aux = st[3];
      // The row's factors: per teacher (combine Sum: its weight folded in) or for the mixture.
      const rowmath::GradRow<C> row_factors =
          rowmath::make_grad_row(g, k, RowStats<C>{C(0), C(0), st[0], log_sum_t, log_sum_1, mixture_aux}, vocab);
      for (int64_t m = 0; m < num_teachers && k.need_kd; ++m) {
        const C* ts = st + kMultiTeacherRowStatsBase + kMultiTeacherStatsPerTeacher * m;
        const double w = MODE == Combine::Sum ? static_cast<double>(weight_of<C>(args, m, row)) : 1.0;
        teacher_rows[m] = rowmath::make_grad_row(g * w, k, RowStats<C>{ts[0], ts[1], st[0], log_sum_t, log_sum_1, ts[2]},
                                                 vocab);
      }
      const C ce_factor = row_factors.ce_factor, kd_factor = row_factors.kd_factor, smooth = row_factors.smooth;
      const int64_t label = args.labels ? args.labels[row] : -1;
      const S* s_row = student + row * args.student_row_stride;

      for (int64_t start = 0; start < vocab; start += kChunk) {
        const int64_t n = std::min(kChunk, vocab - start);
        const C* s = load_chunk<S, C>(s_row + start, n, student_buf);
        C* out;
        if constexpr (std::is_same_v<S, C>) out = g_row + start;
        else out = grad_buf;
        const bool add_q = kForwardKL && k.need_kd;
#define KDFAST_STUDENT_GRAD(CE_, S1_, ADD_Q_)                                                                       \
  student_grad<C, CE_, S1_, ADD_Q_>(s, n, max_s, log_sum_t, log_sum_1, k, ce_factor, smooth, kd_factor, ds_buf, \
                                    log_q_buf, q_buf, out)
        if (k.need_ce) {
          if (k.need_student_1) {
            if (add_q) KDFAST_STUDENT_GRAD(true, true, true);
            else KDFAST_STUDENT_GRAD(true, true, false);
          } else {
            if (add_q) KDFAST_STUDENT_GRAD(true, false, true);
            else KDFAST_STUDENT_GRAD(true, false, false);
          }
        } else if (add_q) {
          KDFAST_STUDENT_GRAD(false, false, true);
        } else {
          KDFAST_STUDENT_GRAD(false, false, false);
        }
#undef KDFAST_STUDENT_GRAD
        if (k.need_kd) {
          for (int64_t m = 0; m < num_teachers; ++m) {
            const T* t_row = static_cast<const T*>(args.teachers[m]) + row * args.teacher_row_strides[m];
            const C* t = load_chunk<T, C>(t_row + start, n, teacher_buf);
            const C* ts = st + kMultiTeacherRowStatsBase + kMultiTeacherStatsPerTeacher * m;
            const C w = weight_of<C>(args, m, row);
            if constexpr (kForwardKL) {
              // Sum and mixture alike: kd_factor (q - sum_m w_m p_m).
              subtract_teacher_probs(t, n, ts[0] * h, ts[1], k, kd_factor * w, out);
            } else if constexpr (MODE == Combine::Sum) {
              if (!(w > C(0))) continue;  // a zero weight: no gradient (and no 0 · inf)
              add_divergence_grad<C, D>(t, nullptr, ds_buf, log_q_buf, q_buf, n, ts[0] * h, ts[1], teacher_rows[m], k,
                                        out);
            } else {
              add_teacher_log_probs(t, n, ts[0] * h, mixture_offset(w, ts[1], k), k, m == 0, top_buf, sum_buf);
            }
          }
          if constexpr (!kForwardKL && MODE == Combine::Mixture) {
            finish_mixture_log_probs(n, k, top_buf, sum_buf);
            add_divergence_grad<C, D>(nullptr, top_buf, ds_buf, log_q_buf, q_buf, n, C(0), C(0), row_factors, k, out);
          }
        }
        if (k.need_ce && label >= start && label < start + n) out[label - start] -= row_factors.label_step;
        store_chunk<S, C>(out, n, g_row + start);
      }
    }
  }
}

// ---- divergence / combine / dtype dispatch ----

template <class S, class T, class C, class Fn>
auto with_mode(const MultiTeacherKDArgs& args, Fn&& fn) {
  auto with_combine = [&](auto divergence_tag) {
    constexpr Divergence D = decltype(divergence_tag)::value;
    if (args.combine == Combine::Mixture)
      return fn(std::integral_constant<Divergence, D>{}, std::integral_constant<Combine, Combine::Mixture>{});
    return fn(std::integral_constant<Divergence, D>{}, std::integral_constant<Combine, Combine::Sum>{});
  };
  switch (args.options.divergence) {
    case Divergence::ForwardKL: return with_combine(std::integral_constant<Divergence, Divergence::ForwardKL>{});
    case Divergence::ReverseKL: return with_combine(std::integral_constant<Divergence, Divergence::ReverseKL>{});
    case Divergence::JSD: return with_combine(std::integral_constant<Divergence, Divergence::JSD>{});
    case Divergence::TVD: break;
  }
  return with_combine(std::integral_constant<Divergence, Divergence::TVD>{});
}

template <class S, class T>
int64_t forward_for(const MultiTeacherKDArgs& args) {
  using C = std::conditional_t<std::is_same_v<S, double>, double, float>;
  return with_mode<S, T, C>(args, [&](auto d, auto c) {
    return forward_impl<S, T, C, decltype(d)::value, decltype(c)::value>(args);
  });
}

template <class S, class T>
void backward_for(const MultiTeacherKDArgs& args) {
  using C = std::conditional_t<std::is_same_v<S, double>, double, float>;
  with_mode<S, T, C>(args, [&](auto d, auto c) {
    backward_impl<S, T, C, decltype(d)::value, decltype(c)::value>(args);
    return 0;
  });
}

}  // namespace

int64_t multi_teacher_forward(const MultiTeacherKDArgs& args) {
  if (args.options.divergence == Divergence::ForwardKL) return multi_teacher_forward_kl(args);
  if (args.student_dtype == DType::Float64) return forward_for<double, double>(args);
  return with_float_types(args.student_dtype, args.teacher_dtype, [&](auto s, auto t) {
    return forward_for<decltype(s), decltype(t)>(args);
  });
}

void multi_teacher_backward(const MultiTeacherKDArgs& args) {
  if (args.student_dtype == DType::Float64) return backward_for<double, double>(args);
  with_float_types(args.student_dtype, args.teacher_dtype, [&](auto s, auto t) {
    backward_for<decltype(s), decltype(t)>(args);
    return 0;
  });
}

}  // namespace KDFAST_CPU_VARIANT
}  // namespace cpu
}  // namespace kdfast
