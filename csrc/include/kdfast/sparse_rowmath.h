// Per-row math of top-k soft labels (compression and the sparse KD loss), shared by the CPU
// and CUDA kernels (KDFAST_HD = __host__ __device__ under nvcc).
// Compression: `TopKCandidate` and `candidate_before` define the selection order (larger
// logit first, ties: lower vocabulary index first); the tail mass is a log-sum-exp kept
// relative to its own running maximum (`TailSum`), so it stays exact when tiny.
// Sparse loss, per row with b = s/T: the student's bucket log-probabilities log Q_j (kept
// tokens, plus the tail bucket in "bucket" mode) and the teacher's renormalised log P_j give,
// per bucket, the divergence term d_j and w_j = Q_j ∂D/∂Q_j (`bucket_term`). With
// Ḡ = Σ_j w_j, the gradient of D with respect to b_u is w_j − Ḡ Q_j for a kept token u = K_j
// and exp(b_u − log Σ_tail e^b) (w_tail − Ḡ Q_tail) for a tail token u. Formulas match
// kdfast.reference.sparse_kd_loss (the float64 oracle) and docs/design.md.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "kdfast/rowmath.h"
#include "kdfast/types.h"

namespace kdfast {
namespace sparse {

using rowmath::neg_inf;

// ---- scalar loads of the small per-row inputs (indices, teacher log-probabilities) ----

KDFAST_HD float bf16_bits_to_float(uint16_t v) {
  return rowmath::bits_to_float(static_cast<int32_t>(static_cast<uint32_t>(v) << 16));
}

KDFAST_HD float f16_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  float magnitude;
  if (exponent == 0x1fu) {
    magnitude = rowmath::bits_to_float(static_cast<int32_t>(0x7f800000u | (mantissa << 13)));
  } else {
    // Normal and subnormal halves: shift into float position and rebias by 2^112.
    magnitude = rowmath::bits_to_float(static_cast<int32_t>((h & 0x7fffu) << 13)) * 5.192296858534828e33f;
  }
  return rowmath::bits_to_float(static_cast<int32_t>(static_cast<uint32_t>(rowmath::float_to_bits(magnitude)) | sign));
}

// Element i of a float32/bfloat16/float16/float64 array, in the compute type C.
template <class C>
KDFAST_HD C load_value(const void* data, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::Float32: return static_cast<C>(static_cast<const float*>(data)[i]);
    case DType::BFloat16: return static_cast<C>(bf16_bits_to_float(static_cast<const uint16_t*>(data)[i]));
    case DType::Float16: return static_cast<C>(f16_bits_to_float(static_cast<const uint16_t*>(data)[i]));
    case DType::Float64: return static_cast<C>(static_cast<const double*>(data)[i]);
  }
  return C(0);
}

// Element i of an int64/int32/int16/uint16 index array.
KDFAST_HD int64_t load_index(const void* data, IndexType type, int64_t i) {
  switch (type) {
    case IndexType::Int64: return static_cast<const int64_t*>(data)[i];
    case IndexType::Int32: return static_cast<const int32_t*>(data)[i];
    case IndexType::Int16: return static_cast<const int16_t*>(data)[i];
    case IndexType::UInt16: return static_cast<const uint16_t*>(data)[i];
  }
  return -1;
}

// ---- compression ----

// A selection candidate: its logit (the selection key) and vocabulary index.
template <class C>
struct TopKCandidate {
  C value;
  int32_t index;
};

