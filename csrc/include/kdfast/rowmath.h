// Per-row math of the dense KD loss, shared by the CPU and CUDA kernels (__host__ __device__).
// Contract: one row has student logits s, teacher logits t (length V), an optional label y.
// With a = t/T, b = s/T:  p = softmax(a), q = softmax(b), r = softmax(s).
// The forward pass streams the row once, keeping running maxima and rescaled sums
// (`RowPartial`, combined chunk by chunk or lane by lane with `merge_partials`), then
// `finish_stats` turns them into log-sums, the divergence, the cross-entropy and the loss.
// JSD and TVD need normalised p and q, so they add a second sweep over the (cached) row
// using `jsd_terms` / `tvd_terms`. The backward pass recomputes log p, log q, log r per
// element from the saved maxima and log-sums and applies `divergence_grad` (reverse_kl:
// `reverse_kl_grad`). Logits enter as scaled differences (`difference_scale`), so that logits
// anywhere in the float range cannot overflow; the per-row finishing runs in double (its
// factors, like T² and 1/T, leave the float range where the loss does not); a row whose sums
// are NaN or empty is NaN (`row_sums_defined`). Every formula here is the one docs/design.md
// states; kdfast.reference is its float64 oracle.
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

// Logit differences. A kernel never forms x − max directly: that overflows for logits of
// opposite signs near the ends of the float range (3e38 − (−3e38)). It forms
// d = h·x − h·max instead, with h a power of two: exact (h·x is exact for normal numbers, so d
// is the rounded difference scaled by h) and finite for any two float logits. float math uses
// h = 2^−(⌈log2 V⌉ + 2), small enough that sums of V such values (|d| ≤ 2h·FLT_MAX each), and
// the rebasing of such sums, stay finite as well; double math uses h = 1. Every sum of
// differences (`RowPartial::weighted`, `student_centered_total`) is kept in these h units, and
// exp((x − max)/T) = exp(d·κ) with κ = 1/(hT).
template <class C>
inline C difference_scale(int64_t vocab) {
  if constexpr (sizeof(C) == sizeof(double)) {
    return C(1);
  } else {
    int bits = 0;
    while (bits < 62 && (int64_t(1) << bits) < vocab) ++bits;
    return static_cast<C>(std::ldexp(1.0, -(bits + 2)));
  }
}

// d = h x − h max (see difference_scale), given h and h max.
template <class C>
KDFAST_HD C scaled_difference(C x, C h, C scaled_max) {
  return x * h - scaled_max;
}

// Streamed statistics of one row. Everything is kept relative to the running maxima of the
// raw logits, and every logit enters as a scaled difference to its row maximum,
// d = h (t_i − teacher_max) (see difference_scale), exact in floating point, so that logits of
// magnitude 1e4 lose nothing and logits near ±3e38 do not overflow. With κ = 1/(hT):
//   teacher_max = max t_i,   teacher_sum   = sum exp(dt_i κ)
//   student_max = max s_i,   student_sum_T = sum exp(ds_i κ)
//                            student_sum_1 = sum exp(ds_i / h)
//   weighted: forward_kl  sum exp(dt_i κ) (c dt_i − ds_i)    (h units; D needs it times κ;
//                         c = Coefficients::teacher_centring, 1 for the KL)
//             reverse_kl  sum exp(ds_i κ) (ds_i − dt_i)
//   student_centered_total = sum ds_i (h units, label smoothing), count = entries seen
template <class C>
struct RowPartial {
  C teacher_max, teacher_sum, student_max, student_sum_T, student_sum_1, weighted, student_centered_total, count;
};

