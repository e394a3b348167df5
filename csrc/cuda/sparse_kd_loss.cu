// CUDA kernels of the sparse KD loss against top-k soft labels: kdfast::sparse_kd_forward_cuda
// and kdfast::sparse_kd_backward_cuda (declared in bindings.cpp).
// Contract: the same as sparse_kd_forward_cpu / sparse_kd_backward_cpu (types.h
// SparseKDForwardArgs / SparseKDBackwardArgs; per-bucket math in sparse_rowmath.h, shared with
// the CPU): row_stats [rows, kSparseRowStats] in float64 with the same columns, the loss in the
// compute dtype ([rows] for reduction none, else one element: sum, mean over valid rows (0 when
// none), batchmean = sum / rows), valid_rows in float64, and the student gradient in the
// student dtype. Two differences from the CPU, as for the dense CUDA kernels: a label outside
// [0, V) that is not ignore_index, or a row of soft-label indices with one outside [0, V) or a
// repeat, is not counted (that would need a host synchronisation); the row's statistics and
// loss are NaN (so a reduced loss is NaN too), its gradient is NaN, nothing is written outside
// the row, and the forward returns zero counts. Everything is enqueued on `stream`; nothing
// synchronises or allocates (CUDA-graph safe). The vocabulary is limited by a per-row bitmap
// of V bits in shared memory: at most kCudaMaxSparseVocab (types.h, 2^20: 128 KiB), and less
// on devices that offer less shared memory per block.
//
// Forward (sparse_kd_forward_rows_kernel, one block per row): the kept indices are checked and
// marked in the shared bitmap, then the student row is streamed once with 16-byte loads (per
// row: scalar head to the first 16-byte boundary, vector body, scalar tail, as the dense
// kernels; next batch in flight); every non-kept element enters the thread's tail log-sum-exp at T and/or at
// 1, relative to the thread's running maximum; the label-smoothing total adds every element.
// The threads' parts are combined in a fixed order, the k kept logits are read back (from L2),
// and the k + 1 bucket terms are formed in double with sparse::bucket_term, as on the CPU. In
// "renormalize" mode without cross-entropy only the kept logits are read. A one-block kernel
// then reduces the row losses in a fixed order (deterministic).
// Backward (sparse_kd_backward_kernel, one block per row): the row is streamed once more and
// every gradient element written once with 16-byte stores by the tail formula; after a block
// barrier the threads overwrite the k kept positions with their own gradient (scattered 2- or
// 4-byte stores to lines the block just wrote). Bytes per element: forward one read of the
// student, backward one read of the student and one write of the gradient.
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "kd_loss_cuda_common.cuh"
#include "sparse_bitmap.cuh"
#include "kdfast/kdfast.h"
#include "kdfast/sparse_rowmath.h"
#include "topk_cuda_common.cuh"

