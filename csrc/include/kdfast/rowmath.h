// Per-row math of the dense KD loss, shared by the CPU and CUDA kernels (__host__ __device__).
// Contract: one row has student logits s, teacher logits t (length V), an optional label y.
// With a = t/T, b = s/T:  p = softmax(a), q = softmax(b), r = softmax(s).
// The forward pass streams the row once, keeping running maxima and rescaled sums
// (moved onto a new maximum with `rescale_factor`, chunk by chunk or lane by lane), then `finish_stats`
// turns them into log-sum-exps, the divergence, the cross-entropy and the row loss.
// JSD and TVD need normalised p and q, so they add a second sweep over the (cached) row
// using `jsd_terms` / `tvd_terms`. The backward pass recomputes p, q, r per element from
// the saved log-sum-exps and applies `grad_element`. Every formula here is the one
// DESIGN.md states; kdfast.reference is its float64 oracle.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "kdfast/types.h"

#if defined(__CUDACC__)
#define KDFAST_HD __host__ __device__ __forceinline__
#else
#define KDFAST_HD inline __attribute__((always_inline))
#endif

namespace kdfast {
namespace rowmath {

KDFAST_HD float bits_to_float(int32_t v) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(v);
#else
  float f;
  std::memcpy(&f, &v, 4);
  return f;
#endif
}

KDFAST_HD int32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(f);
#else
  int32_t v;
  std::memcpy(&v, &f, 4);
  return v;
#endif
}

// exp(x) in float, branch-free so loops over it vectorise; within 2 ulp for x in [-87, 88].
// Returns exactly 0 below -87 (and for -inf), so masked (-inf) logits give zero probability.
// The kernels only call it with x <= 0 (logit minus a maximum or a log-sum-exp); x > 88.7
// is outside its domain. NaN propagates.
KDFAST_HD float exp_f32(float x) {
  // n = round(x / ln2) by the 1.5 * 2^23 trick; its integer value sits in the low mantissa bits.
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  // Cody-Waite reduction: r = x - n*ln2 in two parts, |r| <= ln2/2.
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  // exp(r): degree-6 Taylor polynomial, relative error < 1.2e-7 on |r| <= ln2/2.
  float poly = 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  // 2^n assembled in the exponent field: (n + 127) << 23, n read from the shifted bits.
  const float scale = bits_to_float((float_to_bits(shifted) - 0x4B400000 + 127) << 23);
  const float y = poly * scale;
  return x < -87.0f ? 0.0f : y;
}

// log(x) in float for x >= 0, branch-free; about 1 ulp. log(0) = -inf.
KDFAST_HD float log_f32(float x) {
  const bool tiny = x < 1.17549435e-38f;  // subnormal or zero: rescale by 2^23
  const float xs = tiny ? x * 8388608.0f : x;
  const int32_t bits = float_to_bits(xs);
  // Split xs = m * 2^e with m in [sqrt(1/2), sqrt(2)).
  const int32_t shifted = bits - 0x3f3504f3;  // bits of sqrt(1/2)
  const int32_t e = shifted >> 23;
  const float m = bits_to_float(bits - (e << 23));
  const float z = (m - 1.0f) / (m + 1.0f);  // |z| <= 0.1716
  const float z2 = z * z;
  // log(m) = 2 atanh(z) = 2 (z + z^3/3 + z^5/5 + z^7/7 + z^9/9)
  float poly = 1.0f / 9.0f;
  poly = poly * z2 + 1.0f / 7.0f;
  poly = poly * z2 + 1.0f / 5.0f;
  poly = poly * z2 + 1.0f / 3.0f;
  poly = poly * z2 + 1.0f;
  const float ef = static_cast<float>(e) - (tiny ? 23.0f : 0.0f);
  const float y = ef * 0.693147180559945309f + 2.0f * z * poly;
  return x > 0.0f ? y : (x == 0.0f ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::quiet_NaN());
}

// The compute type's exp/log: the fast float versions above, or the C library's in double.
KDFAST_HD float exp_c(float x) { return exp_f32(x); }
KDFAST_HD float log_c(float x) { return log_f32(x); }
KDFAST_HD double exp_c(double x) { return ::exp(x); }
KDFAST_HD double log_c(double x) { return ::log(x); }

