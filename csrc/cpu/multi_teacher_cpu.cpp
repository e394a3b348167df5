// CPU kernels of the multi-teacher KD loss (forward statistics + loss, backward gradient).
// Compiled once per instruction-set variant like kd_loss_cpu.cpp (namespace
// kdfast::cpu::KDFAST_CPU_VARIANT); dispatch.cpp picks one at run time. Contract: types.h
// (MultiTeacherKDArgs) and rowmath.h (the per-row math, shared with the dense loss).
// Rows are split over OpenMP threads. forward_kl (either combine mode) has its own forward,
// `forward_kl_impl` below: whole-row buffers, each input read from memory and exponentiated
// once (explicit AVX2 lanes where the variant has them, lanes.h), and the gradient written
// in the same pass when asked for. The other divergences
// stream each row in chunks of kChunk elements.
// Forward: one read of the student row and of every teacher row gives the student's
// statistics and, per teacher, its maximum, log-sum and (combine Sum with forward_kl or
// reverse_kl) the one-pass divergence sum. combine Mixture, and jsd / tvd, need normalised
// teacher distributions, so they sweep the row again (chunk by chunk; on a large
// vocabulary this second read comes from cache or memory). Backward: one more read of
// every row; the gradient row is written once, already multiplied by grad_output.
// No temporary holds more than one chunk (forward_kl: six rows) per thread.
// The mixture distribution is formed as p̄_i = Σ_m w_m p_mi in the compute type, so a
// token every teacher gives probability below ~1e-38 (float32) has p̄_i = 0.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

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
using rowmath::RowPartial;
using rowmath::RowStats;

namespace {

constexpr int64_t kChunk = 512;

// Whether the forward pass finds D(p_m, q) in its first read (combine Sum, forward / reverse KL).
constexpr bool one_pass(Divergence d, Combine c) {
  return c == Combine::Sum && (d == Divergence::ForwardKL || d == Divergence::ReverseKL);
}

// ---- chunk math on compute-type buffers ----

// Student part of one chunk: with the running maximum max_s already raised to cover it,
// ds[i] = s_i - max_s, e[i] = exp(ds/T); returns the chunk's sums in `chunk`.
template <class C, bool S1, bool SMOOTH>
void student_chunk(const C* s, int64_t n, C max_s, C inv_t, C* ds_out, C* e_out, RowPartial<C>& chunk) {
  C sum_t = 0, sum_1 = 0, centered = 0;
#pragma omp simd reduction(+ : sum_t, sum_1, centered)
  for (int64_t i = 0; i < n; ++i) {
    const C ds = s[i] - max_s;
    const C e = rowmath::exp_c(ds * inv_t);
    ds_out[i] = ds;
    e_out[i] = e;
    sum_t += e;
    if constexpr (S1) sum_1 += rowmath::exp_c(ds);
    if constexpr (SMOOTH) centered += ds;
  }
  chunk.student_sum_T = sum_t;
  chunk.student_sum_1 = sum_1;
  chunk.student_centered_total = centered;
}

// Teacher part of one chunk (teacher maximum max_t already raised to cover it): sum of
// exp((t - max_t)/T) and the one-pass weighted sum of the divergence D (see RowPartial).
template <class C, Divergence D, bool WEIGHTED>
void teacher_chunk(const C* t, const C* ds, const C* es, int64_t n, C max_t, C inv_t, C& sum_out, C& weighted_out) {
  C sum = 0, weighted = 0;
#pragma omp simd reduction(+ : sum, weighted)
  for (int64_t i = 0; i < n; ++i) {
    const C dt = t[i] - max_t;
    const C e = rowmath::exp_c(dt * inv_t);
    sum += e;
    if constexpr (WEIGHTED && D == Divergence::ForwardKL) weighted += e > C(0) ? e * ((dt - ds[i]) * inv_t) : C(0);
    if constexpr (WEIGHTED && D == Divergence::ReverseKL)
      weighted += es[i] > C(0) ? es[i] * ((ds[i] - dt) * inv_t) : C(0);
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

// log q_i of one chunk from the row's student statistics.
template <class C>
void student_log_q(const C* s, int64_t n, C max_s, C log_sum_t, C inv_t, C* log_q) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) log_q[i] = (s[i] - max_s) * inv_t - log_sum_t;
}

// mixture[i] (+)= w exp(log p_i) for one teacher chunk.
template <class C>
void add_teacher_probs(const C* t, int64_t n, C max_t, C log_sum, C inv_t, C w, bool first, C* mixture) {
  if (first) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) mixture[i] = w * rowmath::exp_c((t[i] - max_t) * inv_t - log_sum);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) mixture[i] += w * rowmath::exp_c((t[i] - max_t) * inv_t - log_sum);
  }
}

// Second-sweep sums of D(p, q) over one chunk given log p (from teacher logits when
// `t` is set, else log of the mixture probabilities `pbar`) and log q.
template <class C, Divergence D>
void sweep_terms(const C* t, const C* pbar, const C* log_q, int64_t n, C max_t, C log_sum, C inv_t,
                 const Coefficients<C>& coefficients, C& acc0, C& acc1) {
  const Coefficients<C> k = coefficients;
  C sum0 = 0, sum1 = 0;
#pragma omp simd reduction(+ : sum0, sum1)
  for (int64_t i = 0; i < n; ++i) {
    C log_p, p;
    if (t != nullptr) {
      log_p = (t[i] - max_t) * inv_t - log_sum;
      p = rowmath::exp_c(log_p);
    } else {
      p = pbar[i];
      log_p = rowmath::log_c(p);
    }
    C x0 = 0, x1 = 0;
    if constexpr (D == Divergence::ForwardKL) {
      x0 = p > C(0) ? p * (log_p - log_q[i]) : C(0);
    } else if constexpr (D == Divergence::ReverseKL) {
      const C q = rowmath::exp_c(log_q[i]);
      x0 = q > C(0) ? q * (log_q[i] - log_p) : C(0);
    } else if constexpr (D == Divergence::JSD) {
      rowmath::jsd_terms(log_p, log_q[i], k, x0, x1);
    } else {
      rowmath::tvd_terms(log_p, log_q[i], x0, x1);
    }
    sum0 += x0;
    sum1 += x1;
  }
  acc0 += sum0;
  acc1 += sum1;
}