namespace kdfast {
namespace cuda {
namespace {

using sparse::SparseCoefficients;

constexpr int kSparseMaxBlock = 512;
constexpr int kSparseWarps = kSparseMaxBlock / 32;
constexpr int kSparseLossColumn = 7;
constexpr double kInfinity = std::numeric_limits<double>::infinity();

// What a call needs streamed from the student row (the CPU kernel's StreamPlan).
struct SparsePlan {
  bool tail_at_t;  // log-sum-exp of the non-kept s/T: the tail bucket
  bool tail_at_1;  // log-sum-exp of the non-kept s: cross-entropy when it cannot reuse the above
  bool smoothing;  // sum of all s: label smoothing
};

inline SparsePlan make_plan(const SparseCoefficients<double>& k, double temperature) {
  SparsePlan plan;
  plan.tail_at_t = k.bucket && k.need_kd;
  plan.tail_at_1 = k.need_ce && !(plan.tail_at_t && temperature == 1.0);
  plan.smoothing = k.need_ce && k.label_smoothing > 0.0;
  return plan;
}

struct SparseRowParams {
  const void* student;
  int64_t student_row_stride;
  SoftLabelView soft_labels;
  const int64_t* labels;
  int64_t rows;
  int vocab;
  int bitmap_words;
  int64_t ignore_index;
  SparsePlan plan;
  double temperature;
  bool write_row_losses;
  void* loss;
  double* row_stats;
};

// Block-wide reductions of N doubles (every thread ends with the result; fixed order).
template <int N>
struct BlockScratch {
  double values[kSparseWarps][N];
};

template <int N, class Op>
__device__ __forceinline__ void block_reduce(double (&values)[N], BlockScratch<N>& scratch, Op op) {
  team_all_reduce(values, scratch.values, static_cast<int>(blockDim.x), op);
}

// log Σ_j exp(x_j − max) + max from a block-reduced maximum and sum; −inf for an empty set.
__device__ __forceinline__ double finish_log_sum_exp(double max_value, double sum) {
  if (sum != sum) return sum;
  return sum > 0.0 ? max_value + ::log(sum) : -kInfinity;
}

// Marks the kept indices of `row` in the bitmap (cleared first); returns true (in every
// thread) when one is outside [0, vocab) or repeated.
__device__ __forceinline__ bool mark_kept(const SoftLabelView& labels, int64_t row, int vocab, unsigned* bitmap,
                                          int bitmap_words) {
  for (int w = threadIdx.x; w < bitmap_words; w += blockDim.x) bitmap[w] = 0u;
  __syncthreads();
  bool bad = false;
  for (int j = threadIdx.x; j < labels.k; j += blockDim.x) {
    const int64_t index = sparse::load_index(labels.indices, labels.index_type, row * labels.k + j);
    if (index < 0 || index >= vocab) {
      bad = true;
      continue;
    }
    const unsigned bit = 1u << (index & 31);
    const unsigned old = atomicOr(&bitmap[index >> 5], bit);
    bad = bad || (old & bit) != 0u;
  }
  return __syncthreads_or(bad ? 1 : 0) != 0;
}

template <class SX, class C, bool kVectorized>
__global__ void __launch_bounds__(kSparseMaxBlock)
    sparse_kd_forward_rows_kernel(SparseRowParams p, SparseCoefficients<double> k) {
  constexpr int kW = BatchLayout<C>::kWidth;
  extern __shared__ unsigned bitmap[];
  __shared__ BlockScratch<4> max_scratch;
  __shared__ BlockScratch<7> sum_scratch;
  __shared__ BlockScratch<2> term_scratch;

  const int64_t row = blockIdx.x;
  double* stats = p.row_stats + row * kSparseRowStats;
  const bool ignored = p.labels != nullptr && p.labels[row] == p.ignore_index;
  const bool bad_label = !ignored && p.labels != nullptr && (p.labels[row] < 0 || p.labels[row] >= p.vocab);
  if (ignored || bad_label) {  // block-uniform
    const double value = ignored ? 0.0 : std::numeric_limits<double>::quiet_NaN();
    if (threadIdx.x < kSparseRowStats) stats[threadIdx.x] = value;
    if (threadIdx.x == 0 && p.write_row_losses) static_cast<C*>(p.loss)[row] = static_cast<C>(value);
    return;
  }
  const int vocab = p.vocab;
  const int kk = static_cast<int>(p.soft_labels.k);
  if (mark_kept(p.soft_labels, row, vocab, bitmap, p.bitmap_words)) {
    if (threadIdx.x < kSparseRowStats) stats[threadIdx.x] = std::numeric_limits<double>::quiet_NaN();
    if (threadIdx.x == 0 && p.write_row_losses) static_cast<C*>(p.loss)[row] = std::numeric_limits<C>::quiet_NaN();
    return;
  }
  const double inv_t = k.inv_temperature;
  const typename SX::Raw* s_row = static_cast<const typename SX::Raw*>(p.student) + row * p.student_row_stride;

  // Stream the row: tails (non-kept entries) at T and at 1, the total, NaN count.
  ThreadTail<C> tail_t, tail_1;
  double total = 0.0;
  int nan_count = 0;
  if (p.plan.tail_at_t || p.plan.tail_at_1 || p.plan.smoothing) {
    const ScaledExp<C> exp_over_t(static_cast<C>(inv_t));
    const ScaledExp<C> exp_plain(C(1));
    const int pad = kVectorized ? row_pad<SX>(s_row) : 0;  // the row on the 16-byte grid
    const int groups = (vocab + pad + kW - 1) / kW;
    const ThreadBatches<C> batches(vocab, pad, 0, groups, static_cast<int>(blockDim.x), static_cast<int>(threadIdx.x));
    stream_batches<SX, SX, C, kVectorized, true>(
        s_row, s_row, vocab, batches, false, [&](const C* s, const C*, const int* first, auto) {
          const unsigned word = kept_bits(bitmap, p.bitmap_words, first[0]);
          C x[kW];
#pragma unroll
          for (int e = 0; e < kW; ++e) {
            const bool inside = in_row(first[0] + e, vocab);
            const bool is_nan = s[e] != s[e];
            nan_count += inside && is_nan ? 1 : 0;
            if (p.plan.smoothing && inside) total += static_cast<double>(s[e]);
            x[e] = ((word >> e) & 1u) || is_nan ? negative_infinity<C>() : s[e];
          }
          if (p.plan.tail_at_t) tail_t.add(x, exp_over_t);
          if (p.plan.tail_at_1) tail_1.add(x, exp_plain);
        });
  }

  // The kept logits (read back; a thread handles slots j = threadIdx.x + i * blockDim.x).
  const SoftLabelView& labels = p.soft_labels;
  double kept_max = -kInfinity, teacher_max = -kInfinity;
  for (int j = threadIdx.x; j < kk; j += blockDim.x) {
    const int64_t index = sparse::load_index(labels.indices, labels.index_type, row * kk + j);
    kept_max = fmax(kept_max, static_cast<double>(SX::to_compute(load_element<SX>(s_row + index))));
    if (k.need_kd) teacher_max = fmax(teacher_max, sparse::load_value<double>(labels.logprobs, labels.logprob_dtype, row * kk + j));
  }
  double maxima[4] = {static_cast<double>(tail_t.max_value), static_cast<double>(tail_1.max_value), kept_max,
                      teacher_max};
  block_reduce(maxima, max_scratch, MaxOp{});
  // The log-normalisers are relative to the largest student logit the row reads (as on the CPU).
  const bool streamed = p.plan.tail_at_t || p.plan.tail_at_1;
  const double tail_max = streamed ? fmax(maxima[0], maxima[1]) : -kInfinity;
  const double kd_reference = sparse::reference_logit(maxima[2], k.bucket ? tail_max : -kInfinity);
  const double reference = sparse::reference_logit(maxima[2], tail_max);
  double sums[7] = {0.0, 0.0, 0.0, 0.0, 0.0, total, static_cast<double>(nan_count)};
  if (tail_t.max_value != negative_infinity<C>()) {
    sums[0] = static_cast<double>(tail_t.sum) * ::exp((static_cast<double>(tail_t.max_value) - maxima[0]) * inv_t);
  }
  if (tail_1.max_value != negative_infinity<C>()) {
    sums[1] = static_cast<double>(tail_1.sum) * ::exp(static_cast<double>(tail_1.max_value) - maxima[1]);
  }
  for (int j = threadIdx.x; j < kk; j += blockDim.x) {
    const int64_t index = sparse::load_index(labels.indices, labels.index_type, row * kk + j);
    const double logit = static_cast<double>(SX::to_compute(load_element<SX>(s_row + index)));
    sums[2] += ::exp((logit - kd_reference) * inv_t);
    sums[3] += ::exp(logit - reference);
    if (k.need_kd) {  // relative to the largest (0 when none is finite: -inf stays -inf, NaN stays NaN)
      const double shift = maxima[3] == -kInfinity ? 0.0 : maxima[3];
      sums[4] += ::exp(sparse::load_value<double>(labels.logprobs, labels.logprob_dtype, row * kk + j) - shift);
    }
  }
  block_reduce(sums, sum_scratch, SumOp{});

  const double tail_lse_t =
      p.plan.tail_at_t ? finish_log_sum_exp((maxima[0] - kd_reference) * inv_t, sums[0]) : -kInfinity;
  const double lse_kept_t = finish_log_sum_exp(0.0, sums[2]);
  const double student_norm = k.bucket ? sparse::log_add_exp(lse_kept_t, tail_lse_t) : lse_kept_t;
  double lse_1 = student_norm;  // T == 1 in bucket mode: the full row's log-sum-exp at T
  if (p.plan.tail_at_1) {
    lse_1 = sparse::log_add_exp(finish_log_sum_exp(0.0, sums[3]), finish_log_sum_exp(maxima[1] - reference, sums[1]));
  }

  double divergence = 0.0, g_bar = 0.0, tail_coeff = 0.0, teacher_norm = 0.0;
  if (k.need_kd) {
    const double teacher_tail = k.bucket ? sparse::load_value<double>(labels.tail_logprob, labels.tail_dtype, row) : -kInfinity;
    teacher_norm = sparse::log_add_exp(finish_log_sum_exp(maxima[3] == -kInfinity ? 0.0 : maxima[3], sums[4]),
                                       teacher_tail);
    double terms[2] = {0.0, 0.0};
    for (int j = threadIdx.x; j < kk; j += blockDim.x) {
      const int64_t index = sparse::load_index(labels.indices, labels.index_type, row * kk + j);
      const double logit = static_cast<double>(SX::to_compute(load_element<SX>(s_row + index)));
      const double log_p = sparse::load_value<double>(labels.logprobs, labels.logprob_dtype, row * kk + j) - teacher_norm;
      const auto term =
          sparse::bucket_term<double>(log_p, (logit - kd_reference) * inv_t - student_norm, k.divergence, k.beta);
      terms[0] += term.divergence;
      terms[1] += term.weight;
    }
    block_reduce(terms, term_scratch, SumOp{});
    divergence = terms[0];
    g_bar = terms[1];
    if (k.bucket) {
      const double log_q_tail = tail_lse_t - student_norm;
      const auto term = sparse::bucket_term<double>(teacher_tail - teacher_norm, log_q_tail, k.divergence, k.beta);
      divergence += term.divergence;
      g_bar += term.weight;
      const double q_tail = log_q_tail == -kInfinity ? 0.0 : ::exp(log_q_tail);
      tail_coeff = term.weight - g_bar * q_tail;
    }
  }
  if (threadIdx.x != 0) return;
  double ce = 0.0;
  if (k.need_ce) {
    const double label_logit =
        static_cast<double>(SX::to_compute(load_element<SX>(s_row + p.labels[row]))) - reference;
    const double eps = k.label_smoothing;
    ce = -(1.0 - eps) * (label_logit - lse_1);
    if (eps > 0.0) ce -= eps * ((sums[5] / static_cast<double>(vocab) - reference) - lse_1);
  }
  double loss = 0.0;
  if (k.need_ce) loss += k.alpha * ce;
  if (k.need_kd) loss += (1.0 - k.alpha) * k.divergence_scale * divergence;
  // NaN in, NaN out (sparse::row_defined); the backward pass then writes a NaN gradient row.
  if (!sparse::row_defined(k, static_cast<int64_t>(sums[6]), student_norm, teacher_norm, lse_1)) {
    loss = std::numeric_limits<double>::quiet_NaN();
  }

  stats[0] = tail_max;
  stats[1] = p.plan.tail_at_t && sums[0] > 0.0 ? ::log(sums[0]) : (sums[0] != sums[0] ? sums[0] : -kInfinity);
  stats[2] = student_norm;
  stats[3] = lse_1;
  stats[4] = teacher_norm;
  stats[5] = g_bar;
  stats[6] = tail_coeff;
  stats[7] = loss;
  if (p.write_row_losses) static_cast<C*>(p.loss)[row] = static_cast<C>(loss);
}

constexpr int kSparseReduceThreads = 1024;

// One block: the reduced loss from row_stats[:, 7] (fixed order, double accumulator) and the
// number of valid rows. With reduction none only valid_rows is written.
template <class C>
__global__ void __launch_bounds__(kSparseReduceThreads)
    sparse_kd_reduce_kernel(const double* row_stats, const int64_t* labels, int64_t rows, int64_t ignore_index,
                            Reduction reduction, C* loss, double* valid_rows) {
  double total = 0.0, valid = 0.0;
  const bool want_total = reduction != Reduction::None;
  for (int64_t row = threadIdx.x; row < rows; row += kSparseReduceThreads) {
    if (want_total) total += row_stats[row * kSparseRowStats + kSparseLossColumn];
    valid += (labels == nullptr || labels[row] != ignore_index) ? 1.0 : 0.0;
  }
  __shared__ double scratch[kSparseReduceThreads / 32][2];
  double values[2] = {total, valid};
  team_all_reduce(values, scratch, kSparseReduceThreads, SumOp{});
  if (threadIdx.x != 0) return;
  if (want_total) {
    double value = values[0];
    if (reduction == Reduction::Mean) value = values[1] > 0.0 ? values[0] / values[1] : 0.0;
    if (reduction == Reduction::BatchMean) value = rows > 0 ? values[0] / static_cast<double>(rows) : 0.0;
    *loss = static_cast<C>(value);
  }
  *valid_rows = values[1];
}

// ---------------------------------------------------------------- backward

struct SparseBackwardParams {
  const void* grad_output;  // compute dtype
  int64_t grad_output_stride;
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
  void* grad_student;
};

template <class SX, class C, bool kVectorized>
__global__ void __launch_bounds__(kSparseMaxBlock)
    sparse_kd_backward_kernel(SparseBackwardParams p, SparseCoefficients<double> k) {
  constexpr int kW = BatchLayout<C>::kWidth;
  const int64_t row = blockIdx.x;
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
    for (int g = threadIdx.x; g < groups; g += team) store_group<SX, C, kVectorized>(g_row, g * kW - pad, vocab, nans);
    return;
  }
  const bool tail_gradient = !ignored && (p.kd_tail || k.need_ce);