template <class C>
KDFAST_HD C neg_inf() { return -std::numeric_limits<C>::infinity(); }

// Online softmax: the factor exp(old_max - new_max) that moves sums kept relative to
// old_max onto new_max >= old_max. A -inf old_max means "no finite entry yet": factor 0.
template <class C>
KDFAST_HD C rescale_factor(C old_max, C new_max) {
  return old_max == neg_inf<C>() ? C(0) : exp_c(old_max - new_max);
}

// Streamed statistics of one row (all relative to the running maxima):
//   teacher_max = max a_i,  teacher_sum = sum exp(a_i - teacher_max)
//   student_max = max s_i (raw logits; the max of b is student_max / T)
//   student_sum_T = sum exp(b_i - student_max/T),  student_sum_1 = sum exp(s_i - student_max)
//   weighted: forward_kl  sum exp(a_i - teacher_max)(a_i - b_i)   (scales with teacher_sum)
//             reverse_kl  sum exp(b_i - student_max/T)(b_i - a_i) (scales with student_sum_T)
//   student_total = sum s_i (cross-entropy label smoothing)
template <class C>
struct RowPartial {
  C teacher_max, teacher_sum, student_max, student_sum_T, student_sum_1, weighted, student_total;
};

// Per-row results the forward pass stores for the backward pass (row_stats[row, 0:4];
// row_stats[row, 4] holds the row loss).
template <class C>
struct RowStats {
  C lse_teacher_T;   // log sum exp(a)
  C lse_student_T;   // log sum exp(b)
  C lse_student_1;   // log sum exp(s)
  C aux;             // reverse_kl: D; jsd: KL(q || m); tvd: 1/2 sum q sign(q - p); forward_kl: 0
};

// Scalars every element of a row needs; built once per call.
template <class C>
struct Coefficients {
  C inv_temperature, alpha, beta, label_smoothing, divergence_scale;
  C log_beta, log_one_minus_beta;
  bool need_ce, need_kd, need_student_1;  // need_student_1: CE needs softmax(s) and T != 1
  Divergence divergence;
};

template <class C>
inline Coefficients<C> make_coefficients(const KDOptions& o) {
  Coefficients<C> k;
  k.inv_temperature = static_cast<C>(1.0 / o.temperature);
  k.alpha = static_cast<C>(o.alpha);
  k.beta = static_cast<C>(o.beta);
  k.label_smoothing = static_cast<C>(o.label_smoothing);
  k.divergence_scale = static_cast<C>(o.divergence_scale);
  k.log_beta = static_cast<C>(std::log(o.beta));
  k.log_one_minus_beta = static_cast<C>(std::log1p(-o.beta));
  k.need_ce = o.alpha > 0.0;
  k.need_kd = o.alpha < 1.0;
  k.need_student_1 = k.need_ce && o.temperature != 1.0;
  k.divergence = o.divergence;
  return k;
}

// lse from a (max, sum) pair; -inf when the row has no finite entry.
template <class C>
KDFAST_HD C log_sum_exp(C max_value, C sum) {
  return max_value == neg_inf<C>() ? neg_inf<C>() : max_value + log_c(sum);
}

// Cross-entropy of one valid row with label y:
//   CE = -(1 - eps) (s_y - lse_1) - (eps / V) sum_i (s_i - lse_1).
template <class C>
KDFAST_HD C cross_entropy(C student_label_logit, C lse_1, C student_total, int64_t vocab, C eps) {
  C ce = -(C(1) - eps) * (student_label_logit - lse_1);
  if (eps > C(0)) ce -= eps * (student_total / static_cast<C>(vocab) - lse_1);
  return ce;
}

// Log-sum-exps and the one-pass divergences (forward_kl, reverse_kl) of a row.
template <class C>
KDFAST_HD RowStats<C> finish_stats(const RowPartial<C>& part, const Coefficients<C>& k, C* one_pass_divergence) {
  RowStats<C> st;
  st.lse_teacher_T = log_sum_exp(part.teacher_max, part.teacher_sum);
  st.lse_student_T = log_sum_exp(part.student_max * k.inv_temperature, part.student_sum_T);
  st.lse_student_1 = k.need_student_1 ? log_sum_exp(part.student_max, part.student_sum_1)
                                      : st.lse_student_T;  // T == 1 (or unused)
  st.aux = C(0);
  C d = C(0);
  if (k.divergence == Divergence::ForwardKL) {
    // sum p (a - b) - lse_a + lse_b
    d = part.weighted / part.teacher_sum - st.lse_teacher_T + st.lse_student_T;
  } else if (k.divergence == Divergence::ReverseKL) {
    d = part.weighted / part.student_sum_T - st.lse_student_T + st.lse_teacher_T;
    st.aux = d;
  }
  *one_pass_divergence = d;
  return st;
}