// D and its aux value (rowmath::RowStats::aux) from the second-sweep sums.
template <class C, Divergence D>
C finish_sweep(C acc0, C acc1, const Coefficients<C>& k, C& aux) {
  RowStats<C> st{};
  C d;
  if constexpr (D == Divergence::ForwardKL) {
    d = acc0;
    st.aux = C(0);
  } else if constexpr (D == Divergence::ReverseKL) {
    d = acc0;
    st.aux = acc0;
  } else if constexpr (D == Divergence::JSD) {
    d = rowmath::finish_jsd(acc0, acc1, k, st);
  } else {
    d = rowmath::finish_tvd(acc0, acc1, st);
  }
  aux = st.aux;
  return d;
}

// Student part of the gradient of one chunk: out = ce_factor (r - eps/V) [+ kd_factor q for
// forward_kl, whose teacher part is -kd_factor p̄]; keeps log q and q for the teacher part.
template <class C, bool CE, bool S1, bool ADD_Q>
void student_grad(const C* s, int64_t n, C max_s, C log_sum_t, C log_sum_1, C inv_t, C ce_factor, C smooth,
                  C kd_factor, C* log_q_out, C* q_out, C* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const C ds = s[i] - max_s;
    const C log_q = ds * inv_t - log_sum_t;
    const C q = rowmath::exp_c(log_q);
    log_q_out[i] = log_q;
    q_out[i] = q;
    C value = 0;
    if constexpr (CE) {
      const C r = S1 ? rowmath::exp_c(ds - log_sum_1) : q;
      value += ce_factor * (r - smooth);
    }
    if constexpr (ADD_Q) value += kd_factor * q;
    out[i] = value;
  }
}

// out += factor dD/db for D(p, q) with p from teacher logits (t set) or the mixture pbar.
template <class C, Divergence D>
void add_divergence_grad(const C* t, const C* pbar, const C* log_q, const C* q, int64_t n, C max_t, C log_sum,
                         C inv_t, C aux, C factor, const Coefficients<C>& coefficients, C* out) {
  const Coefficients<C> k = coefficients;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const C log_p = t != nullptr ? (t[i] - max_t) * inv_t - log_sum : rowmath::log_c(pbar[i]);
    out[i] += factor * rowmath::divergence_grad<D>(log_p, log_q[i], q[i], aux, k);
  }
}

// out -= factor p_i (forward_kl teacher part, per teacher for combine Sum).
template <class C>
void subtract_teacher_probs(const C* t, int64_t n, C max_t, C log_sum, C inv_t, C factor, C* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] -= factor * rowmath::exp_c((t[i] - max_t) * inv_t - log_sum);
}

// ---- row drivers: storage dtypes S (student), T (teachers), compute type C ----

template <class C>
C weight_of(const MultiTeacherKDArgs& args, int64_t m, int64_t row) {
  return static_cast<const C*>(args.weights)[m * args.weight_teacher_stride + row * args.weight_row_stride];
}

