// Chunk math of the dense KD loss's CPU kernels, included by kd_loss_cpu.cpp only (one copy per
// instruction-set variant, inside its namespace kdfast::cpu::KDFAST_CPU_VARIANT): the sweeps
// over one chunk of a row in the compute type (statistics, JSD / TVD's second sweep, the
// gradient) and their selection for a call's options (`pick_kernels`). Contract: rowmath.h.
// The statistics sweep can also keep its exponentials (`KeptExps`): the one-pass training
// kernel stores exp((s - b)/T), exp((t - b)/T) and exp(s - b) of a row (b: the row's bases,
// `RowFrame`) into per-thread row buffers, and every gradient (JSD and TVD: and their second
// sweeps) is then formed from them (`chunk_grad_kept`, `chunk_sweep_jsd_kept`,
// `chunk_sweep_tvd`) with no exponential of its own; JSD's second sweep keeps log m too.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "exp_lanes.h"
#include "kernel_common.h"
#include "kdfast/rowmath.h"
#include "kdfast/types.h"

#ifndef KDFAST_CPU_VARIANT
#error "KDFAST_CPU_VARIANT must name the instruction-set variant"
#endif

namespace kdfast {
namespace cpu {
namespace KDFAST_CPU_VARIANT {
namespace {

using rowmath::Coefficients;
using rowmath::GradRow;
using rowmath::RowPartial;
using rowmath::RowStats;

constexpr int64_t kChunk = 512;

// ---- chunk math: operates on compute-type buffers, independent of the storage dtypes ----

// exp((x - max)/T) and exp(x - max) of a scaled difference d = h x - h max (rowmath.h,
// difference_scale) on the variant's lanes (exp_lanes.h): exp(d κ) and exp(d / h), built once per call.
template <class C>
struct RowExps {
  ExpLanes<C> t, one;
  explicit RowExps(const Coefficients<C>& k)
      : t(k.inv_scaled_t_d), one(1.0 / static_cast<double>(k.diff_scale)) {}
};

// Where the statistics sweep keeps its exponentials (one chunk's slice of per-thread row
// buffers): q: exp(ds κ), p: exp(dt κ), one: exp(ds / h) (CE at T other than 1, 2, 4); and
// log_m: JSD's log m per element, which its second sweep writes for the gradient. Only the
// slices the call's options need are set.
template <class C>
struct KeptExps {
  C* q;
  C* p;
  C* one;
  C* log_m = nullptr;
  KeptExps at(int64_t offset) const {
    return {q + offset, p ? p + offset : nullptr, one ? one + offset : nullptr, log_m ? log_m + offset : nullptr};
  }
};

// Where a row's exponentials on the lanes are taken from: the bases b (the row's maxima, or the
// maxima of its first chunk for a one-sweep row, see kd_loss_cpu.cpp) and the factors that
// normalise exp((x - b)/T) and exp(x - b): 1/Z exp(-(max - b)/T) = exp(-(max - b)/T - log-sum),
// formed in double from the saved statistics. Every lanes sweep after the statistics (TVD's
// and JSD's second sweeps, the gradients) takes its exponentials and factors from here.
template <class C>
struct RowFrame {
  C base_s, base_t;
  C inv_zq, inv_zp, inv_z1;  // of exp(ds/T), exp(dt/T), exp(ds), with ds, dt relative to the bases
};

// forward_kl's gradient with its CE term (and the CE term alone, for any divergence) as one
// polynomial in the exponentials on the row's frame, whose row factors are formed in double:
//   kd (q − p) + ce (r − smooth) = e_q (a + b e_q^(T−1)) − c e_p − d   (r = e_q^T inv_z1, T = 2, 4)
//                                = e_q a + b e_1 − c e_p − d            (r = e_1 inv_z1, other T)
// with a = kd inv_zq (+ ce inv_zq at T = 1, where r = q), b = ce inv_z1, c = kd inv_zp,
// d = ce smooth: three multiply-adds per element where normalising q, p and r first takes six.
template <class C>
struct PolyGrad {
  C a, b, neg_c, d;
};

// One row's gradient factors (rowmath::GradRow, reverse_kl's rkl_c moved onto the bases), its
// frame and its PolyGrad; built once per row.
template <class C>
struct ChunkGradRow {
  GradRow<C> row;
  RowFrame<C> frame;
  PolyGrad<C> poly;
};

// Whether a chunk gradient takes the PolyGrad form (forward_kl, or CE alone).
template <Divergence D, bool KD>
constexpr bool kPolyGrad = D == Divergence::ForwardKL || !KD;

// Folds one chunk into the streamed statistics of a row in a single sweep, relative to the
// bases `part` holds (stream_row: the maxima of the row's first chunk, or the row's maxima),
// then merges it into the row's partial (rowmath::merge_partials, here with no rebase); the
// running maxima max_s, max_t grow by the chunk's entries (NaN skipped) on the way.
// FOLD: exp(d κ) with the folded polynomial (exp_scalar.h; when RowExps::t is foldable).
// KEEP: also stores the chunk's exponentials into `kept` (KeptExps).
template <class C, Divergence D, bool KD, int S1, bool SMOOTH, bool FOLD, bool KEEP = false>
void chunk_stats(const C* s, const C* t, int64_t n, const Coefficients<C>& coefficients, const RowExps<C>& exps,
                 RowPartial<C>& part, KeptExps<C> kept, C& max_s, C& max_t) {
  const Coefficients<C> k = coefficients;
  const C h = k.diff_scale;
  RowPartial<C> chunk = rowmath::empty_partial<C>();
  chunk.student_max = part.student_max;
  chunk.teacher_max = part.teacher_max;
  chunk.count = static_cast<C>(n);
  // A maximum of -inf (every entry so far masked) shifts by 0 instead: the entries stay
  // -inf and their exponentials 0, with no inf - inf. Differences are scaled: d = h x - h max.
  const C shift_s = (chunk.student_max == kNegInf<C> ? C(0) : chunk.student_max) * h;
  const C shift_t = (chunk.teacher_max == kNegInf<C> ? C(0) : chunk.teacher_max) * h;
  // Local copies: they must not alias the sums for the constants to stay in registers.
  const ExpLanes<C> exp_t = exps.t, exp_1 = exps.one;
  LaneSums<C, 5> acc;  // sums of e_q, of exp(ds) or e_q^S1, e_p, weighted, centered; max of s
  LaneSums<C, 1> teacher_acc;  // max of t
  sweep_lanes<C>(n, [&](auto lane, int64_t i) {
    using L = Lane<decltype(lane)>;
    auto* sums = acc.sums(lane);
    const auto x_s = L::load(s + i);
    acc.max(lane) = max_(x_s, acc.max(lane));
    const auto ds = fma_(x_s, L::splat(h), L::splat(-shift_s));
    const auto e_q = exp_t.template apply<true, FOLD>(ds);
    sums[0] = sums[0] + e_q;
    if constexpr (KEEP) store(kept.q + i, e_q);
    if constexpr (S1 == rowmath::kStudent1Exp) {
      const auto e_1 = exp_1(ds);
      sums[1] = sums[1] + e_1;
      if constexpr (KEEP) store(kept.one + i, e_1);
    }
    if constexpr (S1 == 2 || S1 == 4) sums[1] = sums[1] + rowmath::integer_power<S1>(e_q);
    if constexpr (SMOOTH) sums[4] = sums[4] + ds;
    if constexpr (KD) {
      const auto x_t = L::load(t + i);
      teacher_acc.max(lane) = max_(x_t, teacher_acc.max(lane));
      const auto dt = fma_(x_t, L::splat(h), L::splat(-shift_t));
      const auto e_p = exp_t.template apply<true, FOLD>(dt);
      sums[2] = sums[2] + e_p;
      if constexpr (KEEP && D != Divergence::ReverseKL) store(kept.p + i, e_p);  // reverse_kl's gradient needs no p
      if constexpr (D == Divergence::ForwardKL) {
        sums[3] = sums[3] + where_positive(e_p, e_p * (dt * L::splat(k.teacher_centring) - ds));
      }
      if constexpr (D == Divergence::ReverseKL) sums[3] = sums[3] + where_positive(e_q, e_q * (ds - dt));
    }
  });
  const C sum_q = acc.total(0), sum_1 = acc.total(1), sum_p = acc.total(2), weighted = acc.total(3),
          centered = acc.total(4);
  max_s = max_(acc.maximum(), max_s);
  if constexpr (KD) max_t = max_(teacher_acc.maximum(), max_t);
  chunk.student_sum_T = sum_q;
  chunk.student_sum_1 = sum_1;
  chunk.student_centered_total = centered;
  chunk.teacher_sum = sum_p;
  chunk.weighted = weighted;
  rowmath::merge_partials(part, chunk, k, k.divergence);
}

// m = max(m, x_i) over a chunk (NaN entries are skipped, as in every max sweep of the kernels).
KDFAST_FILLED_BUFFERS_BEGIN  // x: often a chunk buffer load_chunk has just filled
template <class C>
inline void chunk_max(const C* x, int64_t n, C& m) {
  C value = m;
#pragma omp simd reduction(max : value)
  for (int64_t i = 0; i < n; ++i) value = x[i] > value ? x[i] : value;
  m = value;
}
KDFAST_FILLED_BUFFERS_END

// JSD from the kept exponentials. Every JSD path takes p = exp(dt κ) inv_zp and q = exp(ds κ)
// inv_zq on the row's frame (the statistics sweep's exponentials, kept or formed again the
// same way), log m = log(β p + (1 − β) q) by jsd_log_m, and log p, log q from the logits
// relative to the row's maxima. jsd_log_m is one out-of-line function, so the second sweep
// (which keeps log m for the one-pass gradient) and the two-pass backward get the same bits.
template <class C>
__attribute__((noinline)) void jsd_log_m(const C* kq, const C* kp, int64_t n, C inv_zq, C inv_zp, C beta, C* log_m) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) log_m[i] = rowmath::log_c(beta * (kp[i] * inv_zp) + (C(1) - beta) * (kq[i] * inv_zq));
}

// JSD's second sweep over one chunk from the kept exponentials (`kept.q`, `kept.p`, all n
// entries) and the logits: acc0 += Σ p (log p − log m), acc1 += Σ q (log q − log m); writes
// log m to kept.log_m.
template <class C>
void chunk_sweep_jsd_kept(const C* s, const C* t, KeptExps<C> kept, int64_t n, const Coefficients<C>& coefficients,
                          const RowExps<C>& exps, const RowStats<C>& stats, const RowFrame<C>& frame, C& acc0,
                          C& acc1) {
  (void)exps;
  const Coefficients<C> k = coefficients;
  const RowStats<C> st = stats;
  const C inv_zq = frame.inv_zq, inv_zp = frame.inv_zp;
  const C* kq = kept.q;
  const C* kp = kept.p;
  C* lm = kept.log_m;
  jsd_log_m(kq, kp, n, inv_zq, inv_zp, k.beta, lm);
  const C h = k.diff_scale, kappa = k.inv_scaled_t;
  const C max_t = st.teacher_max * h, max_s = st.student_max * h;
  C sum0 = 0, sum1 = 0;
#pragma omp simd reduction(+ : sum0, sum1)
  for (int64_t i = 0; i < n; ++i) {
    const C p = kp[i] * inv_zp, q = kq[i] * inv_zq;
    const C log_p = rowmath::scaled_difference(t[i], h, max_t) * kappa - st.teacher_log_sum;
    const C log_q = rowmath::scaled_difference(s[i], h, max_s) * kappa - st.student_log_sum_T;
    sum0 += p > C(0) ? p * (log_p - lm[i]) : C(0);
    sum1 += q > C(0) ? q * (log_q - lm[i]) : C(0);
  }
  acc0 += sum0;
  acc1 += sum1;
}

// JSD's gradient of one chunk (with its KD term) from q's kept exponentials, log m
// (`kept.log_m`) and the student logits: kd_factor (1 − β) q (log q − log m − aux) plus the
// cross-entropy term (r as chunk_grad_kept forms it).
template <class C, bool CE, int S1>
void chunk_grad_kept_jsd(const C* s, KeptExps<C> kept, int64_t n, const Coefficients<C>& coefficients,
                         const ChunkGradRow<C>& grad_row, C* out) {
  const Coefficients<C> k = coefficients;  // local copies: the stores to `out` cannot alias them
  const GradRow<C> g = grad_row.row;
  const RowFrame<C> f = grad_row.frame;
  const C h = k.diff_scale, kappa = k.inv_scaled_t, one_minus_beta = C(1) - k.beta;
  const C max_s = g.stats.student_max * h;
  const C* kq = kept.q;
  const C* k1 = kept.one;
  const C* lm = kept.log_m;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const C q = kq[i] * f.inv_zq;
    const C log_q = rowmath::scaled_difference(s[i], h, max_s) * kappa - g.stats.student_log_sum_T;
    C value = g.kd_factor * (q > C(0) ? one_minus_beta * q * (log_q - lm[i] - g.stats.aux) : C(0));
    if constexpr (CE) {
      C r = q;  // T == 1
      if constexpr (S1 == rowmath::kStudent1Exp) r = k1[i] * f.inv_z1;
      if constexpr (S1 == 2 || S1 == 4) r = rowmath::integer_power<S1>(q) * g.r_scale;
      value += g.ce_factor * (r - g.smooth);
    }
    out[i] = value;
  }
}

// JSD's gradient of one chunk (with its KD term) over the logits alone (the two-pass
// backward, and the scalar tail of the one-pass one): the statistics sweep's exponentials formed
// again on the row's frame, log m by jsd_log_m, then chunk_grad_kept_jsd.
KDFAST_FILLED_BUFFERS_BEGIN  // e_q, e_p, e_1: filled by the sweep over the same n elements
template <class C, bool CE, int S1, bool FOLD>
void chunk_grad_jsd(const C* s, const C* t, int64_t n, const Coefficients<C>& coefficients, const RowExps<C>& exps,
                    const ChunkGradRow<C>& grad_row, C* out) {
  alignas(64) C e_q[kChunk];
  alignas(64) C e_p[kChunk];
  alignas(64) C e_1[kChunk];
  alignas(64) C log_m[kChunk];
  const RowFrame<C> f = grad_row.frame;
  const C h = coefficients.diff_scale;
  const C max_s = f.base_s * h, max_t = f.base_t * h;
  const ExpLanes<C> exp_t = exps.t, exp_1 = exps.one;  // local copies, as in chunk_stats
  sweep_lanes<C>(n, [&](auto lane, int64_t i) {
    using L = Lane<decltype(lane)>;
    const auto ds = fma_(L::load(s + i), L::splat(h), L::splat(-max_s));
    store(e_q + i, exp_t.template apply<true, FOLD>(ds));
    store(e_p + i, exp_t.template apply<true, FOLD>(fma_(L::load(t + i), L::splat(h), L::splat(-max_t))));
    if constexpr (CE && S1 == rowmath::kStudent1Exp) store(e_1 + i, exp_1(ds));
  });
  jsd_log_m<C>(e_q, e_p, n, f.inv_zq, f.inv_zp, coefficients.beta, log_m);
  chunk_grad_kept_jsd<C, CE, S1>(s, KeptExps<C>{e_q, e_p, e_1, log_m}, n, coefficients, grad_row, out);
}
KDFAST_FILLED_BUFFERS_END

// TVD's second sweep over one chunk on the lanes: acc0 += |q − p|, acc1 += q sign(q − p), with
// q = exp(ds κ) inv_zq and p = exp(dt κ) inv_zp on the row's frame, formed as the gradient forms them.
// The vector lanes read the exponentials the statistics sweep kept (`kept`); the scalar tail
// computes them from s and t (which need only be valid there), as that sweep did.
template <class C, bool FOLD>
void chunk_sweep_tvd(const C* s, const C* t, KeptExps<C> kept, int64_t n, const Coefficients<C>& coefficients,
                     const RowExps<C>& exps, const RowStats<C>& stats, const RowFrame<C>& frame, C& acc0, C& acc1) {
  (void)stats;
  const C h = coefficients.diff_scale;
  const C max_s = frame.base_s * h, max_t = frame.base_t * h;
  const C inv_zq = frame.inv_zq, inv_zp = frame.inv_zp;
  const ExpLanes<C> exp_t = exps.t;  // a local copy, as in chunk_stats
  const C* kq = kept.q;
  const C* kp = kept.p;
  LaneSums<C, 2> acc;
  sweep_lanes<C>(n, [&](auto lane, int64_t i) {
    using L = Lane<decltype(lane)>;
    constexpr bool kFromKept = !std::is_same_v<decltype(lane), C>;
    auto* sums = acc.sums(lane);
    decltype(lane) e_q, e_p;
    if constexpr (kFromKept) {
      e_q = L::load(kq + i);
      e_p = L::load(kp + i);
    } else {
      e_q = exp_t.template apply<true, FOLD>(fma_(L::load(s + i), L::splat(h), L::splat(-max_s)));
      e_p = exp_t.template apply<true, FOLD>(fma_(L::load(t + i), L::splat(h), L::splat(-max_t)));
    }
    const auto q = e_q * L::splat(inv_zq);
    const auto p = e_p * L::splat(inv_zp);
    // |q − p| as max − min and the sign by comparisons: equal q and p give exactly 0.
    sums[0] = sums[0] + (max_(q, p) - min_(q, p));
    sums[1] = sums[1] + (where_greater(q, p, q) - where_greater(p, q, q));
  });
  acc0 += acc.total(0);
  acc1 += acc.total(1);
}

// The divergence's gradient term of one element on the lanes, kd_factor dD/db, for the
// divergences whose gradient needs only q and p: forward_kl kd (q − p), TVD
// kd q (sign(q − p)/2 − aux).
template <Divergence D, class V, class C>
inline V lanes_divergence_grad(V q, V p, C kd_factor, C aux) {
  using L = Lane<V>;
  if constexpr (D == Divergence::ForwardKL) {
    (void)aux;
    return L::splat(kd_factor) * (q - p);
  } else {
    static_assert(D == Divergence::TVD, "lanes gradient: forward_kl or tvd");
    const V half_sign = where_greater(q, p, L::splat(C(0.5))) - where_greater(p, q, L::splat(C(0.5)));
    return L::splat(kd_factor) * (q * (half_sign - L::splat(aux)));
  }
}

// The PolyGrad gradient of one element on the lanes, from e_q = exp(ds κ), e_p = exp(dt κ) and
// (CE at T other than 1, 2, 4) e_1 = exp(ds / h), all on the row's frame.
template <bool CE, bool KD, int S1, class V, class C>
inline V lanes_poly_grad(V e_q, V e_p, V e_1, const PolyGrad<C>& w) {
  using L = Lane<V>;
  V value;
  if constexpr (CE && (S1 == 2 || S1 == 4)) {
    V power = e_q;
    if constexpr (S1 == 4) power = (e_q * e_q) * e_q;
    value = e_q * fma_(L::splat(w.b), power, L::splat(w.a));
  } else {
    value = e_q * L::splat(w.a);
    if constexpr (CE && S1 == rowmath::kStudent1Exp) value = fma_(L::splat(w.b), e_1, value);
  }
  if constexpr (KD) value = fma_(L::splat(w.neg_c), e_p, value);
  if constexpr (CE) value = value - L::splat(w.d);
  return value;
}

// reverse_kl's gradient term of one element on the lanes (rowmath::reverse_kl_grad):
// ((q a) ((ds − dt) + c)) b where q > 0, else 0.
template <class V, class C>
inline V lanes_reverse_kl_grad(V q, V ds, V dt, const GradRow<C>& g) {
  using L = Lane<V>;
  return where_positive(q, ((q * L::splat(g.rkl_a)) * ((ds - dt) + L::splat(g.rkl_c))) * L::splat(g.rkl_b));
}

// forward_kl's, reverse_kl's and TVD's gradient of one chunk on the lanes (chunk_grad's for
// them): q = exp(ds/T) / Z_q and p = exp(dt/T) / Z_p with the row's sums Z = exp(log-sum), so
// each element takes the lanes' exp(x/T) and one product instead of a rounded x/T - log-sum.
template <class C, Divergence D, bool CE, bool KD, int S1, bool FOLD>
void chunk_grad_lanes(const C* s, const C* t, int64_t n, const Coefficients<C>& coefficients,
                      const RowExps<C>& exps, const ChunkGradRow<C>& grad_row, C* out) {
  const GradRow<C> g = grad_row.row;
  const RowFrame<C> f = grad_row.frame;
  const C h = coefficients.diff_scale;
  const C max_s = f.base_s * h, max_t = f.base_t * h;
  const C inv_zq = f.inv_zq, inv_zp = f.inv_zp, inv_z1 = f.inv_z1;
  const ExpLanes<C> exp_t = exps.t, exp_1 = exps.one;  // local copies, as in chunk_stats
  const PolyGrad<C> poly = grad_row.poly;                // (the stores to `out` cannot alias them)
  sweep_lanes<C>(n, [&](auto lane, int64_t i) {
    using L = Lane<decltype(lane)>;
    const auto ds = fma_(L::load(s + i), L::splat(h), L::splat(-max_s));
    if constexpr (kPolyGrad<D, KD>) {
      const auto e_q = exp_t.template apply<true, FOLD>(ds);
      auto e_p = L::zero(), e_1 = L::zero();
      if constexpr (KD) e_p = exp_t.template apply<true, FOLD>(fma_(L::load(t + i), L::splat(h), L::splat(-max_t)));
      if constexpr (CE && S1 == rowmath::kStudent1Exp) e_1 = exp_1(ds);
      store(out + i, lanes_poly_grad<CE, KD, S1>(e_q, e_p, e_1, poly));
      return;
    }
    const auto q = exp_t.template apply<true, FOLD>(ds) * L::splat(inv_zq);
    auto value = L::zero();
    if constexpr (KD && D == Divergence::ReverseKL) {
      value = lanes_reverse_kl_grad(q, ds, fma_(L::load(t + i), L::splat(h), L::splat(-max_t)), g);
    } else if constexpr (KD) {
      const auto p = exp_t.template apply<true, FOLD>(fma_(L::load(t + i), L::splat(h), L::splat(-max_t))) *
                     L::splat(inv_zp);
      value = lanes_divergence_grad<D>(q, p, g.kd_factor, g.stats.aux);
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

// The gradient of one chunk from the exponentials the statistics sweep kept: the same
// arithmetic as chunk_grad_lanes on the same exp(d κ) values, without computing them again.
// reverse_kl also reads the chunk's logits s and t (its term needs ds − dt); the others ignore them.
template <class C, Divergence D, bool CE, bool KD, int S1>
void chunk_grad_kept_lanes(const C* s, const C* t, KeptExps<C> kept, int64_t n, const Coefficients<C>& coefficients,
                           const ChunkGradRow<C>& grad_row, C* out) {
  const GradRow<C> g = grad_row.row;
  const RowFrame<C> f = grad_row.frame;
  const C h = coefficients.diff_scale;
  const C max_s = f.base_s * h, max_t = f.base_t * h;
  const C inv_zq = f.inv_zq, inv_zp = f.inv_zp, inv_z1 = f.inv_z1;
  const C* kq = kept.q;
  const C* kp = kept.p;
  const C* k1 = kept.one;
  const PolyGrad<C> poly = grad_row.poly;  // a local copy: the stores to `out` cannot alias it
  sweep_lanes<C>(n, [&](auto lane, int64_t i) {
    using L = Lane<decltype(lane)>;
    if constexpr (kPolyGrad<D, KD>) {
      const auto e_q = L::load(kq + i);
      auto e_p = L::zero(), e_1 = L::zero();
      if constexpr (KD) e_p = L::load(kp + i);
      if constexpr (CE && S1 == rowmath::kStudent1Exp) e_1 = L::load(k1 + i);
      store(out + i, lanes_poly_grad<CE, KD, S1>(e_q, e_p, e_1, poly));
      return;
    }
    const auto q = L::load(kq + i) * L::splat(inv_zq);
    auto value = L::zero();
    if constexpr (KD && D == Divergence::ReverseKL) {
      value = lanes_reverse_kl_grad(q, fma_(L::load(s + i), L::splat(h), L::splat(-max_s)),
                                    fma_(L::load(t + i), L::splat(h), L::splat(-max_t)), g);
    } else if constexpr (KD) {
      value = lanes_divergence_grad<D>(q, L::load(kp + i) * L::splat(inv_zp), g.kd_factor, g.stats.aux);
    }
    if constexpr (CE) {
      auto r = q;  // T == 1
      if constexpr (S1 == rowmath::kStudent1Exp) r = L::load(k1 + i) * L::splat(inv_z1);
      if constexpr (S1 == 2 || S1 == 4) r = rowmath::integer_power<S1>(q) * L::splat(g.r_scale);
      value = fma_(L::splat(g.ce_factor), r - L::splat(g.smooth), value);
    }
    store(out + i, value);
  });
}

// The kept-exponential gradient of one chunk: JSD's with its KD term by chunk_grad_kept_jsd
// (it also reads log m and the student logits), the others' by chunk_grad_kept_lanes.
template <class C, Divergence D, bool CE, bool KD, int S1>
void chunk_grad_kept(const C* s, const C* t, KeptExps<C> kept, int64_t n, const Coefficients<C>& coefficients,
                     const ChunkGradRow<C>& grad_row, C* out) {
  if constexpr (D == Divergence::JSD && KD) {
    chunk_grad_kept_jsd<C, CE, S1>(s, kept, n, coefficients, grad_row, out);
  } else {
    chunk_grad_kept_lanes<C, D, CE, KD, S1>(s, t, kept, n, coefficients, grad_row, out);
  }
}

// Gradient of one chunk (before the label fix-up) over the logits, written to `out`: JSD's
// with its KD term by chunk_grad_jsd, the others' (and JSD's cross-entropy alone) by
// chunk_grad_lanes above.
template <class C, Divergence D, bool CE, bool KD, int S1, bool FOLD>
void chunk_grad(const C* s, const C* t, int64_t n, const Coefficients<C>& coefficients, const RowExps<C>& exps,
                const ChunkGradRow<C>& grad_row, C* out) {
  if constexpr (D == Divergence::JSD && KD) {
    chunk_grad_jsd<C, CE, S1, FOLD>(s, t, n, coefficients, exps, grad_row, out);
  } else {
    chunk_grad_lanes<C, D, CE, KD, S1, FOLD>(s, t, n, coefficients, exps, grad_row, out);
  }
}

// ---- selection of the chunk-math instantiation for a call's runtime options ----

template <class C>
using StatsFn = void (*)(const C*, const C*, int64_t, const Coefficients<C>&, const RowExps<C>&, RowPartial<C>&,
                         KeptExps<C>, C&, C&);
template <class C>
using KeptGradFn = void (*)(const C*, const C*, KeptExps<C>, int64_t, const Coefficients<C>&, const ChunkGradRow<C>&,
                            C*);
template <class C>
using SweepFn = void (*)(const C*, const C*, KeptExps<C>, int64_t, const Coefficients<C>&, const RowExps<C>&,
                         const RowStats<C>&, const RowFrame<C>&, C&, C&);
template <class C>
using GradFn = void (*)(const C*, const C*, int64_t, const Coefficients<C>&, const RowExps<C>&,
                        const ChunkGradRow<C>&, C*);

// FOLD: the lanes' exp with folded coefficients (exp_scalar.h), chosen per call where foldable;
// the other chunk functions do not use the lanes' exp and ignore it.
template <class C, Divergence D, bool KD, bool SMOOTH, bool FOLD, bool KEEP>
StatsFn<C> pick_stats_mode(int student_1_mode) {
  switch (student_1_mode) {
    case rowmath::kStudent1Exp: return chunk_stats<C, D, KD, rowmath::kStudent1Exp, SMOOTH, FOLD, KEEP>;
    case 2: return chunk_stats<C, D, KD, 2, SMOOTH, FOLD, KEEP>;
    case 4: return chunk_stats<C, D, KD, 4, SMOOTH, FOLD, KEEP>;
    default: return chunk_stats<C, D, KD, rowmath::kStudent1None, SMOOTH, FOLD, KEEP>;
  }
}

template <class C, Divergence D, bool FOLD, bool KEEP = false>
StatsFn<C> pick_stats(bool kd, int student_1_mode, bool smooth) {
  if (kd) {
    return smooth ? pick_stats_mode<C, D, true, true, FOLD, KEEP>(student_1_mode)
                  : pick_stats_mode<C, D, true, false, FOLD, KEEP>(student_1_mode);
  }
  return smooth ? pick_stats_mode<C, D, false, true, FOLD, KEEP>(student_1_mode)
                : pick_stats_mode<C, D, false, false, FOLD, KEEP>(student_1_mode);
}

template <class C, Divergence D, bool KD>
KeptGradFn<C> pick_kept_grad_mode(int student_1_mode) {
  switch (student_1_mode) {
    case rowmath::kStudent1Exp: return chunk_grad_kept<C, D, true, KD, rowmath::kStudent1Exp>;
    case 2: return chunk_grad_kept<C, D, true, KD, 2>;
    case 4: return chunk_grad_kept<C, D, true, KD, 4>;
    default: return chunk_grad_kept<C, D, true, KD, rowmath::kStudent1None>;
  }
}

template <class C, Divergence D>
KeptGradFn<C> pick_kept_grad(bool ce, bool kd, int student_1_mode) {
  if (!ce) return chunk_grad_kept<C, D, false, true, rowmath::kStudent1None>;
  return kd ? pick_kept_grad_mode<C, D, true>(student_1_mode) : pick_kept_grad_mode<C, D, false>(student_1_mode);
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
  GradFn<C> grad;
  // All but float64 reverse_kl (else null): the statistics sweep that keeps its exponentials,
  // and the gradient (JSD and TVD: also their second sweep, which exists in this form only) from them.
  StatsFn<C> stats_keep;
  KeptGradFn<C> grad_kept;
  SweepFn<C> sweep_kept;
  bool kept_grad_reads_logits;   // grad_kept also reads the chunk's s and t (reverse_kl, JSD)
  bool kept_sweep_reads_logits;  // sweep_kept reads all of the chunk's s and t (JSD), not only its scalar tail
  bool keeps_log_m;              // the kept sets hold JSD's log m as well
};

template <class C, Divergence D, bool FOLD>
ChunkKernels<C> pick_for(const Coefficients<C>& k) {
  ChunkKernels<C> kernels;
  kernels.stats = pick_stats<C, D, FOLD>(k.need_kd, k.student_1_mode, k.need_ce && k.label_smoothing > C(0));
  kernels.sweep_kept = nullptr;
  kernels.kept_sweep_reads_logits = D == Divergence::JSD;
  kernels.keeps_log_m = D == Divergence::JSD && k.need_kd;
  if constexpr (D == Divergence::JSD) kernels.sweep_kept = k.need_kd ? chunk_sweep_jsd_kept<C> : nullptr;
  if constexpr (D == Divergence::TVD) kernels.sweep_kept = k.need_kd ? chunk_sweep_tvd<C, FOLD> : nullptr;
  kernels.grad = pick_grad<C, D, FOLD>(k.need_ce, k.need_kd, k.student_1_mode);
  kernels.stats_keep = nullptr;
  kernels.grad_kept = nullptr;
  kernels.kept_grad_reads_logits = (D == Divergence::ReverseKL || D == Divergence::JSD) && k.need_kd;
  // float64 reverse_kl recomputes q in its gradient: with no vector lanes, every element would
  // come from the kept path, whose code the compiler may contract differently from the
  // recomputing path, and the bracket's cancellation would show that as more than 2 ulp.
  constexpr bool kKeep = !(D == Divergence::ReverseKL && std::is_same_v<C, double>);
  if constexpr (kKeep) {
    kernels.stats_keep = pick_stats<C, D, FOLD, true>(k.need_kd, k.student_1_mode, k.need_ce && k.label_smoothing > C(0));
    kernels.grad_kept = pick_kept_grad<C, D>(k.need_ce, k.need_kd, k.student_1_mode);
  }
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


}  // namespace
}  // namespace KDFAST_CPU_VARIANT
}  // namespace cpu
}  // namespace kdfast
