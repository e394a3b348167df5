// Per-row math of the dense KD loss, shared by the CPU and CUDA kernels (__host__ __device__).
// Contract: one row has student logits s, teacher logits t (length V), an optional label y.
// With a = t/T, b = s/T:  p = softmax(a), q = softmax(b), r = softmax(s).
// The forward pass streams the row once, keeping running maxima and rescaled sums
// (`RowPartial`, combined chunk by chunk or lane by lane with `merge_partials`), then
// `finish_stats` turns them into log-sums, the divergence, the cross-entropy and the loss.
// JSD and TVD need normalised p and q, so they add a second sweep over the (cached) row
// using `jsd_terms` / `tvd_terms`. The backward pass recomputes log p, log q, log r per
// element from the saved maxima and log-sums and applies `divergence_grad`. Every formula here is the one
// docs/design.md states; kdfast.reference is its float64 oracle.
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

// exp(x) in float, branch-free so loops over it vectorise; relative error below 3e-7 on
// [-87, 0] (measured against double: 2.5e-7 worst case).
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

// log(x) in float for x >= 0, branch-free; error below 1.2e-7 (absolute where |log x| < 1,
// relative elsewhere; measured against double), subnormals included. log(0) = -inf.
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

// Streamed statistics of one row. Everything is kept relative to the running maxima of the
// raw logits, and every logit enters as a difference to its row maximum, (t_i - t_max)/T:
// that difference is exact in floating point, so logits of magnitude 1e4 lose nothing.
//   teacher_max = max t_i,   teacher_sum   = sum exp((t_i - teacher_max)/T)
//   student_max = max s_i,   student_sum_T = sum exp((s_i - student_max)/T)
//                            student_sum_1 = sum exp(s_i - student_max)
//   weighted: forward_kl  sum exp((t_i-t_max)/T) ((t_i-t_max) - (s_i-s_max))/T
//             reverse_kl  sum exp((s_i-s_max)/T) ((s_i-s_max) - (t_i-t_max))/T
//   student_centered_total = sum (s_i - student_max)   (label smoothing), count = entries seen
template <class C>
struct RowPartial {
  C teacher_max, teacher_sum, student_max, student_sum_T, student_sum_1, weighted, student_centered_total, count;
};

template <class C>
KDFAST_HD RowPartial<C> empty_partial() {
  return RowPartial<C>{neg_inf<C>(), C(0), neg_inf<C>(), C(0), C(0), C(0), C(0), C(0)};
}

// Moves a partial onto larger maxima (new_teacher_max >= teacher_max, same for the student).
// The one-pass divergences' weighted sums shift by the change of their centring.
template <class C>
KDFAST_HD void rebase_partial(RowPartial<C>& part, C new_teacher_max, C new_student_max, C inv_temperature,
                              Divergence divergence) {
  const bool teacher_seen = part.teacher_max != neg_inf<C>();
  const bool student_seen = part.student_max != neg_inf<C>();
  const C teacher_shift = teacher_seen ? new_teacher_max - part.teacher_max : C(0);
  const C student_shift = student_seen ? new_student_max - part.student_max : C(0);
  if (teacher_shift == C(0) && student_shift == C(0)) {
    part.teacher_max = new_teacher_max;
    part.student_max = new_student_max;
    return;
  }
  const C teacher_factor = teacher_seen ? exp_c(-teacher_shift * inv_temperature) : C(0);
  const C student_factor_T = student_seen ? exp_c(-student_shift * inv_temperature) : C(0);
  const C student_factor_1 = student_seen ? exp_c(-student_shift) : C(0);
  if (divergence == Divergence::ForwardKL && part.teacher_sum > C(0)) {
    part.weighted = teacher_factor * (part.weighted - part.teacher_sum * (teacher_shift - student_shift) * inv_temperature);
  } else if (divergence == Divergence::ReverseKL && part.student_sum_T > C(0)) {
    part.weighted = student_factor_T * (part.weighted - part.student_sum_T * (student_shift - teacher_shift) * inv_temperature);
  }
  part.teacher_sum *= teacher_factor;
  part.student_sum_T *= student_factor_T;
  part.student_sum_1 *= student_factor_1;
  part.student_centered_total -= part.count * student_shift;
  part.teacher_max = new_teacher_max;
  part.student_max = new_student_max;
}

// a += b, both first moved onto the common maxima (for lane, warp or chunk partials).
template <class C>
KDFAST_HD void merge_partials(RowPartial<C>& a, RowPartial<C> b, C inv_temperature, Divergence divergence) {
  const C teacher_max = a.teacher_max > b.teacher_max ? a.teacher_max : b.teacher_max;
  const C student_max = a.student_max > b.student_max ? a.student_max : b.student_max;
  rebase_partial(a, teacher_max, student_max, inv_temperature, divergence);
  rebase_partial(b, teacher_max, student_max, inv_temperature, divergence);
  a.teacher_sum += b.teacher_sum;
  a.student_sum_T += b.student_sum_T;
  a.student_sum_1 += b.student_sum_1;
  a.weighted += b.weighted;
  a.student_centered_total += b.student_centered_total;
  a.count += b.count;
}