// The selection order: larger logit first; equal logits: lower index first.
template <class C>
KDFAST_HD bool candidate_before(const TopKCandidate<C>& a, const TopKCandidate<C>& b) {
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

// log Σ exp(x_i / T) over a streamed set of raw logits, kept as (max, Σ exp((x_i − max)/T)).
// Adding partial sums moves them onto the larger maximum; an empty set has max = −inf.
struct TailSum {
  double max_value = -std::numeric_limits<double>::infinity();
  double sum = 0.0;

  KDFAST_HD void add(double part_max, double part_sum, double inv_temperature) {
    if (!(part_sum > 0.0) && part_sum == part_sum) return;  // empty part (NaN still propagates)
    if (part_max > max_value) {
      sum = (max_value == -std::numeric_limits<double>::infinity() ? 0.0 : sum * ::exp((max_value - part_max) * inv_temperature)) + part_sum;
      max_value = part_max;
    } else {
      sum += part_sum * ::exp((part_max - max_value) * inv_temperature);
    }
  }
  // log Σ exp((x_i − reference) / T); −inf for an empty set.
  KDFAST_HD double relative_log_sum_exp(double reference, double inv_temperature) const {
    if (sum != sum) return sum;
    return sum > 0.0 ? (max_value - reference) * inv_temperature + ::log(sum) : -std::numeric_limits<double>::infinity();
  }
};

// log(exp(x) + exp(y)) without overflow; −inf when both are −inf, NaN when either is NaN.
template <class C>
KDFAST_HD C log_add_exp(C x, C y) {
  if (x != x || y != y) return x + y;
  const C hi = x > y ? x : y;
  const C lo = x > y ? y : x;
  if (hi == neg_inf<C>()) return hi;
  return hi + ::log1p(::exp(lo - hi));
}

// ---- sparse KD loss ----

// The reference a log-normaliser of the row is taken relative to: the largest student logit it
// covers (the kept tokens, and the tail where it counts: in "bucket" mode for the buckets,
// always for the cross-entropy), 0 when there is none. Relative log-normalisers stay small where
// the probabilities are not negligible, so that log q of a logit near the maximum never comes
// out of a cancellation between two numbers like s/T ~ 1e25 (which a fused multiply-add, or any
// other rounding, would turn into a huge error). The backward pass recomputes the references
// from the kept logits and the stored tail maximum.
KDFAST_HD double reference_logit(double kept_max, double tail_max) {
  const double top = kept_max > tail_max ? kept_max : tail_max;
  return top == -std::numeric_limits<double>::infinity() ? 0.0 : top;
}

// Scalars of one sparse-loss call.
template <class C>
struct SparseCoefficients {
  C inv_temperature, alpha, beta, label_smoothing, divergence_scale;
  bool need_ce, need_kd, bucket;
  Divergence divergence;
};

template <class C>
inline SparseCoefficients<C> make_sparse_coefficients(const KDOptions& o, SparseTail tail) {
  SparseCoefficients<C> k;
  k.inv_temperature = static_cast<C>(1.0 / o.temperature);
  k.alpha = static_cast<C>(o.alpha);
  k.beta = static_cast<C>(o.beta);
  k.label_smoothing = static_cast<C>(o.label_smoothing);
  k.divergence_scale = static_cast<C>(o.divergence_scale);
  k.need_ce = o.alpha > 0.0;
  k.need_kd = o.alpha < 1.0;
  k.bucket = tail == SparseTail::Bucket;
  k.divergence = o.divergence;
  return k;
}

// Whether a row's sparse loss is defined: no NaN among the student logits it reads
// (`nan_count`), and finite log-normalisers of the distributions it uses (student buckets and
// teacher buckets for the divergence, the full student row at T = 1 for the cross-entropy).
// A NaN or +inf input makes one of them NaN or +inf, a row of only −inf logits (or
// log-probabilities) makes it −inf. Where this is false the kernels make the row's loss, and
// its gradient, NaN, as kdfast.reference does.
template <class C>
KDFAST_HD bool row_defined(const SparseCoefficients<C>& k, int64_t nan_count, double student_norm, double teacher_norm,
                           double lse_1) {
  const double inf = std::numeric_limits<double>::infinity();
  const bool kd_ok = !k.need_kd || (student_norm > -inf && student_norm < inf && teacher_norm > -inf && teacher_norm < inf);
  const bool ce_ok = !k.need_ce || (lse_1 > -inf && lse_1 < inf);
  return nan_count == 0 && kd_ok && ce_ok;
}

// One bucket's divergence term d and gradient weight w = Q ∂D/∂Q, from log P and log Q:
//   forward_kl  d = P (log P − log Q)                    w = −P
//   reverse_kl  d = Q (log Q − log P)                    w = Q (log Q − log P + 1)
//   jsd         d = β P log(P/M) + (1−β) Q log(Q/M)      w = (1−β) Q log(Q/M),  M = βP + (1−β)Q
//   tvd         d = ½ |P − Q|                            w = ½ Q sign(Q − P)
// Terms whose probability is 0 are exactly 0 (0 log 0 = 0).
template <class C>
struct BucketTerm {
  C divergence;
  C weight;
};

template <class C>
KDFAST_HD BucketTerm<C> bucket_term(C log_p, C log_q, Divergence divergence, C beta) {
  const C p = log_p == neg_inf<C>() ? C(0) : ::exp(log_p);
  const C q = log_q == neg_inf<C>() ? C(0) : ::exp(log_q);
  BucketTerm<C> term{C(0), C(0)};
  switch (divergence) {
    case Divergence::ForwardKL:
      term.divergence = p > C(0) ? p * (log_p - log_q) : C(0);
      term.weight = -p;
      break;
    case Divergence::ReverseKL:
      term.divergence = q > C(0) ? q * (log_q - log_p) : C(0);
      term.weight = q > C(0) ? q * (log_q - log_p + C(1)) : C(0);
      break;
    case Divergence::JSD: {
      // log M = log(β e^{log P} + (1−β) e^{log Q}) from the log-probabilities, so that
      // tiny buckets keep their relative precision.
      const C weighted_p = log_p + ::log(beta);
      const C weighted_q = log_q + ::log1p(-beta);
      const C log_m = log_add_exp(weighted_p, weighted_q);
      const C kl_pm = p > C(0) ? p * (log_p - log_m) : C(0);
      const C kl_qm = q > C(0) ? q * (log_q - log_m) : C(0);
      term.divergence = beta * kl_pm + (C(1) - beta) * kl_qm;
      term.weight = (C(1) - beta) * kl_qm;
      break;
    }
    case Divergence::TVD: {
      const C diff = q - p;
      term.divergence = C(0.5) * (diff < C(0) ? -diff : diff);
      term.weight = diff > C(0) ? C(0.5) * q : (diff < C(0) ? C(-0.5) * q : C(0));
      break;
    }
  }
  return term;
}

}  // namespace sparse
}  // namespace kdfast