// Row loss from its parts: alpha CE + (1 - alpha) tau D, each term only when its weight > 0.
template <class C>
KDFAST_HD C combine_loss(C ce, C divergence, const Coefficients<C>& k) {
  C loss = C(0);
  if (k.need_ce) loss += k.alpha * ce;
  if (k.need_kd) loss += (C(1) - k.alpha) * k.divergence_scale * divergence;
  return loss;
}

// Second-sweep terms of JSD for one element, given log p and log q:
//   m = beta p + (1-beta) q;  kl_pm += p (log p - log m);  kl_qm += q (log q - log m).
template <class C>
KDFAST_HD void jsd_terms(C log_p, C log_q, const Coefficients<C>& k, C& kl_pm, C& kl_qm) {
  const C p = exp_c(log_p);
  const C q = exp_c(log_q);
  const C m = k.beta * p + (C(1) - k.beta) * q;
  const C log_m = log_c(m);
  kl_pm += p > C(0) ? p * (log_p - log_m) : C(0);
  kl_qm += q > C(0) ? q * (log_q - log_m) : C(0);
}

// Second-sweep terms of TVD: abs_sum += |p - q|, signed += q sign(q - p).
template <class C>
KDFAST_HD void tvd_terms(C log_p, C log_q, C& abs_sum, C& signed_sum) {
  const C p = exp_c(log_p);
  const C q = exp_c(log_q);
  const C diff = q - p;
  abs_sum += diff < C(0) ? -diff : diff;
  signed_sum += diff > C(0) ? q : (diff < C(0) ? -q : C(0));
}

// Divergence (and aux) of JSD / TVD from their sweep sums.
template <class C>
KDFAST_HD C finish_jsd(C kl_pm, C kl_qm, const Coefficients<C>& k, RowStats<C>& st) {
  st.aux = kl_qm;
  return k.beta * kl_pm + (C(1) - k.beta) * kl_qm;
}
template <class C>
KDFAST_HD C finish_tvd(C abs_sum, C signed_sum, RowStats<C>& st) {
  st.aux = C(0.5) * signed_sum;
  return C(0.5) * abs_sum;
}

// Per-row factors of the backward pass: grad = ce_factor (r - eps/V) + kd_factor dD/db,
// minus ce_factor (1 - eps) at the label.
template <class C>
struct GradRow {
  C ce_factor;   // g alpha
  C kd_factor;   // g (1 - alpha) tau / T  (the 1/T of d b / d s folded in)
  C smooth;      // eps / V
  C lse_a, lse_b, lse_s, aux;
};

// d D / d b_i for one element (b = s/T), given a = t/T, b and the row's log-sum-exps.
template <Divergence D, class C>
KDFAST_HD C divergence_grad(C a, C b, const GradRow<C>& g, const Coefficients<C>& k) {
  const C log_q = b - g.lse_b;
  const C q = exp_c(log_q);
  if constexpr (D == Divergence::ForwardKL) {
    const C p = exp_c(a - g.lse_a);
    return q - p;
  } else if constexpr (D == Divergence::ReverseKL) {
    const C log_p = a - g.lse_a;
    return q > C(0) ? q * (log_q - log_p - g.aux) : C(0);
  } else if constexpr (D == Divergence::JSD) {
    const C p = exp_c(a - g.lse_a);
    const C m = k.beta * p + (C(1) - k.beta) * q;
    return q > C(0) ? (C(1) - k.beta) * q * (log_q - log_c(m) - g.aux) : C(0);
  } else {  // TVD
    const C p = exp_c(a - g.lse_a);
    const C half_sign = q > p ? C(0.5) : (q < p ? C(-0.5) : C(0));
    return q * (half_sign - g.aux);
  }
}

}  // namespace rowmath
}  // namespace kdfast