template <class S, class T, class C, Divergence D, Combine MODE>
int64_t forward_impl(const MultiTeacherKDArgs& args) {
  const Coefficients<C> k = rowmath::make_coefficients<C>(args.options);
  const int64_t rows = args.rows, vocab = args.vocab, num_teachers = args.num_teachers;
  const int64_t stats_width = kMultiTeacherRowStatsBase + kMultiTeacherStatsPerTeacher * num_teachers;
  const S* student = static_cast<const S*>(args.student);
  C* row_stats = static_cast<C*>(args.row_stats);
  const C inv_t = k.inv_temperature;
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
    std::vector<C> weights(static_cast<size_t>(num_teachers));
    alignas(64) C student_buf[kChunk];
    alignas(64) C teacher_buf[kChunk];
    alignas(64) C ds_buf[kChunk];
    alignas(64) C es_buf[kChunk];

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
        for (int64_t j = 0; j < stats_width; ++j) stats_out[j] = std::numeric_limits<C>::quiet_NaN();
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
      for (int64_t start = 0; start < vocab; start += kChunk) {
        const int64_t n = std::min(kChunk, vocab - start);
        const C* s = load_chunk<S, C>(s_row + start, n, student_buf);
        RowPartial<C> chunk = rowmath::empty_partial<C>();
        chunk.student_max = std::max(student_part.student_max, chunk_max(s, n));
        chunk.count = static_cast<C>(n);
        if (chunk.student_max != kNegInf<C>) {
          if (k.need_student_1) {
            if (smooth) student_chunk<C, true, true>(s, n, chunk.student_max, inv_t, ds_buf, es_buf, chunk);
            else student_chunk<C, true, false>(s, n, chunk.student_max, inv_t, ds_buf, es_buf, chunk);
          } else {
            if (smooth) student_chunk<C, false, true>(s, n, chunk.student_max, inv_t, ds_buf, es_buf, chunk);
            else student_chunk<C, false, false>(s, n, chunk.student_max, inv_t, ds_buf, es_buf, chunk);
          }
        } else {
          std::fill(ds_buf, ds_buf + n, kNegInf<C>);
          std::fill(es_buf, es_buf + n, C(0));
        }
        if (k.need_kd) {
          for (int64_t m = 0; m < num_teachers; ++m) {
            const C* t = load_chunk<T, C>(teacher_row(m) + start, n, teacher_buf);
            RowPartial<C> teacher_part = chunk;
            teacher_part.teacher_max = std::max(parts[m].teacher_max, chunk_max(t, n));
            if (teacher_part.teacher_max != kNegInf<C>) {
              teacher_chunk<C, D, one_pass(D, MODE)>(t, ds_buf, es_buf, n, teacher_part.teacher_max, inv_t,
                                                     teacher_part.teacher_sum, teacher_part.weighted);
            }
            rowmath::merge_partials(parts[m], teacher_part, inv_t, merge_divergence);
          }
        }
        rowmath::merge_partials(student_part, chunk, inv_t, merge_divergence);
      }
      C unused = 0;
      const RowStats<C> student_stats = rowmath::finish_stats(student_part, k, &unused);

      C divergence = 0, mixture_aux = 0;
      if (k.need_kd) {
        for (int64_t m = 0; m < num_teachers; ++m) {
          C d_m = 0;
          teacher_stats[m] = rowmath::finish_stats(parts[m], k, &d_m);
          if constexpr (one_pass(D, MODE)) divergence += weights[m] * d_m;
          acc0[m] = acc1[m] = C(0);
        }
      }
      if (need_sweep) {
        // Second read: divergence sums against normalised distributions.
        C mixture_acc0 = 0, mixture_acc1 = 0;
        for (int64_t start = 0; start < vocab; start += kChunk) {
          const int64_t n = std::min(kChunk, vocab - start);
          const C* s = load_chunk<S, C>(s_row + start, n, student_buf);
          student_log_q(s, n, student_stats.student_max, student_stats.student_log_sum_T, inv_t, ds_buf);
          for (int64_t m = 0; m < num_teachers; ++m) {
            const C* t = load_chunk<T, C>(teacher_row(m) + start, n, teacher_buf);
            const RowStats<C>& ts = teacher_stats[m];
            if constexpr (MODE == Combine::Sum) {
              sweep_terms<C, D>(t, nullptr, ds_buf, n, ts.teacher_max, ts.teacher_log_sum, inv_t, k, acc0[m], acc1[m]);
            } else {
              add_teacher_probs(t, n, ts.teacher_max, ts.teacher_log_sum, inv_t, weights[m], m == 0, es_buf);
            }
          }
          if constexpr (MODE == Combine::Mixture) {
            sweep_terms<C, D>(nullptr, es_buf, ds_buf, n, C(0), C(0), inv_t, k, mixture_acc0, mixture_acc1);
          }
        }
        if constexpr (MODE == Combine::Sum) {
          for (int64_t m = 0; m < num_teachers; ++m) {
            C aux = 0;
            divergence += weights[m] * finish_sweep<C, D>(acc0[m], acc1[m], k, aux);
            teacher_stats[m].aux = aux;
          }
        } else {
          divergence = finish_sweep<C, D>(mixture_acc0, mixture_acc1, k, mixture_aux);
        }
      }

      C ce = 0;
      if (k.need_ce) {
        const C label_logit = load_one<S, C>(s_row + label) - student_stats.student_max;
        ce = rowmath::cross_entropy(label_logit, student_stats.student_log_sum_1, student_part.student_centered_total,
                                    vocab, k.label_smoothing);
      }
      stats_out[0] = student_stats.student_max;
      stats_out[1] = student_stats.student_log_sum_T;
      stats_out[2] = student_stats.student_log_sum_1;
      stats_out[3] = mixture_aux;
      stats_out[4] = rowmath::combine_loss(ce, divergence, k);
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
  const Coefficients<C> k = rowmath::make_coefficients<C>(args.options);
  const int64_t rows = args.rows, vocab = args.vocab, num_teachers = args.num_teachers;
  const int64_t stats_width = kMultiTeacherRowStatsBase + kMultiTeacherStatsPerTeacher * num_teachers;
  const S* student = static_cast<const S*>(args.student);
  const C* row_stats = static_cast<const C*>(args.row_stats);
  const C* grad_output = static_cast<const C*>(args.grad_output);
  S* grad_student = static_cast<S*>(args.grad_student);
  const C inv_t = k.inv_temperature;
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
    alignas(64) C log_q_buf[kChunk];
    alignas(64) C q_buf[kChunk];
    alignas(64) C mixture_buf[kChunk];
    alignas(64) C grad_buf[kChunk];

#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      S* g_row = grad_student + row * vocab;
      if (!label_valid(args.labels, row, args.options.ignore_index)) {
        std::memset(static_cast<void*>(g_row), 0, sizeof(S) * vocab);
        continue;
      }
      const C g = static_cast<C>(grad_output[row * args.grad_output_stride] * reduction_scale);
      const C* st = row_stats + row * stats_width;
      const C max_s = st[0], log_sum_t = st[1], log_sum_1 = st[2], mixture_aux = st[3];
      const C ce_factor = g * k.alpha;
      const C kd_factor = g * (C(1) - k.alpha) * k.divergence_scale * inv_t;
      const C smooth = k.label_smoothing / static_cast<C>(vocab);
      const int64_t label = args.labels ? args.labels[row] : -1;
      const C label_step = g * k.alpha * (C(1) - k.label_smoothing);
      const S* s_row = student + row * args.student_row_stride;

      for (int64_t start = 0; start < vocab; start += kChunk) {
        const int64_t n = std::min(kChunk, vocab - start);
        const C* s = load_chunk<S, C>(s_row + start, n, student_buf);
        C* out;
        if constexpr (std::is_same_v<S, C>) out = g_row + start;
        else out = grad_buf;
        const bool add_q = kForwardKL && k.need_kd;
        if (k.need_ce) {
          if (k.need_student_1) {
            if (add_q) student_grad<C, true, true, true>(s, n, max_s, log_sum_t, log_sum_1, inv_t, ce_factor, smooth, kd_factor, log_q_buf, q_buf, out);
            else student_grad<C, true, true, false>(s, n, max_s, log_sum_t, log_sum_1, inv_t, ce_factor, smooth, kd_factor, log_q_buf, q_buf, out);
          } else {
            if (add_q) student_grad<C, true, false, true>(s, n, max_s, log_sum_t, log_sum_1, inv_t, ce_factor, smooth, kd_factor, log_q_buf, q_buf, out);
            else student_grad<C, true, false, false>(s, n, max_s, log_sum_t, log_sum_1, inv_t, ce_factor, smooth, kd_factor, log_q_buf, q_buf, out);
          }
        } else if (add_q) {
          student_grad<C, false, false, true>(s, n, max_s, log_sum_t, log_sum_1, inv_t, ce_factor, smooth, kd_factor, log_q_buf, q_buf, out);
        } else {
          student_grad<C, false, false, false>(s, n, max_s, log_sum_t, log_sum_1, inv_t, ce_factor, smooth, kd_factor, log_q_buf, q_buf, out);
        }
        if (k.need_kd) {
          for (int64_t m = 0; m < num_teachers; ++m) {
            const T* t_row = static_cast<const T*>(args.teachers[m]) + row * args.teacher_row_strides[m];
            const C* t = load_chunk<T, C>(t_row + start, n, teacher_buf);
            const C* ts = st + kMultiTeacherRowStatsBase + kMultiTeacherStatsPerTeacher * m;
            const C w = weight_of<C>(args, m, row);
            if constexpr (kForwardKL) {
              // Sum and mixture alike: kd_factor (q - sum_m w_m p_m).
              subtract_teacher_probs(t, n, ts[0], ts[1], inv_t, kd_factor * w, out);
            } else if constexpr (MODE == Combine::Sum) {
              add_divergence_grad<C, D>(t, nullptr, log_q_buf, q_buf, n, ts[0], ts[1], inv_t, ts[2], kd_factor * w, k, out);
            } else {
              add_teacher_probs(t, n, ts[0], ts[1], inv_t, w, m == 0, mixture_buf);
            }
          }
          if constexpr (!kForwardKL && MODE == Combine::Mixture) {
            add_divergence_grad<C, D>(nullptr, mixture_buf, log_q_buf, q_buf, n, C(0), C(0), inv_t, mixture_aux,
                                      kd_factor, k, out);
          }
        }
        if (k.need_ce && label >= start && label < start + n) out[label - start] -= label_step;
        store_chunk<S, C>(out, n, g_row + start);
      }
    }
  }
}

