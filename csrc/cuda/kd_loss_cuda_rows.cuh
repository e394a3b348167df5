// Per-element and per-row arithmetic of the dense CUDA kernels (kd_loss_forward.cu,
// kd_loss_backward.cu), written __host__ __device__ so that the host replay
// (tests/functional/cuda_rows_replay.cu) runs exactly these functions on the CPU: a forward
// batch folded into a thread's running statistics (accumulate_batch), the moves of such
// partials onto larger maxima and their merges (rebase_row_partial, merge_row_partials), the
// row's finishing (finish_row_stats) and a backward batch's gradient (batch_gradient).
//
// reverse_kl "offsets" (float math, kReverseKLOffsets): the CUDA forward keeps per-thread
// running maxima that differ from thread to thread and from the row's final maxima. rowmath's
// weighted sum Σ e^{ds κ} (ds − dt) is relative to those maxima, so each move onto larger
// maxima shifts it by sum·(student shift − teacher shift), rounded at the size of the shifts
// (for logits spread over ±1e4 that is ~1e-3 of a logit), and the backward pass's bracket
// (ds − dt) + c no longer cancels for a row's dominant entry (the gradient of such a row was
// off by ~1e-3). With offsets the weighted sum is taken over
//   v_i = (h s_i − a) − (h t_i − b),  a = h s_ref, b = h t_ref,
// fixed per row references (ReverseKLRefs: the row's first student and teacher logits, 0 where
// one is not finite), the same in every thread and independent of the maxima: a move only
// scales it with student_sum_T, and
//   mean_v = weighted / student_sum_T,
//   D = κ (mean_v − ((h s_max − a) − (h t_max − b))) + lse_p − lse_q   (double),
//   aux = mean_v (row_stats column 5; rowmath's aux is D/κ), s_ref in row_stats column 7,
// so that log q_i − log p_i − D = κ (v_i − mean_v), and the backward pass forms its bracket
// v_i − aux from the same rounded v_i (bit for bit: s_ref from row_stats, t_ref from the
// teacher row, which the in-place backward does not overwrite). Logits near a common large
// offset (s ≈ 1e4, t ≈ −1e4) keep exact differences h s_i − a, h t_i − b, as rowmath's ds, dt
// do. Range: |h x − a| ≤ 2 h FLT_MAX, so |v_i| ≤ 4 h FLT_MAX and a row's Σ e_i |v_i| (e_i ≤ 1)
// ≤ 4 h V FLT_MAX ≤ FLT_MAX with rowmath's h = 2^−(⌈log2 V⌉+2) (difference_scale); the bracket
// |v_i − mean_v| ≤ 8 h FLT_MAX ≤ FLT_MAX for V ≥ 2 (for V = 1 it is v_0 − v_0 = 0). So nothing
// overflows for finite logits. double math (h = 1) keeps rowmath's formulation.
#pragma once

#include <cmath>
#include <cstdint>

#include "kd_loss_cuda_layout.cuh"
#include "kdfast/rowmath.h"
#include "kdfast/types.h"

