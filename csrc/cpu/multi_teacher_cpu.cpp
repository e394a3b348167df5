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
// The mixture distribution is formed as p̄_i = Σ_m w_m p_mi in the compute type, so a
// token every teacher gives probability below ~1e-38 (float32) has p̄_i = 0.
#include <algorithm>
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