// ---- forward_kl: loss and (optionally) the gradient in one pass per input row ----
//
// forward_kl needs only sums of exponentials and, for the gradient, q - p̄ with
// p̄ = Σ_m w_m p_m (combine Sum and Mixture alike). Per row, with whole-row buffers in the
// compute type (es: exp((s - s_max)/T), mixture: p̄, scratch: one teacher's exponentials):
//   1. student: a max pass, then one exp pass filling es (and the sums for CE);
//   2. each teacher: an exp pass giving Z_m = Σ e and A_m = Σ e (t - t_max) into a scratch
//      row; the same sweep adds the previous teacher's (w / Z) e to p̄ and takes the
//      maximum of the next teacher's row, which is that row's one read from memory
//      (float32 / float64 teachers; converted ones take a separate max pass);
//   3. one pass over the row adds the last teacher to p̄ and gives the gradient (when asked
//      for) and B = Σ p̄ (s - s_max) (Mixture: also Σ p̄ log p̄).
// With Σ_i p_mi log p_mi = A_m / (T Z_m) - log Z_m and Σ_i p̄_i log q_i = B/T - log Z_s:
//   Sum:     D = Σ_m w_m (A_m / (T Z_m) - log Z_m) - B/T + log Z_s
//   Mixture: D = Σ_i p̄_i log p̄_i - B/T + log Z_s.
// Each teacher row is read from memory once and exponentiated once; the student row is
// exponentiated once (twice with CE at a temperature other than 1, 2, 4). The gradient is
// written for grad_output = 1 (reductions applied) into args.grad_student, a contiguous
// [rows, vocab] buffer in the compute type; the caller scales it by grad_output.
// The exp passes (1, 2) are written once over lanes (lanes.h): 8 float lanes with AVX2 and
// a table-based exp(x/T), plain float / double elsewhere. Being bound by their exps (and
// not by memory: the rows stream at a fraction of the bandwidth), they are where the time
// goes; see lanes.h for the exp and the note before student_exp_row for its cutoff test.

