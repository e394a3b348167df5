// CUDA backward kernel of the sparse KD loss against top-k soft labels:
// kdfast::sparse_kd_backward_cuda (declared in bindings.cpp). Contract and design:
// sparse_kd_loss.cu's file comment (row_stats as its forward pass writes them; the student
// gradient [rows, vocab] contiguous in the student dtype, multiplied by grad_output). One block
// per row streams the row once and writes every gradient element once by the tail formula
// (16-byte stores when the student and gradient rows share one pad), then overwrites the k kept
// positions with their own gradient after a block barrier.
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "kd_loss_cuda_common.cuh"
#include "sparse_kd_common.cuh"
#include "kdfast/kdfast.h"
#include "kdfast/sparse_rowmath.h"

namespace kdfast {
namespace cuda {
namespace {

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

  const double g = static_cast<double>(static_cast<const C*>(p.grad_output)[row * p.grad_output_stride]) *
                   reduction_scale<double>(p.reduction, p.valid_rows, p.rows);  // valid_rows: float64
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