// Per-row results the forward pass stores for the backward pass: row_stats[row, 0:6];
// row_stats[row, 6] holds the row loss and row_stats[row, 7] is zero (see kRowStats).
template <class C>
struct RowStats {
  C teacher_max;        // max t
  C teacher_log_sum;    // log sum exp((t - teacher_max)/T):  log p_i = (t_i - teacher_max)/T - teacher_log_sum
  C student_max;        // max s
  C student_log_sum_T;  // log sum exp((s - student_max)/T): log q_i likewise
  C student_log_sum_1;  // log sum exp(s - student_max):     log r_i = (s_i - student_max) - student_log_sum_1
  C aux;                // reverse_kl: D; jsd: KL(q || m); tvd: 1/2 sum q sign(q - p); forward_kl: 0
};

constexpr int kStudent1None = 0;
constexpr int kStudent1Exp = 1;

// x^P for the student_1 modes 2 and 4 (exp(d) = exp(d/T)^T for integer T).
template <int P, class C>
KDFAST_HD C integer_power(C x) {
  if constexpr (P == 2) return x * x;
  else { const C x2 = x * x; return x2 * x2; }
}

// Scalars every element of a row needs; built once per call.
template <class C>
struct Coefficients {
  C inv_temperature, alpha, beta, label_smoothing, divergence_scale;
  C log_beta, log_one_minus_beta;
  bool need_ce, need_kd, need_student_1;  // need_student_1: CE needs softmax(s) and T != 1
  // How exp(s - max) is obtained when need_student_1: kStudent1Exp (its own exp), or for
  // T = 2 / 4 as exp((s - max)/T)^T by squaring (2 / 4); kStudent1None when not needed.
  int student_1_mode;
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
  k.student_1_mode = !k.need_student_1 ? kStudent1None
                     : o.temperature == 2.0 ? 2
                     : o.temperature == 4.0 ? 4
                                            : kStudent1Exp;
  k.divergence = o.divergence;
  return k;
}

// log of a streamed sum; -inf when the row has no finite entry.
template <class C>
KDFAST_HD C log_of_sum(C sum) {
  return sum > C(0) ? log_c(sum) : neg_inf<C>();
}

// Cross-entropy of one valid row with label y, from max-relative quantities:
//   CE = -(1 - eps) log r_y - (eps / V) sum_i log r_i,
//   log r_y = (s_y - s_max) - log_sum_1,  sum_i log r_i = centered_total - V log_sum_1.
template <class C>
KDFAST_HD C cross_entropy(C label_logit_centered, C log_sum_1, C centered_total, int64_t vocab, C eps) {
  C ce = -(C(1) - eps) * (label_logit_centered - log_sum_1);
  if (eps > C(0)) ce -= eps * (centered_total / static_cast<C>(vocab) - log_sum_1);
  return ce;
}

// Log-sums and the one-pass divergences (forward_kl, reverse_kl) of a row.
template <class C>
KDFAST_HD RowStats<C> finish_stats(const RowPartial<C>& part, const Coefficients<C>& k, C* one_pass_divergence) {
  RowStats<C> st;
  st.teacher_max = part.teacher_max;
  st.teacher_log_sum = log_of_sum(part.teacher_sum);
  st.student_max = part.student_max;
  st.student_log_sum_T = log_of_sum(part.student_sum_T);
  st.student_log_sum_1 = k.need_student_1 ? log_of_sum(part.student_sum_1) : st.student_log_sum_T;
  st.aux = C(0);
  C d = C(0);
  if (k.divergence == Divergence::ForwardKL) {
    // sum p (log p - log q) = weighted / teacher_sum - log teacher_sum + log student_sum_T
    d = part.weighted / part.teacher_sum - st.teacher_log_sum + st.student_log_sum_T;
  } else if (k.divergence == Divergence::ReverseKL) {
    d = part.weighted / part.student_sum_T - st.student_log_sum_T + st.teacher_log_sum;
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
  C ce_factor;  // g alpha
  C kd_factor;  // g (1 - alpha) tau / T  (the 1/T of d b / d s folded in)
  C smooth;     // eps / V
  C r_scale;    // student_1 modes 2 / 4: r = q^T exp(T log_sum_T - log_sum_1)
  RowStats<C> stats;
};

// d D / d b_i for one element (b = s/T), given log p_i, log q_i and q_i = exp(log q_i).
template <Divergence D, class C>
KDFAST_HD C divergence_grad(C log_p, C log_q, C q, C aux, const Coefficients<C>& k) {
  if constexpr (D == Divergence::ForwardKL) {
    return q - exp_c(log_p);
  } else if constexpr (D == Divergence::ReverseKL) {
    return q > C(0) ? q * (log_q - log_p - aux) : C(0);
  } else if constexpr (D == Divergence::JSD) {
    const C m = k.beta * exp_c(log_p) + (C(1) - k.beta) * q;
    return q > C(0) ? (C(1) - k.beta) * q * (log_q - log_c(m) - aux) : C(0);
  } else {  // TVD
    const C p = exp_c(log_p);
    const C half_sign = q > p ? C(0.5) : (q < p ? C(-0.5) : C(0));
    return q * (half_sign - aux);
  }
}

}  // namespace rowmath
}  // namespace kdfast