template <class C>
C row_max(const C* x, int64_t n) {
  C m = kNegInf<C>;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// The exp passes below run twice only when needed: float rows on AVX2 lanes first try the
// exp without its cutoff test (and the teacher pass without clamping -inf differences),
// tracking the row's smallest difference; where that is below the cutoff (a masked -inf
// logit, or a spread beyond 87 T) the exps and sums are redone with the tests. Rows in range
// give bitwise the same result either way.

// Student exp pass: es[i] = exp((s_i - shift)/T); sums of es, of exp(s_i - shift) and of s_i - shift.
// NEXT: also the maximum of the next row to process (`next`, a teacher row), so its first
// read from memory overlaps this pass's arithmetic. exp_t, exp_1: exp(x/T) and exp(x).
// Returns false when CHECKED is false and some s_i - shift is below a cutoff.
template <class C, int S1, bool SMOOTH, bool NEXT, bool CHECKED>
bool student_exp_row(const C* s, int64_t n, C shift, const ExpLanes<C>& exp_t_in, const ExpLanes<C>& exp_1_in, C* es,
                     C& sum_t, C& sum_1, C& centered, const C* next, C& next_max) {
  // Local copies: stores through es cannot alias them, so the constants stay in registers.
  const ExpLanes<C> exp_t = exp_t_in, exp_1 = exp_1_in;
  LaneSums<C, 3> acc;
  sweep_lanes<C>(n, [&](auto lane, int64_t i) {
    using L = Lane<decltype(lane)>;
    auto* sums = acc.sums(lane);
    const auto ds = L::load(s + i) - L::splat(shift);
    const auto e = exp_t.template apply<CHECKED>(ds);
    store(es + i, e);
    sums[0] = sums[0] + e;
    if constexpr (S1 == rowmath::kStudent1Exp) sums[1] = sums[1] + exp_1.template apply<CHECKED>(ds);
    if constexpr (S1 == 2 || S1 == 4) sums[1] = sums[1] + rowmath::integer_power<S1>(e);
    if constexpr (SMOOTH) sums[2] = sums[2] + ds;
    if constexpr (NEXT) acc.max(lane) = max_(acc.max(lane), L::load(next + i));
    if constexpr (!CHECKED) acc.min(lane) = min_(acc.min(lane), ds);
  });
  sum_t = acc.total(0);
  sum_1 = acc.total(1);
  centered = acc.total(2);
  if constexpr (NEXT) next_max = acc.maximum();
  if constexpr (CHECKED) return true;
  const C low = acc.minimum();
  return low >= exp_t_in.scalar_cutoff() && (S1 != rowmath::kStudent1Exp || low >= exp_1_in.scalar_cutoff());
}

template <class C, int S1, bool SMOOTH, bool CHECKED>
bool student_exp_row_dispatch(const C* s, int64_t n, C shift, const ExpLanes<C>& exp_t, const ExpLanes<C>& exp_1,
                              C* es, C& sum_t, C& sum_1, C& centered, const C* next, C& next_max) {
  if (next != nullptr)
    return student_exp_row<C, S1, SMOOTH, true, CHECKED>(s, n, shift, exp_t, exp_1, es, sum_t, sum_1, centered, next,
                                                         next_max);
  return student_exp_row<C, S1, SMOOTH, false, CHECKED>(s, n, shift, exp_t, exp_1, es, sum_t, sum_1, centered, next,
                                                        next_max);
}

template <class C, int S1, bool SMOOTH>
void student_exp_row_for(const C* s, int64_t n, C shift, const ExpLanes<C>& exp_t, const ExpLanes<C>& exp_1, C* es,
                         C& sum_t, C& sum_1, C& centered, const C* next, C& next_max) {
  next_max = kNegInf<C>;
  if constexpr (kTryWithoutCutoff<C>) {
    if (student_exp_row_dispatch<C, S1, SMOOTH, false>(s, n, shift, exp_t, exp_1, es, sum_t, sum_1, centered, next,
                                                       next_max))
      return;
    // next_max is already known: only the exps and sums are redone.
    student_exp_row<C, S1, SMOOTH, false, true>(s, n, shift, exp_t, exp_1, es, sum_t, sum_1, centered, nullptr,
                                                next_max);
    return;
  }
  student_exp_row_dispatch<C, S1, SMOOTH, true>(s, n, shift, exp_t, exp_1, es, sum_t, sum_1, centered, next, next_max);
}

// Teacher exp pass: scratch[i] = exp((t_i - shift)/T); returns Z = Σ e and A = Σ e (t_i - shift).
// Fused into the same sweep: NEXT, the maximum of the next teacher row (its read from memory
// overlaps the arithmetic); PREV, mixture (+)= prev_c * prev (the previous teacher's
// exponentials, = when FIRST).
// SUM: also A (combine Sum needs it; Mixture does not). Returns false when CHECKED is false
// and some t_i - shift is below the cutoff.
template <class C, bool SUM, bool NEXT, bool PREV, bool FIRST, bool CHECKED>
bool teacher_exp_row(const C* t, int64_t n, C shift, const ExpLanes<C>& exp_t_in, C* scratch, C& z_out, C& a_out,
                     const C* next, C& next_max, const C* prev, C prev_c, C* mixture) {
  // A -inf logit has e = 0: its dt is clamped to the lowest finite value so that e * dt = 0.
  constexpr C kLowest = std::numeric_limits<C>::lowest();
  const ExpLanes<C> exp_t = exp_t_in;  // a local copy, as in student_exp_row
  LaneSums<C, 2> acc;
  sweep_lanes<C>(n, [&](auto lane, int64_t i) {
    using L = Lane<decltype(lane)>;
    auto* sums = acc.sums(lane);
    const auto dt = L::load(t + i) - L::splat(shift);
    const auto e = exp_t.template apply<CHECKED>(dt);
    store(scratch + i, e);
    sums[0] = sums[0] + e;
    if constexpr (SUM && CHECKED) sums[1] = fma_(e, max_(dt, L::splat(kLowest)), sums[1]);
    if constexpr (SUM && !CHECKED) sums[1] = fma_(e, dt, sums[1]);
    if constexpr (!CHECKED) acc.min(lane) = min_(acc.min(lane), dt);
    if constexpr (NEXT) acc.max(lane) = max_(acc.max(lane), L::load(next + i));
    if constexpr (PREV) {
      const auto add = L::splat(prev_c) * L::load(prev + i);
      if constexpr (FIRST) store(mixture + i, add);
      else store(mixture + i, L::load(mixture + i) + add);
    }
  });
  z_out = acc.total(0);
  a_out = acc.total(1);
  if constexpr (NEXT) next_max = acc.maximum();
  if constexpr (CHECKED) return true;
  return acc.minimum() >= exp_t_in.scalar_cutoff();
}

template <class C, bool SUM, bool CHECKED>
bool teacher_exp_row_dispatch(const C* t, int64_t n, C shift, const ExpLanes<C>& exp_t, C* scratch, C& z, C& a,
                              const C* next, C& next_max, const C* prev, C prev_c, C* mixture, bool first) {
#define KDFAST_TEACHER_ROW(NEXT_, PREV_, FIRST_)                                                                     \
  teacher_exp_row<C, SUM, NEXT_, PREV_, FIRST_, CHECKED>(t, n, shift, exp_t, scratch, z, a, next, next_max, prev, \
                                                         prev_c, mixture)
  if (next != nullptr) {
    if (prev == nullptr) return KDFAST_TEACHER_ROW(true, false, false);
    if (first) return KDFAST_TEACHER_ROW(true, true, true);
    return KDFAST_TEACHER_ROW(true, true, false);
  }
  if (prev == nullptr) return KDFAST_TEACHER_ROW(false, false, false);
  if (first) return KDFAST_TEACHER_ROW(false, true, true);
  return KDFAST_TEACHER_ROW(false, true, false);
#undef KDFAST_TEACHER_ROW
}

template <class C, bool SUM>
void teacher_exp_row_for(const C* t, int64_t n, C shift, const ExpLanes<C>& exp_t, C* scratch, C& z, C& a,
                         const C* next, C& next_max, const C* prev, C prev_c, C* mixture, bool first) {
  next_max = kNegInf<C>;
  if constexpr (kTryWithoutCutoff<C>) {
    if (teacher_exp_row_dispatch<C, SUM, false>(t, n, shift, exp_t, scratch, z, a, next, next_max, prev, prev_c,
                                                mixture, first))
      return;
    // next_max and the mixture update are done: only the exps and sums are redone.
    C unused = 0;
    teacher_exp_row<C, SUM, false, false, false, true>(t, n, shift, exp_t, scratch, z, a, nullptr, unused, nullptr,
                                                       C(0), nullptr);
    return;
  }
  teacher_exp_row_dispatch<C, SUM, true>(t, n, shift, exp_t, scratch, z, a, next, next_max, prev, prev_c, mixture,
                                         first);
}

// Final pass: B = Σ p̄ (s - shift), H = Σ p̄ log p̄ (MIXTURE), and when GRAD the gradient
// out = kd (es/Z_s - p̄) + ce (r - smooth), r per the student_1 mode S1 (r = es/Z_s at T = 1).
// The mixture is p̄_i = mixture_scale * mixture[i] + last_c * last[i] (the last teacher's
// exponentials are added here, in the same sweep).
template <class C, bool GRAD, bool KD, bool CE, int S1, bool MIXTURE>
void final_row(const C* s, const C* es, const C* mixture, C mixture_scale, const C* last, C last_c, int64_t n,
               C shift, C inv_zs, C log_sum_1, C r_scale, C kd, C ce, C smooth, C* out, C& b_out, C& h_out) {
  C b = 0, h = 0;
#pragma omp simd reduction(+ : b, h)
  for (int64_t i = 0; i < n; ++i) {
    const C pbar = KD ? mixture_scale * mixture[i] + last_c * last[i] : C(0);
    if constexpr (KD) {
      const C ds = s[i] - shift;
      b += pbar > C(0) ? pbar * ds : C(0);
      if constexpr (MIXTURE) h += pbar > C(0) ? pbar * rowmath::log_c(pbar) : C(0);
    }
    if constexpr (GRAD) {
      const C q = es[i] * inv_zs;
      C value = 0;
      if constexpr (KD) value += kd * (q - pbar);
      if constexpr (CE) {
        C r = q;
        if constexpr (S1 == rowmath::kStudent1Exp) r = rowmath::exp_c((s[i] - shift) - log_sum_1);
        if constexpr (S1 == 2 || S1 == 4) r = rowmath::integer_power<S1>(es[i]) * r_scale;
        value += ce * (r - smooth);
      }
      out[i] = value;
    }
  }
  b_out = b;
  h_out = h;
}

// dst[0:n] = src[0:n], with non-temporal stores for float32 where dst is aligned: the
// gradient is written once and not read again here, so it need not be read into the cache
// first. The writing thread calls store_fence() before its writes are used.
template <class C>
void stream_store(const C* src, int64_t n, C* dst) {
  int64_t i = 0;
  if constexpr (std::is_same_v<C, float>) {
#if defined(__AVX__)
    if ((reinterpret_cast<uintptr_t>(dst) & 31) == 0)
      for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
#elif defined(__SSE2__)
    if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0)
      for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
#endif
  }
  if (i < n) std::memcpy(dst + i, src + i, sizeof(C) * static_cast<size_t>(n - i));
}

inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

template <class C, bool GRAD, bool KD, bool MIXTURE>
void final_row_for(int student_1_mode, bool ce, const C* s, const C* es, const C* mixture, C mixture_scale,
                   const C* last, C last_c, int64_t n, C shift, C inv_zs, C log_sum_1, C r_scale, C kd, C ce_factor,
                   C smooth, C* out, C& b, C& h) {
#define KDFAST_FINAL_ROW(CE_, S1_) \
  final_row<C, GRAD, KD, CE_, S1_, MIXTURE>(s, es, mixture, mixture_scale, last, last_c, n, shift, inv_zs, log_sum_1, \
                                            r_scale, kd, ce_factor, smooth, out, b, h)
  if (!ce) return KDFAST_FINAL_ROW(false, rowmath::kStudent1None);
  switch (student_1_mode) {
    case rowmath::kStudent1Exp: return KDFAST_FINAL_ROW(true, rowmath::kStudent1Exp);
    case 2: return KDFAST_FINAL_ROW(true, 2);
    case 4: return KDFAST_FINAL_ROW(true, 4);
    default: return KDFAST_FINAL_ROW(true, rowmath::kStudent1None);
  }
#undef KDFAST_FINAL_ROW
}

template <class S, class T, class C, Combine MODE>
int64_t forward_kl_impl(const MultiTeacherKDArgs& args) {
  const Coefficients<C> k = rowmath::make_coefficients<C>(args.options);
  const int64_t rows = args.rows, vocab = args.vocab, num_teachers = args.num_teachers;
  const int64_t stats_width = kMultiTeacherRowStatsBase + kMultiTeacherStatsPerTeacher * num_teachers;
  const S* student = static_cast<const S*>(args.student);
  C* row_stats = static_cast<C*>(args.row_stats);
  C* grad = static_cast<C*>(args.grad_student);
  const C inv_t = k.inv_temperature;
  const bool smooth = k.need_ce && k.label_smoothing > C(0);
  constexpr bool kMixture = MODE == Combine::Mixture;
  constexpr bool kInPlace = std::is_same_v<T, C>;  // teachers read without conversion

  // The gradient's reduction scale needs the number of valid rows up front.
  int64_t valid = 0;
  for (int64_t row = 0; row < rows; ++row) valid += label_valid(args.labels, row, args.options.ignore_index) ? 1 : 0;
  double reduction_scale = 1.0;
  if (args.options.reduction == Reduction::Mean) reduction_scale = valid > 0 ? 1.0 / static_cast<double>(valid) : 0.0;
  else if (args.options.reduction == Reduction::BatchMean) reduction_scale = rows > 0 ? 1.0 / static_cast<double>(rows) : 0.0;
  const C ce_factor = static_cast<C>(reduction_scale) * k.alpha;
  const C kd_factor = static_cast<C>(reduction_scale) * (C(1) - k.alpha) * k.divergence_scale * inv_t;
  const C smooth_value = k.label_smoothing / static_cast<C>(vocab);
  const C label_step = static_cast<C>(reduction_scale) * k.alpha * (C(1) - k.label_smoothing);
  int64_t bad_labels = 0;

#pragma omp parallel num_threads(threads_for(args.num_threads, rows, vocab * (num_teachers + 1))) reduction(+ : bad_labels)
  {
    // Whole-row buffers: converted student and teacher rows (low-precision inputs), es, p̄, scratch.
    std::vector<C> buffers(static_cast<size_t>(vocab) * 6);
    C* student_buf = buffers.data();
    C* teacher_buf = student_buf + vocab;
    C* es = teacher_buf + vocab;
    C* mixture = es + vocab;
    C* scratch_pair[2] = {mixture + vocab, mixture + 2 * vocab};
    alignas(64) C grad_chunk[kChunk];
    const ExpLanes<C> exp_t(inv_t), exp_1(C(1));
    // Each thread takes one contiguous block of rows, so that a row's last teacher pass can
    // take the maximum of the next row's student logits on the way (carried_max).
#if defined(_OPENMP)
    const int64_t team = omp_get_num_threads(), member = omp_get_thread_num();
#else
    const int64_t team = 1, member = 0;
#endif
    const int64_t row_begin = rows * member / team, row_end = rows * (member + 1) / team;
    int64_t carried_row = -1;
    C carried_max = kNegInf<C>;

    for (int64_t row = row_begin; row < row_end; ++row) {
      C* stats_out = row_stats + row * stats_width;
      C* g_row = grad != nullptr ? grad + row * vocab : nullptr;
      if (!label_valid(args.labels, row, args.options.ignore_index)) {
        for (int64_t j = 0; j < stats_width; ++j) stats_out[j] = C(0);
        if (g_row) std::fill(g_row, g_row + vocab, C(0));
        continue;
      }
      const int64_t label = args.labels ? args.labels[row] : -1;
      if (args.labels && (label < 0 || label >= vocab)) {
        ++bad_labels;
        for (int64_t j = 0; j < stats_width; ++j) stats_out[j] = std::numeric_limits<C>::quiet_NaN();
        if (g_row) std::fill(g_row, g_row + vocab, std::numeric_limits<C>::quiet_NaN());
        continue;
      }
      const C* s = load_chunk<S, C>(student + row * args.student_row_stride, vocab, student_buf);
      const C max_s = carried_row == row ? carried_max : row_max(s, vocab);
      // A row whose entries are all -inf shifts by 0 instead (no inf - inf).
      const C shift_s = max_s == kNegInf<C> ? C(0) : max_s;
      auto teacher_row = [&](int64_t m) {
        return static_cast<const T*>(args.teachers[m]) + row * args.teacher_row_strides[m];
      };
      // Float32 / float64 teachers are read in place, so each pass can take the next
      // teacher's maximum on the way; converted teachers take theirs after conversion.
      const C* next = nullptr;
      if constexpr (kInPlace) next = k.need_kd ? reinterpret_cast<const C*>(teacher_row(0)) : nullptr;
      C next_max = kNegInf<C>;
      C sum_t = 0, sum_1 = 0, centered = 0;
      switch (k.need_ce ? k.student_1_mode : rowmath::kStudent1None) {
        case rowmath::kStudent1Exp:
          if (smooth) student_exp_row_for<C, rowmath::kStudent1Exp, true>(s, vocab, shift_s, exp_t, exp_1, es, sum_t, sum_1, centered, next, next_max);
          else student_exp_row_for<C, rowmath::kStudent1Exp, false>(s, vocab, shift_s, exp_t, exp_1, es, sum_t, sum_1, centered, next, next_max);
          break;
        case 2:
          if (smooth) student_exp_row_for<C, 2, true>(s, vocab, shift_s, exp_t, exp_1, es, sum_t, sum_1, centered, next, next_max);
          else student_exp_row_for<C, 2, false>(s, vocab, shift_s, exp_t, exp_1, es, sum_t, sum_1, centered, next, next_max);
          break;
        case 4:
          if (smooth) student_exp_row_for<C, 4, true>(s, vocab, shift_s, exp_t, exp_1, es, sum_t, sum_1, centered, next, next_max);
          else student_exp_row_for<C, 4, false>(s, vocab, shift_s, exp_t, exp_1, es, sum_t, sum_1, centered, next, next_max);
          break;
        default:
          if (smooth) student_exp_row_for<C, rowmath::kStudent1None, true>(s, vocab, shift_s, exp_t, exp_1, es, sum_t, sum_1, centered, next, next_max);
          else student_exp_row_for<C, rowmath::kStudent1None, false>(s, vocab, shift_s, exp_t, exp_1, es, sum_t, sum_1, centered, next, next_max);
      }
      const C log_sum_t = rowmath::log_of_sum(sum_t);
      const C log_sum_1 = k.need_student_1 ? rowmath::log_of_sum(sum_1) : log_sum_t;

      C teacher_part = 0;  // Sum: Σ_m w_m (A_m / (T Z_m) - log Z_m)
      // The previous teacher's exponentials and factor w/Z, added to the mixture one pass later.
      const C* prev = nullptr;
      C prev_c = 0;
      bool mixture_empty = true;
      for (int64_t m = 0; m < num_teachers && k.need_kd; ++m) {
        const C* t;
        C max_t;
        if constexpr (kInPlace) {
          t = reinterpret_cast<const C*>(teacher_row(m));
          max_t = next_max;
          next = m + 1 < num_teachers ? reinterpret_cast<const C*>(teacher_row(m + 1)) : nullptr;
          if constexpr (std::is_same_v<S, C>) {  // the last pass looks at the next row's student
            if (next == nullptr && row + 1 < row_end) next = reinterpret_cast<const C*>(student + (row + 1) * args.student_row_stride);
          }
        } else {
          t = load_chunk<T, C>(teacher_row(m), vocab, teacher_buf);
          max_t = row_max(t, vocab);
        }
        const C shift_t = max_t == kNegInf<C> ? C(0) : max_t;
        C* scratch = scratch_pair[m % 2];
        C z = 0, a = 0;
        teacher_exp_row_for<C, !kMixture>(t, vocab, shift_t, exp_t, scratch, z, a, next, next_max, prev, prev_c,
                                          mixture, mixture_empty);
        if (kInPlace && std::is_same_v<S, C> && m + 1 == num_teachers && next != nullptr) {
          carried_row = row + 1;
          carried_max = next_max;
        }
        if (prev != nullptr) mixture_empty = false;
        const C w = weight_of<C>(args, m, row);
        const C log_z = rowmath::log_of_sum(z);
        prev = scratch;
        prev_c = w / z;
        if (!kMixture && w > C(0)) teacher_part += w * (a * inv_t / z - log_z);
        C* teacher_out = stats_out + kMultiTeacherRowStatsBase + kMultiTeacherStatsPerTeacher * m;
        teacher_out[0] = shift_t;
        teacher_out[1] = log_z;
        teacher_out[2] = C(0);
      }
      if (!k.need_kd) {
        for (int64_t j = kMultiTeacherRowStatsBase; j < stats_width; ++j) stats_out[j] = C(0);
      }
      // p̄ = mixture (unless empty) + prev_c * prev, formed in the final pass.
      const C mixture_scale = mixture_empty ? C(0) : C(1);
      const C* mixture_in = mixture_empty ? (prev != nullptr ? prev : es) : mixture;
      const C* last = prev != nullptr ? prev : es;

      const C inv_zs = C(1) / sum_t;
      const C r_scale = k.student_1_mode == 2 || k.student_1_mode == 4
                            ? static_cast<C>(std::exp(-static_cast<double>(log_sum_1)))
                            : C(0);
      C b = 0, h = 0;
      C* out = g_row;
      const int mode = k.student_1_mode;
      if (out != nullptr) {
        // Chunk by chunk through an L1 buffer, then streamed to the gradient row.
        for (int64_t start = 0; start < vocab; start += kChunk) {
          const int64_t n = std::min(kChunk, vocab - start);
          C b_part = 0, h_part = 0;
          if (k.need_kd) final_row_for<C, true, true, kMixture>(mode, k.need_ce, s + start, es + start, mixture_in + start, mixture_scale, last + start, prev_c, n, shift_s, inv_zs, log_sum_1, r_scale, kd_factor, ce_factor, smooth_value, grad_chunk, b_part, h_part);
          else final_row_for<C, true, false, kMixture>(mode, k.need_ce, s + start, es + start, mixture_in + start, mixture_scale, last + start, prev_c, n, shift_s, inv_zs, log_sum_1, r_scale, kd_factor, ce_factor, smooth_value, grad_chunk, b_part, h_part);
          if (k.need_ce && label >= start && label < start + n) grad_chunk[label - start] -= label_step;
          stream_store(grad_chunk, n, out + start);
          b += b_part;
          h += h_part;
        }
      } else if (k.need_kd) {
        final_row_for<C, false, true, kMixture>(mode, false, s, es, mixture_in, mixture_scale, last, prev_c, vocab, shift_s, inv_zs, log_sum_1, r_scale, kd_factor, ce_factor, smooth_value, out, b, h);
      }

      C divergence = 0;
      if (k.need_kd) {
        const C cross = b * inv_t - log_sum_t;  // Σ p̄ log q
        divergence = (kMixture ? h : teacher_part) - cross;
      }
      C ce = 0;
      if (k.need_ce) {
        ce = rowmath::cross_entropy(s[label] - shift_s, log_sum_1, centered, vocab, k.label_smoothing);
      }
      stats_out[0] = shift_s;
      stats_out[1] = log_sum_t;
      stats_out[2] = log_sum_1;
      stats_out[3] = C(0);
      stats_out[4] = rowmath::combine_loss(ce, divergence, k);
      stats_out[5] = C(0);
    }
    store_fence();  // the streamed gradient rows are complete before the team's barrier
  }

  reduce_row_losses(row_stats, stats_width, 4, rows, args.labels, args.options, static_cast<C*>(args.loss),
                    static_cast<C*>(args.valid_rows));
  return bad_labels;
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
  if (args.options.divergence == Divergence::ForwardKL) {
    if (args.combine == Combine::Mixture) return forward_kl_impl<S, T, C, Combine::Mixture>(args);
    return forward_kl_impl<S, T, C, Combine::Sum>(args);
  }
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

// Test hook: exp(x / T) over n floats on this variant's lanes (ScaledExp, as the forward_kl
// passes use it); cutoff = false is the form without the cutoff test, exact for x >= -87 T.
void scaled_exp(const float* x, int64_t n, float inv_t, bool cutoff, float* out) {
  const ExpLanes<float> exp(inv_t);
  sweep_lanes<float>(n, [&](auto lane, int64_t i) {
    using L = Lane<decltype(lane)>;
    const auto v = L::load(x + i);
    store(out + i, cutoff ? exp.template apply<true>(v) : exp.template apply<false>(v));
  });
}

int64_t multi_teacher_forward(const MultiTeacherKDArgs& args) {
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