namespace kdfast {
namespace cuda {

// Whether compute type C keeps reverse_kl's weighted sum over v (the offsets of the file comment).
template <class C>
constexpr bool kReverseKLOffsets = sizeof(C) == 4;

// Maximum that ignores NaN (IEEE maxNum), like MaxOp, for host and device.
KDFAST_HD float max_ignoring_nan(float a, float b) { return fmaxf(a, b); }
KDFAST_HD double max_ignoring_nan(double a, double b) { return fmax(a, b); }

// row_stats column of s_ref (finite_or_zero of the row's first student logit) for reverse_kl
// with offsets; 0 otherwise, as rowmath's layout has it.
constexpr int kStudentRefColumn = 7;
static_assert(kRowStats > kStudentRefColumn, "row_stats must hold s_ref");

// Whether a row's reverse_kl statistics use the offsets (kOffsets, reverse_kl and the KD term).
template <bool kOffsets, class C>
KDFAST_HD bool uses_reverse_kl_offsets(const rowmath::Coefficients<C>& k) {
  return kOffsets && k.need_kd && k.divergence == Divergence::ReverseKL;
}

// A row's references for the offsets, scaled: a = h s_ref, b = h t_ref (file comment).
template <class C>
struct ReverseKLRefs {
  C student;
  C teacher;
};

// x when finite, else 0 (x − x is 0 exactly for finite x, NaN for ±inf and NaN).
template <class C>
KDFAST_HD C finite_or_zero(C x) {
  return x - x == C(0) ? x : C(0);
}

// The references from the row's first logits (or s_ref as stored in row_stats column 7).
template <class C>
KDFAST_HD ReverseKLRefs<C> reverse_kl_refs(C first_student, C first_teacher, C h) {
  return ReverseKLRefs<C>{finite_or_zero(first_student) * h, finite_or_zero(first_teacher) * h};
}

// v = (h s − a) − (h t − b): reverse_kl's max-independent difference.
template <class C>
KDFAST_HD C reverse_kl_offset(C s, C t, C h, const ReverseKLRefs<C>& refs) {
  return (s * h - refs.student) - (t * h - refs.teacher);
}

// Moves a partial onto larger maxima (rowmath::rebase_partial). With kOffsets and reverse_kl
// the weighted sum only scales with student_sum_T (it does not depend on the maxima); the
// factor is rowmath's, so weighted / student_sum_T is unchanged by the move.
template <bool kOffsets, class C>
KDFAST_HD void rebase_row_partial(rowmath::RowPartial<C>& part, C new_teacher_max, C new_student_max,
                                  const rowmath::Coefficients<C>& k) {
  if (!kOffsets || k.divergence != Divergence::ReverseKL) {
    rowmath::rebase_partial(part, new_teacher_max, new_student_max, k, k.divergence);
    return;
  }
  const C h = k.diff_scale;
  const bool student_seen = part.student_max != rowmath::neg_inf<C>();
  const C student_shift = student_seen ? new_student_max * h - part.student_max * h : C(0);
  C weighted = part.weighted;
  if (student_shift != C(0) && part.student_sum_T > C(0)) {
    const C factor = rowmath::exp_c(-student_shift * k.inv_scaled_t);
    weighted = factor > C(0) ? factor * weighted : C(0);  // 0 · ∞ never arises (rowmath)
  }
  // JSD's move: maxima and sums as for every divergence, weighted left as it is.
  rowmath::rebase_partial(part, new_teacher_max, new_student_max, k, Divergence::JSD);
  part.weighted = weighted;
}

// a += b, both first moved onto the common maxima (rowmath::merge_partials with the move above).
template <bool kOffsets, class C>
KDFAST_HD void merge_row_partials(rowmath::RowPartial<C>& a, rowmath::RowPartial<C> b,
                                  const rowmath::Coefficients<C>& k) {
  const C teacher_max = max_ignoring_nan(a.teacher_max, b.teacher_max);
  const C student_max = max_ignoring_nan(a.student_max, b.student_max);
  rebase_row_partial<kOffsets>(a, teacher_max, student_max, k);
  rebase_row_partial<kOffsets>(b, teacher_max, student_max, k);
  a.teacher_sum += b.teacher_sum;
  a.student_sum_T += b.student_sum_T;
  a.student_sum_1 += b.student_sum_1;
  a.weighted += b.weighted;
  a.student_centered_total += b.student_centered_total;
  a.count += b.count;
}

// rowmath::finish_stats; with kOffsets and reverse_kl, D and aux from mean_v (file comment).
// A row whose sums are not defined (rowmath::row_sums_defined) is NaN whatever D is here.
template <bool kOffsets, class C>
KDFAST_HD rowmath::RowStats<C> finish_row_stats(const rowmath::RowPartial<C>& part, const rowmath::Coefficients<C>& k,
                                                const ReverseKLRefs<C>& refs, double* one_pass_divergence) {
  rowmath::RowStats<C> st = rowmath::finish_stats(part, k, one_pass_divergence);
  if (uses_reverse_kl_offsets<kOffsets>(k)) {
    const double h = static_cast<double>(k.diff_scale);
    const double mean = static_cast<double>(part.weighted) / static_cast<double>(part.student_sum_T);
    const double shift = (static_cast<double>(part.student_max) * h - static_cast<double>(refs.student)) -
                         (static_cast<double>(part.teacher_max) * h - static_cast<double>(refs.teacher));
    *one_pass_divergence = k.inv_scaled_t_d * (mean - shift) + static_cast<double>(st.teacher_log_sum) -
                           static_cast<double>(st.student_log_sum_T);
    st.aux = static_cast<C>(mean);
  }
  return st;
}

// The backward pass's row factors with offsets: reverse_kl's bracket is v_i + rkl_c with
// rkl_c = −aux = −mean_v (rowmath::make_grad_row builds it from D/κ otherwise).
template <bool kOffsets, class C>
KDFAST_HD void use_reverse_kl_offsets(rowmath::GradRow<C>& row, const rowmath::Coefficients<C>& k) {
  if (uses_reverse_kl_offsets<kOffsets>(k)) row.rkl_c = -row.stats.aux;
}

// Folds one batch of a thread's elements (s: student logits, t: teacher logits; -inf past the
// end of the row) into its running statistics, as chunk_stats does on the CPU: the running
// maxima grow to cover the batch (rebase_row_partial moves the sums along), then the batch's
// terms are added relative to them, as scaled differences d = h x - h max
// (rowmath::difference_scale). While a running maximum is still -inf (every entry so far -inf
// or NaN) the batch is shifted by 0, so that its NaN and -inf entries still reach the sums.
// kPartial: the batch reaches outside the row (head or tail), so the element count and the
// centred total of the student logits skip the padding. Exp<C>(scale)(d) = exp(d scale)
// (ScaledExp in the kernels). kOffsets: reverse_kl's weighted sum over v (file comment).
template <template <class> class Exp, bool kOffsets, bool kPartial, class C>
KDFAST_HD void accumulate_batch(rowmath::RowPartial<C>& part, const C* s, const C* t, const int* first, int vocab,
                                const rowmath::Coefficients<C>& k, const ReverseKLRefs<C>& refs) {
  constexpr int kE = kGroupsPerBatch<C> * kGroupWidth<C>;
  constexpr int kW = kGroupWidth<C>;
  const C h = k.diff_scale;
  const C neg_inf = rowmath::neg_inf<C>();
  const bool reverse_kl = k.need_kd && k.divergence == Divergence::ReverseKL;
  const bool forward_kl = k.need_kd && k.divergence == Divergence::ForwardKL;
  const bool smoothing = k.need_ce && k.label_smoothing > C(0);

  C batch_max_s = neg_inf;
  C batch_max_t = neg_inf;
#pragma unroll
  for (int e = 0; e < kE; ++e) batch_max_s = max_ignoring_nan(batch_max_s, s[e]);
  if (k.need_kd) {
#pragma unroll
    for (int e = 0; e < kE; ++e) batch_max_t = max_ignoring_nan(batch_max_t, t[e]);
  }
  const C max_s = max_ignoring_nan(part.student_max, batch_max_s);
  const C max_t = max_ignoring_nan(part.teacher_max, batch_max_t);
  if (max_s != part.student_max || max_t != part.teacher_max) {
    rebase_row_partial<kOffsets>(part, max_t, max_s, k);
  }
  if (kPartial) {
    int valid = 0;
#pragma unroll
    for (int e = 0; e < kE; ++e) valid += in_row(first[e / kW] + e % kW, vocab) ? 1 : 0;
    part.count += static_cast<C>(valid);
  } else {
    part.count += static_cast<C>(kE);
  }
  const Exp<C> exp_over_t(k.inv_scaled_t);
  const C shift_s = (max_s == neg_inf ? C(0) : max_s) * h;
  const C shift_t = (max_t == neg_inf ? C(0) : max_t) * h;
  {
    C sum_t = C(0), sum_1 = C(0), centered = C(0), weighted = C(0);
#pragma unroll
    for (int e = 0; e < kE; ++e) {
      const C ds = rowmath::scaled_difference(s[e], h, shift_s);
      const C exp_b = exp_over_t(ds);
      sum_t += exp_b;
      if (reverse_kl) {
        const C diff = kOffsets ? reverse_kl_offset(s[e], t[e], h, refs) : ds - rowmath::scaled_difference(t[e], h, shift_t);
        weighted += exp_b > C(0) ? exp_b * diff : C(0);
      }
    }
    if (k.need_student_1) {
      const Exp<C> exp_plain(k.inv_diff_scale);
#pragma unroll
      for (int e = 0; e < kE; ++e) sum_1 += exp_plain(rowmath::scaled_difference(s[e], h, shift_s));
    }
    if (smoothing) {
#pragma unroll
      for (int e = 0; e < kE; ++e) {
        if (!kPartial || in_row(first[e / kW] + e % kW, vocab)) centered += rowmath::scaled_difference(s[e], h, shift_s);
      }
    }
    part.student_sum_T += sum_t;
    part.student_sum_1 += sum_1;
    part.student_centered_total += centered;
    if (reverse_kl) part.weighted += weighted;
  }
  if (k.need_kd) {
    C sum = C(0), weighted = C(0);
#pragma unroll
    for (int e = 0; e < kE; ++e) {
      const C dt = rowmath::scaled_difference(t[e], h, shift_t);
      const C exp_a = exp_over_t(dt);
      sum += exp_a;
      if (forward_kl) {
        const C ds = rowmath::scaled_difference(s[e], h, shift_s);
        weighted += exp_a > C(0) ? exp_a * (dt * k.teacher_centring - ds) : C(0);
      }
    }
    part.teacher_sum += sum;
    if (forward_kl) part.weighted += weighted;
  }
}

// exp(x log2(e) ... ) in one FMA and the hardware exp2 for float (ScaledExp's unit; exp2f in
// host code), the accurate exp for double: e^(d kappa - log_sum) = 2^(d (kappa log2 e) - log_sum log2 e).
template <class C>
struct FusedExp {
  C slope;   // kappa log2(e) (float) or kappa (double)
  C offset;  // log_sum log2(e) (float) or log_sum (double)
  KDFAST_HD FusedExp(C kappa, C log_sum) {
    if constexpr (sizeof(C) == 4) {
      slope = kappa * C(1.44269504088896341);
      offset = log_sum * C(1.44269504088896341);
    } else {
      slope = kappa;
      offset = log_sum;
    }
  }
  KDFAST_HD C operator()(C d) const {
    if constexpr (sizeof(C) == 4) {
#if defined(__CUDA_ARCH__)
      float result;
      asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(result) : "f"(fmaf(d, slope, -offset)));
      return result;
#else
      return exp2f(fmaf(d, slope, -offset));
#endif
    } else {
      return ::exp(d * slope - offset);
    }
  }
};

// Gradient of one batch (before the label step): kd_factor dD/db + ce_factor (r - eps/V),
// element by element as chunk_grad does on the CPU. forward_kl, reverse_kl and the
// cross-entropy term take q = e^(ds kappa - log_sum_T) (and p, r alike) from FusedExp: one FMA
// and one hardware exp2 per probability in float. JSD and TVD keep rowmath's exp for both p
// and q, so that p and q tie exactly where they are equal (the TVD gradient jumps at p == q).
// kOffsets: reverse_kl's bracket is v_i + rkl_c (use_reverse_kl_offsets), with the row's refs.
template <Divergence D, bool kOffsets, class C>
KDFAST_HD void batch_gradient(const C* s, const C* t, const rowmath::GradRow<C>& g, const rowmath::Coefficients<C>& k,
                              const ReverseKLRefs<C>& refs, C* out) {
  constexpr int kE = kGroupsPerBatch<C> * kGroupWidth<C>;
  constexpr bool kFast = D == Divergence::ForwardKL || D == Divergence::ReverseKL;
  const C h = k.diff_scale, kappa = k.inv_scaled_t, inv_h = k.inv_diff_scale;
  const C max_s = g.stats.student_max * h, max_t = g.stats.teacher_max * h;
  const FusedExp<C> q_of(kappa, g.stats.student_log_sum_T);
  const FusedExp<C> p_of(kappa, g.stats.teacher_log_sum);
  const FusedExp<C> r_of(inv_h, g.stats.student_log_sum_1);
#pragma unroll
  for (int e = 0; e < kE; ++e) {
    const C ds = rowmath::scaled_difference(s[e], h, max_s);  // h (s - max): rowmath::difference_scale
    C q;
    if constexpr (kFast) {
      q = q_of(ds);
    } else {
      q = rowmath::exp_c(ds * kappa - g.stats.student_log_sum_T);
    }
    C value = C(0);
    if (k.need_kd) {
      if constexpr (D == Divergence::ReverseKL && kOffsets) {
        value += rowmath::reverse_kl_grad(reverse_kl_offset(s[e], t[e], h, refs), C(0), q, g.rkl_a, g.rkl_b, g.rkl_c);
      } else {
        const C dt = rowmath::scaled_difference(t[e], h, max_t);
        if constexpr (D == Divergence::ReverseKL) {
          value += rowmath::reverse_kl_grad(ds, dt, q, g.rkl_a, g.rkl_b, g.rkl_c);
        } else if constexpr (D == Divergence::ForwardKL) {
          value += g.kd_factor * (q - p_of(dt));  // divergence_grad<ForwardKL>: q - p
        } else {
          const C log_q = ds * kappa - g.stats.student_log_sum_T;
          value += g.kd_factor * rowmath::divergence_grad<D>(dt * kappa - g.stats.teacher_log_sum, log_q, q,
                                                             g.stats.aux, k);
        }
      }
    }
    if (k.need_ce) {
      const C r = k.need_student_1 ? r_of(ds) : q;  // T == 1: r == q
      value += g.ce_factor * (r - g.smooth);
    }
    out[e] = value;
  }
}

}  // namespace cuda
}  // namespace kdfast