template <class C>
KDFAST_HD RowPartial<C> empty_partial() {
  return RowPartial<C>{neg_inf<C>(), C(0), neg_inf<C>(), C(0), C(0), C(0), C(0), C(0)};
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
  C aux;                // reverse_kl: D h T (D in scaled logit units, which cannot overflow where the
                        // loss does not); jsd: KL(q || m); tvd: 1/2 sum q sign(q - p); forward_kl: 0
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
  C inv_temperature;  // 1/T
  C diff_scale;       // h (difference_scale)
  C inv_scaled_t;     // κ = 1/(hT): exp((x − max)/T) = exp(d κ)
  C inv_diff_scale;   // 1/h:         exp(x − max)     = exp(d / h)
  C alpha, beta, label_smoothing, divergence_scale;
  C log_beta, log_one_minus_beta;
  // c in forward_kl's weighted sum of e_p (c dt - ds): 1 for the KL, 0 for the soft-target
  // cross-entropy (KDOptions::teacher_entropy), whose log p term drops out.
  C teacher_centring;
  // The same in double, for the per-row finishing (loss, gradient factors): τ = T², κ and the
  // one-pass divergence can leave the float range where the row's loss and gradient do not.
  double temperature_d, inv_scaled_t_d, alpha_d, label_smoothing_d, divergence_scale_d, teacher_centring_d;
  bool need_ce, need_kd, need_student_1;  // need_student_1: CE needs softmax(s) and T != 1
  // How exp(s - max) is obtained when need_student_1: kStudent1Exp (its own exp), or for
  // T = 2 / 4 as exp((s - max)/T)^T by squaring (2 / 4); kStudent1None when not needed.
  int student_1_mode;
  Divergence divergence;
};