  // Ignored rows, and rows whose tail entries get no gradient (no tail bucket, no cross-entropy,
  // so no label step either): zeros first.
  if (!tail_gradient) {
    C zeros[kW];
#pragma unroll
    for (int e = 0; e < kW; ++e) zeros[e] = C(0);
    for (int g = threadIdx.x; g < groups; g += team) store_group<SX, C, kVectorized>(g_row, g * kW - pad, vocab, zeros);
    if (ignored) return;
  }

  double reduction_scale = 1.0;
  if (p.reduction == Reduction::Mean) {
    const double valid = *p.valid_rows;
    reduction_scale = valid > 0.0 ? 1.0 / valid : 0.0;
  } else if (p.reduction == Reduction::BatchMean) {
    reduction_scale = p.rows > 0 ? 1.0 / static_cast<double>(p.rows) : 0.0;
  }
  const double g = static_cast<double>(static_cast<const C*>(p.grad_output)[row * p.grad_output_stride]) * reduction_scale;
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

// ---------------------------------------------------------------- launch helpers

inline int sparse_block_size(int64_t vocab) {
  if (vocab >= 16384) return kSparseMaxBlock;
  if (vocab >= 2048) return 256;
  return 128;
}

inline size_t bitmap_bytes(int64_t vocab) { return static_cast<size_t>((vocab + 31) / 32) * sizeof(unsigned); }

inline void check_bitmap_fits(int64_t vocab, const char* function) {
  if (vocab > kCudaMaxSparseVocab) {
    throw std::invalid_argument(std::string(function) + ": vocabulary size " + std::to_string(vocab) +
                                " exceeds the kernel's limit " + std::to_string(kCudaMaxSparseVocab));
  }
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  int limit = 0;
  check_cuda(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "cudaDeviceGetAttribute");
  if (bitmap_bytes(vocab) + 4096 > static_cast<size_t>(limit)) {
    throw std::invalid_argument(std::string(function) + ": vocabulary size " + std::to_string(vocab) +
                                " needs a " + std::to_string(bitmap_bytes(vocab)) +
                                "-byte bitmap of kept tokens in shared memory; the device offers " + std::to_string(limit));
  }
}

// True when the rows of the given tensors (student; and gradient) share one pad on the 16-byte
// grid (rows_share_pad): then the kernels use 16-byte accesses per row.
template <class SX, class C>
bool rows_vectorizable(const void* student, int64_t row_stride, const void* gradient, int64_t vocab, int64_t rows) {
  const int size = static_cast<int>(sizeof(typename SX::Raw));
  const RowTensor tensors[2] = {{student, row_stride, size}, {gradient, vocab, size}};
  return rows_share_pad(tensors, gradient != nullptr ? 2 : 1, rows, kGroupWidth<C>);
}

template <class SX, class C>
void sparse_forward_typed(const SparseKDForwardArgs& args, cudaStream_t stream) {
  const SparseCoefficients<double> k = sparse::make_sparse_coefficients<double>(args.options, args.tail);
  if (args.rows > 0) {
    SparseRowParams p;
    p.student = args.student;
    p.student_row_stride = args.student_row_stride;
    p.soft_labels = args.soft_labels;
    p.labels = args.labels;
    p.rows = args.rows;
    p.vocab = static_cast<int>(args.vocab);
    p.bitmap_words = static_cast<int>((args.vocab + 31) / 32);
    p.ignore_index = args.options.ignore_index;
    p.plan = make_plan(k, args.options.temperature);
    p.temperature = args.options.temperature;
    p.write_row_losses = args.options.reduction == Reduction::None;
    p.loss = args.loss;
    p.row_stats = args.row_stats;
    if (args.rows > int64_t(0x7fffffff)) throw std::invalid_argument("sparse_kd_forward (CUDA): too many rows for one launch");
    const size_t shared_bytes = bitmap_bytes(args.vocab);
    const int block = sparse_block_size(args.vocab);
    auto launch = [&](auto kernel) {
      allow_dynamic_shared_memory(reinterpret_cast<const void*>(kernel), shared_bytes);
      kernel<<<static_cast<unsigned>(args.rows), block, shared_bytes, stream>>>(p, k);
      check_launch("sparse_kd_forward_rows_kernel");
    };
    if (rows_vectorizable<SX, C>(args.student, args.student_row_stride, nullptr, args.vocab, args.rows)) {
      launch(sparse_kd_forward_rows_kernel<SX, C, true>);
    } else {
      launch(sparse_kd_forward_rows_kernel<SX, C, false>);
    }
  }
  sparse_kd_reduce_kernel<C><<<1, kSparseReduceThreads, 0, stream>>>(
      args.row_stats, args.labels, args.rows, args.options.ignore_index, args.options.reduction,
      static_cast<C*>(args.loss), args.valid_rows);
  check_launch("sparse_kd_reduce_kernel");
}

template <class SX, class C>
void sparse_backward_typed(const SparseKDBackwardArgs& args, cudaStream_t stream) {
  if (args.rows == 0 || args.vocab == 0) return;
  const SparseCoefficients<double> k = sparse::make_sparse_coefficients<double>(args.options, args.tail);
  const SparsePlan plan = make_plan(k, args.options.temperature);
  SparseBackwardParams p;
  p.grad_output = args.grad_output;
  p.grad_output_stride = args.grad_output_stride;
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
  p.row_stats = args.row_stats;
  p.valid_rows = args.valid_rows;
  p.grad_student = args.grad_student;
  if (args.rows > int64_t(0x7fffffff)) throw std::invalid_argument("sparse_kd_backward (CUDA): too many rows for one launch");
  const int block = sparse_block_size(args.vocab);
  const bool vectorized =
      rows_vectorizable<SX, C>(args.student, args.student_row_stride, args.grad_student, args.vocab, args.rows);
  if (vectorized) {
    sparse_kd_backward_kernel<SX, C, true><<<static_cast<unsigned>(args.rows), block, 0, stream>>>(p, k);
  } else {
    sparse_kd_backward_kernel<SX, C, false><<<static_cast<unsigned>(args.rows), block, 0, stream>>>(p, k);
  }
  check_launch("sparse_kd_backward_kernel");
}

}  // namespace
}  // namespace cuda

SparseKDForwardResult sparse_kd_forward_cuda(const SparseKDForwardArgs& args, int device_index, uintptr_t stream_handle) {
  cuda::check_vocab_fits(args.vocab, "sparse_kd_forward (CUDA)");
  cuda::DeviceGuard guard(device_index);
  cuda::check_bitmap_fits(args.vocab, "sparse_kd_loss (CUDA)");
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (args.student_dtype) {
    case DType::Float32: cuda::sparse_forward_typed<cuda::Float32Storage, float>(args, stream); break;
    case DType::BFloat16: cuda::sparse_forward_typed<cuda::BFloat16Storage, float>(args, stream); break;
    case DType::Float16: cuda::sparse_forward_typed<cuda::Float16Storage, float>(args, stream); break;
    case DType::Float64: cuda::sparse_forward_typed<cuda::Float64Storage, double>(args, stream); break;
    default:
      throw std::invalid_argument("sparse_kd_forward (CUDA): unsupported student dtype code " +
                                  std::to_string(static_cast<int>(args.student_dtype)));
  }
  return SparseKDForwardResult{0, 0};  // bad rows are NaN rows, not counted (see the file comment)
}

void sparse_kd_backward_cuda(const SparseKDBackwardArgs& args, int device_index, uintptr_t stream_handle) {
  cuda::check_vocab_fits(args.vocab, "sparse_kd_backward (CUDA)");
  cuda::DeviceGuard guard(device_index);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (args.student_dtype) {
    case DType::Float32: cuda::sparse_backward_typed<cuda::Float32Storage, float>(args, stream); break;
    case DType::BFloat16: cuda::sparse_backward_typed<cuda::BFloat16Storage, float>(args, stream); break;
    case DType::Float16: cuda::sparse_backward_typed<cuda::Float16Storage, float>(args, stream); break;
    case DType::Float64: cuda::sparse_backward_typed<cuda::Float64Storage, double>(args, stream); break;
    default:
      throw std::invalid_argument("sparse_kd_backward (CUDA): unsupported student dtype code " +
                                  std::to_string(static_cast<int>(args.student_dtype)));
  }
}

}  // namespace kdfast
