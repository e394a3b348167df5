// The sparse loss's gradient of one row, written by one block, shared by the backward kernel
// (sparse_kd_backward.cu: one block per row) and the one-pass training kernel
// (sparse_kd_loss.cu: the block that has just streamed the row's statistics).
// Contract: the row's row_stats are as the forward pass wrote them (types.h, kSparseRowStats
// columns); `g` is grad_output times the reduction's scale. An ignored row gets zeros, a row
// whose loss is NaN (a NaN input, a bad label or bad kept indices) gets NaN; otherwise the
// block streams the student row once and writes every element once by the tail formula (16-byte
// stores when the student and gradient rows share one pad, host-checked), then, after a block
// barrier, overwrites the k kept positions with their own gradient (the CPU's tail_chunk_grad
// and kept-slot formulas, in double for the kept slots). Every thread of the block must call it
// (it synchronises the block); it writes nothing outside the row. The gradient never aliases the
// student (loads take the read-only path).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "kd_loss_cuda_common.cuh"
#include "sparse_kd_common.cuh"
#include "kdfast/sparse_rowmath.h"
#include "kdfast/types.h"

namespace kdfast {
namespace cuda {
namespace {

struct SparseGradientParams {
  const void* student;
  int64_t student_row_stride;
  SoftLabelView soft_labels;
  const int64_t* labels;
  int64_t rows;
  int vocab;
  int64_t ignore_index;
  Reduction reduction;
  bool kd_tail;       // the tail bucket's gradient reaches the non-kept entries
  bool ce_from_tail;  // cross-entropy's r of a tail entry from the tail bucket's exp (T == 1)
  const double* row_stats;
  const double* valid_rows;
  void* grad_student;  // [rows, vocab] contiguous, student dtype
};

inline SparseGradientParams make_gradient_params(const SparseKDInputs& args, const SparseCoefficients<double>& k,
                                                 const double* row_stats, const double* valid_rows,
                                                 void* grad_student) {
  const SparsePlan plan = make_plan(k, args.options.temperature);
  SparseGradientParams p;
  p.student = args.student;
  p.student_row_stride = args.student_row_stride;
  p.soft_labels = args.soft_labels;
  p.labels = args.labels;
  p.rows = args.rows;
  p.vocab = static_cast<int>(args.vocab);
  p.ignore_index = args.options.ignore_index;
  p.reduction = args.options.reduction;
  p.kd_tail = k.need_kd && k.bucket;
  p.ce_from_tail = k.need_ce && p.kd_tail && !plan.tail_at_1;
  p.row_stats = row_stats;
  p.valid_rows = valid_rows;
  p.grad_student = grad_student;
  return p;
}

template <class SX, class C, bool kVectorized>
__device__ __forceinline__ void sparse_row_gradient(const SparseGradientParams& p, const SparseCoefficients<double>& k,
                                                    int64_t row, double g) {
  constexpr int kW = BatchLayout<C>::kWidth;
  const int vocab = p.vocab;
  const int team = static_cast<int>(blockDim.x);
  typename SX::Raw* g_row = static_cast<typename SX::Raw*>(p.grad_student) + row * static_cast<int64_t>(vocab);
  // Vectorised: the gradient and student rows share one pad on the 16-byte grid (host-checked).
  const int pad = kVectorized ? row_pad<SX>(g_row) : 0;
  const int groups = (vocab + pad + kW - 1) / kW;
  const int64_t label = p.labels != nullptr ? p.labels[row] : int64_t(-1);
  const bool ignored = p.labels != nullptr && label == p.ignore_index;
  const double* st = p.row_stats + row * kSparseRowStats;
  if (!ignored && st[kSparseLossColumn] != st[kSparseLossColumn]) {  // a NaN row loss: a NaN gradient row
    C nans[kW];
#pragma unroll
    for (int e = 0; e < kW; ++e) nans[e] = std::numeric_limits<C>::quiet_NaN();
    for (int i = threadIdx.x; i < groups; i += team) store_group<SX, C, kVectorized>(g_row, i * kW - pad, vocab, nans);
    return;
  }
  const bool tail_gradient = !ignored && (p.kd_tail || k.need_ce);

  // Ignored rows, and rows whose tail entries get no gradient (no tail bucket, no cross-entropy,
  // so no label step either): zeros first.
  if (!tail_gradient) {
    C zeros[kW];
#pragma unroll
    for (int e = 0; e < kW; ++e) zeros[e] = C(0);
    for (int i = threadIdx.x; i < groups; i += team) store_group<SX, C, kVectorized>(g_row, i * kW - pad, vocab, zeros);
    if (ignored) return;
  }

  const double inv_t = k.inv_temperature;
  const double kd_factor = k.need_kd ? g * (1.0 - k.alpha) * k.divergence_scale * inv_t : 0.0;
  const double ce_factor = k.need_ce ? g * k.alpha : 0.0;
  const double smooth = k.label_smoothing / static_cast<double>(vocab);
  const double tail_max = st[0], tail_log_sum_t = st[1], student_norm = st[2], lse_1 = st[3];
  const double teacher_norm = st[4], g_bar = st[5], tail_coeff = st[6];
  const bool has_tail = tail_max != -kInfinity;
  const double tail_ref = has_tail ? tail_max : 0.0;
  const double log_sum_t = has_tail && p.kd_tail ? tail_log_sum_t : 0.0;
  const double label_step = ce_factor * (1.0 - k.label_smoothing);
  const bool label_in_row = k.need_ce && label >= 0 && label < vocab;

  const SoftLabelView& labels = p.soft_labels;
  const int kk = static_cast<int>(labels.k);
  const typename SX::Raw* s_row = static_cast<const typename SX::Raw*>(p.student) + row * p.student_row_stride;
  bool label_kept = false;
  double kept_max[1] = {-kInfinity};
  for (int j = threadIdx.x; j < kk; j += team) {
    const int64_t index = sparse::load_index(labels.indices, labels.index_type, row * kk + j);
    label_kept = label_kept || index == label;
    kept_max[0] = fmax(kept_max[0], static_cast<double>(SX::to_compute(load_element<SX>(s_row + index))));
  }
  label_kept = __syncthreads_or(label_kept ? 1 : 0) != 0;
  __shared__ BlockScratch<1> max_scratch;
  block_reduce(kept_max, max_scratch, MaxOp{});
  // The forward pass's reference logits (its log-normalisers are relative to them).
  const double kd_reference = sparse::reference_logit(kept_max[0], k.bucket ? tail_max : -kInfinity);
  const double reference = sparse::reference_logit(kept_max[0], tail_max);
  const double q_tail =
      has_tail && p.kd_tail ? ::exp((tail_max - kd_reference) * inv_t + tail_log_sum_t - student_norm) : 0.0;

  if (tail_gradient) {
    // Tail formula for every element (kept positions are overwritten below), as the CPU's
    // tail_chunk_grad: kd_factor tail_coeff e + ce_factor (r − eps/V).
    const C c_tail_ref = static_cast<C>(tail_ref), c_inv_t = static_cast<C>(inv_t);
    const C c_log_sum_t = static_cast<C>(log_sum_t), c_kd_tail = static_cast<C>(kd_factor * tail_coeff);
    const C c_q_tail = static_cast<C>(q_tail), c_ce = static_cast<C>(ce_factor), c_smooth = static_cast<C>(smooth);
    const C c_log_r_offset = static_cast<C>(reference - tail_ref + lse_1);
    const C c_label_step = static_cast<C>(label_step);
    const ThreadBatches<C> batches(vocab, pad, 0, groups, team, static_cast<int>(threadIdx.x));
    stream_batches<SX, SX, C, kVectorized, true>(
        s_row, s_row, vocab, batches, false, [&](const C* s, const C*, const int* first, auto) {
          C out[kW];
#pragma unroll
          for (int e = 0; e < kW; ++e) {
            const C centred = s[e] - c_tail_ref;
            C value = C(0);
            if (p.kd_tail) {
              const C arg = centred * c_inv_t - c_log_sum_t;
              const C ex = rowmath::exp_c(arg < C(0) ? arg : C(0));
              value += c_kd_tail * ex;
              if (k.need_ce && p.ce_from_tail) value += c_ce * (ex * c_q_tail - c_smooth);
            }
            if (k.need_ce && !p.ce_from_tail) {
              const C arg = centred - c_log_r_offset;
              value += c_ce * (rowmath::exp_c(arg < C(0) ? arg : C(0)) - c_smooth);
            }
            out[e] = value;
          }
          if (label_in_row && !label_kept && label >= first[0] && label < first[0] + kW) {
#pragma unroll
            for (int e = 0; e < kW; ++e) {
              if (first[0] + e == label) out[e] -= c_label_step;
            }
          }
          store_group<SX, C, kVectorized>(g_row, first[0], vocab, out);
        });
  }
  __syncthreads();  // the streamed stores come before the kept entries' own values

  for (int j = threadIdx.x; j < kk; j += team) {
    const int64_t index = sparse::load_index(labels.indices, labels.index_type, row * kk + j);
    if (index < 0 || index >= vocab) continue;  // a bad row (NaN statistics): never write outside it
    const double logit = static_cast<double>(SX::to_compute(load_element<SX>(s_row + index)));
    double value = 0.0;
    if (k.need_kd) {
      const double log_p = sparse::load_value<double>(labels.logprobs, labels.logprob_dtype, row * kk + j) - teacher_norm;
      const double log_q = (logit - kd_reference) * inv_t - student_norm;
      const auto term = sparse::bucket_term<double>(log_p, log_q, k.divergence, k.beta);
      const double q = log_q == -kInfinity ? 0.0 : ::exp(log_q);
      value += kd_factor * (term.weight - g_bar * q);
    }
    if (k.need_ce) value += ce_factor * (::exp((logit - reference) - lse_1) - smooth);
    C stored = static_cast<C>(value);
    if (index == label) stored -= static_cast<C>(label_step);
    g_row[index] = SX::from_compute(stored);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace kdfast