template <class C>
inline Coefficients<C> make_coefficients(const KDOptions& o, int64_t vocab) {
  Coefficients<C> k;
  const double h = static_cast<double>(difference_scale<C>(vocab));
  k.inv_temperature = static_cast<C>(1.0 / o.temperature);
  k.diff_scale = static_cast<C>(h);
  k.inv_scaled_t_d = 1.0 / (h * o.temperature);
  k.inv_scaled_t = static_cast<C>(k.inv_scaled_t_d);
  k.inv_diff_scale = static_cast<C>(1.0 / h);
  k.alpha = static_cast<C>(o.alpha);
  k.beta = static_cast<C>(o.beta);
  k.label_smoothing = static_cast<C>(o.label_smoothing);
  k.divergence_scale = static_cast<C>(o.divergence_scale);
  k.log_beta = static_cast<C>(std::log(o.beta));
  k.log_one_minus_beta = static_cast<C>(std::log1p(-o.beta));
  k.temperature_d = o.temperature;
  k.alpha_d = o.alpha;
  k.label_smoothing_d = o.label_smoothing;
  k.divergence_scale_d = o.divergence_scale;
  k.teacher_centring_d = o.teacher_entropy && o.divergence == Divergence::ForwardKL ? 0.0 : 1.0;
  k.teacher_centring = static_cast<C>(k.teacher_centring_d);
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

// Moves a partial onto larger maxima (new_teacher_max >= teacher_max, same for the student).
// The one-pass divergences' weighted sums shift by the change of their centring; a factor
// that underflows to 0 drops the old entries' weighted terms with their exponentials (their
// product tends to 0), so that 0 · ∞ never arises.
template <class C>
KDFAST_HD void rebase_partial(RowPartial<C>& part, C new_teacher_max, C new_student_max, const Coefficients<C>& k,
                              Divergence divergence) {
  const C h = k.diff_scale;
  const bool teacher_seen = part.teacher_max != neg_inf<C>();
  const bool student_seen = part.student_max != neg_inf<C>();
  const C teacher_shift = teacher_seen ? new_teacher_max * h - part.teacher_max * h : C(0);
  const C student_shift = student_seen ? new_student_max * h - part.student_max * h : C(0);
  if (teacher_shift == C(0) && student_shift == C(0)) {
    part.teacher_max = new_teacher_max;
    part.student_max = new_student_max;
    return;
  }
  const C teacher_factor = teacher_seen ? exp_c(-teacher_shift * k.inv_scaled_t) : C(0);
  const C student_factor_T = student_seen ? exp_c(-student_shift * k.inv_scaled_t) : C(0);
  const C student_factor_1 = student_seen ? exp_c(-student_shift * k.inv_diff_scale) : C(0);
  if (divergence == Divergence::ForwardKL && part.teacher_sum > C(0)) {
    part.weighted = teacher_factor > C(0)
                        ? teacher_factor * (part.weighted -
                                            part.teacher_sum * (teacher_shift * k.teacher_centring - student_shift))
                        : C(0);
  } else if (divergence == Divergence::ReverseKL && part.student_sum_T > C(0)) {
    part.weighted = student_factor_T > C(0)
                        ? student_factor_T * (part.weighted - part.student_sum_T * (student_shift - teacher_shift))
                        : C(0);
  }
  part.teacher_sum *= teacher_factor;
  part.student_sum_T *= student_factor_T;
  part.student_sum_1 *= student_factor_1;
  part.student_centered_total -= part.count * student_shift;
  part.teacher_max = new_teacher_max;
  part.student_max = new_student_max;
}

// rebase_partial with its shifts, factors and the weighted sums' correction in double, rounded
// once into the partial: for one partial accumulated on bases below the row's maxima (the CPU
// kernels' one-sweep rows), moved onto those maxima before finish_stats, so that no float
// rounding of a factor or of a difference of shifts enters the row's statistics.
template <class C>
inline void rebase_partial_exact(RowPartial<C>& part, C new_teacher_max, C new_student_max, const Coefficients<C>& k,
                                 Divergence divergence) {
  const double h = static_cast<double>(k.diff_scale);
  const auto shift = [h](C from, C to) {
    return from == neg_inf<C>() || from == to ? 0.0 : static_cast<double>(to) * h - static_cast<double>(from) * h;
  };
  const double teacher_shift = shift(part.teacher_max, new_teacher_max);
  const double student_shift = shift(part.student_max, new_student_max);
  const double inv_h = 1.0 / h;
  const double teacher_factor = std::exp(-teacher_shift * k.inv_scaled_t_d);
  const double student_factor_T = std::exp(-student_shift * k.inv_scaled_t_d);
  const double student_factor_1 = std::exp(-student_shift * inv_h);
  const double weighted = static_cast<double>(part.weighted);
  if (divergence == Divergence::ForwardKL && part.teacher_sum > C(0)) {
    const double centring = teacher_shift * k.teacher_centring_d - student_shift;
    part.weighted = static_cast<C>(teacher_factor * (weighted - static_cast<double>(part.teacher_sum) * centring));
  } else if (divergence == Divergence::ReverseKL && part.student_sum_T > C(0)) {
    const double centring = student_shift - teacher_shift;
    part.weighted = static_cast<C>(student_factor_T * (weighted - static_cast<double>(part.student_sum_T) * centring));
  }
  part.teacher_sum = static_cast<C>(static_cast<double>(part.teacher_sum) * teacher_factor);
  part.student_sum_T = static_cast<C>(static_cast<double>(part.student_sum_T) * student_factor_T);
  part.student_sum_1 = static_cast<C>(static_cast<double>(part.student_sum_1) * student_factor_1);
  part.student_centered_total = static_cast<C>(static_cast<double>(part.student_centered_total) -
                                               static_cast<double>(part.count) * student_shift);
  part.teacher_max = new_teacher_max;
  part.student_max = new_student_max;
}

// a += b, both first moved onto the common maxima (for lane, warp or chunk partials).
template <class C>
KDFAST_HD void merge_partials(RowPartial<C>& a, RowPartial<C> b, const Coefficients<C>& k, Divergence divergence) {
  const C teacher_max = a.teacher_max > b.teacher_max ? a.teacher_max : b.teacher_max;
  const C student_max = a.student_max > b.student_max ? a.student_max : b.student_max;
  rebase_partial(a, teacher_max, student_max, k, divergence);
  rebase_partial(b, teacher_max, student_max, k, divergence);
  a.teacher_sum += b.teacher_sum;
  a.student_sum_T += b.student_sum_T;
  a.student_sum_1 += b.student_sum_1;
  a.weighted += b.weighted;
  a.student_centered_total += b.student_centered_total;
  a.count += b.count;
}

// log of a streamed sum; -inf when the row has no finite entry.
template <class C>
KDFAST_HD C log_of_sum(C sum) {
  return sum > C(0) ? log_c(sum) : neg_inf<C>();
}

// Whether a streamed sum of exponentials defines a distribution: false for NaN (a NaN or +inf
// logit) and for 0 (a row of only −inf logits, whose softmax is undefined).
template <class C>
KDFAST_HD bool sum_defined(C sum) {
  return sum > C(0);
}

// Whether every sum the row's loss reads is defined (sum_defined). Where one is not, the
// kernels make the row's loss NaN (and its gradient NaN), as kdfast.reference does: NaN in,
// NaN out, never a finite loss built from a NaN input.
template <class C>
KDFAST_HD bool student_sums_defined(C student_sum_T, C student_sum_1, const Coefficients<C>& k) {
  bool defined = true;
  if (k.need_kd) defined = sum_defined(student_sum_T);
  if (k.need_ce) defined = defined && sum_defined(k.need_student_1 ? student_sum_1 : student_sum_T);
  return defined;
}
template <class C>
KDFAST_HD bool row_sums_defined(const RowPartial<C>& part, const Coefficients<C>& k) {
  return student_sums_defined(part.student_sum_T, part.student_sum_1, k) && (!k.need_kd || sum_defined(part.teacher_sum));
}

// Cross-entropy of one valid row with label y, in double from logit-unit quantities:
//   CE = -(1 - eps) log r_y - (eps / V) sum_i log r_i,
//   log r_y = (s_y - s_max) - log_sum_1,  sum_i log r_i = centered_total - V log_sum_1,
// with label_centered = s_y − s_max and centered_total = sum_i (s_i − s_max) (both in logit
// units: the kernels divide their h-unit sums by h).
KDFAST_HD double cross_entropy(double label_centered, double log_sum_1, double centered_total, int64_t vocab,
                               double eps) {
  double ce = -(1.0 - eps) * (label_centered - log_sum_1);
  if (eps > 0.0) ce -= eps * (centered_total / static_cast<double>(vocab) - log_sum_1);
  return ce;
}

// Log-sums and the one-pass divergences (forward_kl, reverse_kl) of a row; the divergence in
// double (see Coefficients).
template <class C>
KDFAST_HD RowStats<C> finish_stats(const RowPartial<C>& part, const Coefficients<C>& k, double* one_pass_divergence) {
  RowStats<C> st;
  st.teacher_max = part.teacher_max;
  st.teacher_log_sum = log_of_sum(part.teacher_sum);
  st.student_max = part.student_max;
  st.student_log_sum_T = log_of_sum(part.student_sum_T);
  st.student_log_sum_1 = k.need_student_1 ? log_of_sum(part.student_sum_1) : st.student_log_sum_T;
  st.aux = C(0);
  double d = 0.0;
  const double log_sum_p = static_cast<double>(st.teacher_log_sum);
  const double log_sum_q = static_cast<double>(st.student_log_sum_T);
  if (k.divergence == Divergence::ForwardKL) {
    // sum p (log p - log q) = κ weighted / teacher_sum - log teacher_sum + log student_sum_T;
    // the cross-entropy -sum p log q (teacher_centring 0) drops the log teacher_sum.
    const double mean = static_cast<double>(part.weighted) / static_cast<double>(part.teacher_sum);
    d = mean * k.inv_scaled_t_d - k.teacher_centring_d * log_sum_p + log_sum_q;
  } else if (k.divergence == Divergence::ReverseKL) {
    const double mean = static_cast<double>(part.weighted) / static_cast<double>(part.student_sum_T);
    d = mean * k.inv_scaled_t_d - log_sum_q + log_sum_p;
    st.aux = static_cast<C>(mean + (log_sum_p - log_sum_q) / k.inv_scaled_t_d);  // D / κ
  }
  *one_pass_divergence = d;
  return st;
}

// Row loss from its parts, in double: alpha CE + (1 - alpha) tau D, each term only when its
// weight > 0.
template <class C>
KDFAST_HD double combine_loss(double ce, double divergence, const Coefficients<C>& k) {
  double loss = 0.0;
  if (k.need_ce) loss += k.alpha_d * ce;
  if (k.need_kd) loss += (1.0 - k.alpha_d) * k.divergence_scale_d * divergence;
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
// minus label_step at the label. Built in double by make_grad_row and rounded once.
template <class C>
struct GradRow {
  C ce_factor;   // g alpha
  C kd_factor;   // g (1 - alpha) tau / T  (the 1/T of d b / d s folded in)
  C label_step;  // g alpha (1 - eps)
  C smooth;      // eps / V
  C r_scale;     // student_1 modes 2 / 4: r = q^T exp(T log_sum_T - log_sum_1) (set by the caller)
  C rkl_a, rkl_b, rkl_c;  // reverse_kl: kd_factor dD/db_i = q_i rkl_a ((ds_i − dt_i) + rkl_c) rkl_b, see reverse_kl_grad
  RowStats<C> stats;
};

// The row's gradient factors for grad_output (times the reduction's scale) g, from its saved
// statistics.
template <class C>
KDFAST_HD GradRow<C> make_grad_row(double g, const Coefficients<C>& k, const RowStats<C>& stats, int64_t vocab) {
  GradRow<C> row;
  const double inv_t = k.inv_scaled_t_d * static_cast<double>(k.diff_scale);
  const double kd_factor = g * (1.0 - k.alpha_d) * k.divergence_scale_d * inv_t;
  row.ce_factor = static_cast<C>(g * k.alpha_d);
  row.kd_factor = static_cast<C>(kd_factor);
  row.label_step = static_cast<C>(g * k.alpha_d * (1.0 - k.label_smoothing_d));
  row.smooth = static_cast<C>(k.label_smoothing_d / static_cast<double>(vocab));
  row.r_scale = C(0);
  // a = kd_factor κ as one factor (b = 1), unless it leaves the compute type's range (no T² and a
  // tiny T): then a = kd_factor and b = κ, applied last.
  const double a = kd_factor * k.inv_scaled_t_d;
  const bool fold = !(a > static_cast<double>(std::numeric_limits<C>::max()) ||
                      a < -static_cast<double>(std::numeric_limits<C>::max()));
  row.rkl_a = static_cast<C>(fold ? a : kd_factor);
  row.rkl_b = static_cast<C>(fold ? 1.0 : k.inv_scaled_t_d);
  row.rkl_c = static_cast<C>((static_cast<double>(stats.teacher_log_sum) - static_cast<double>(stats.student_log_sum_T)) /
                                 k.inv_scaled_t_d -
                             static_cast<double>(stats.aux));
  row.stats = stats;
  return row;
}

// d D / d b_i for one element (b = s/T), given log p_i, log q_i and q_i = exp(log q_i); for
// forward_kl, jsd and tvd (reverse_kl: reverse_kl_grad).
template <Divergence D, class C>
KDFAST_HD C divergence_grad(C log_p, C log_q, C q, C aux, const Coefficients<C>& k) {
  static_assert(D != Divergence::ReverseKL, "reverse_kl's gradient is reverse_kl_grad");
  if constexpr (D == Divergence::ForwardKL) {
    return q - exp_c(log_p);
  } else if constexpr (D == Divergence::JSD) {
    const C m = k.beta * exp_c(log_p) + (C(1) - k.beta) * q;
    return q > C(0) ? (C(1) - k.beta) * q * (log_q - log_c(m) - aux) : C(0);
  } else {  // TVD
    const C p = exp_c(log_p);
    const C half_sign = q > p ? C(0.5) : (q < p ? C(-0.5) : C(0));
    return q * (half_sign - aux);
  }
}

// reverse_kl's gradient term of one element with the row's factor folded in:
//   kd_factor q_i (log q_i − log p_i − D) = ((q_i a) ((ds_i − dt_i) + c)) b,
// ds, dt the scaled differences, a b = kd_factor κ (b = 1 unless that product overflows),
// c = (log_sum_p − log_sum_q)/κ − D/κ (GradRow::rkl_a, rkl_b, rkl_c): the bracket cancels in h
// units before the multiplications, q a comes first, and no (ds − dt)/T or D is formed on its
// own, so a huge logit spread at a small T does not overflow where the gradient is finite.
template <class C>
KDFAST_HD C reverse_kl_grad(C ds, C dt, C q, C a, C b, C c) {
  return q > C(0) ? ((q * a) * ((ds - dt) + c)) * b : C(0);
}

}  // namespace rowmath
}  // namespace kdfast
