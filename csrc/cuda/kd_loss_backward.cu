// CUDA backward pass of the dense KD loss: kdfast::kd_backward_cuda (declared in bindings.cpp).
// Contract: the same as kd_backward_cpu (types.h, rowmath.h): grad_student [rows, vocab]
// (contiguous, student dtype) = d loss / d student logits x grad_output, from the row_stats
// and valid_rows the forward pass wrote; grad_output and valid_rows are read on the device
// (no host synchronisation). Rows whose label is ignore_index get an all-zero gradient; rows
// with an out-of-range label have NaN statistics, so their gradient is NaN (no write outside
// the row). Everything is enqueued on `stream`, with no allocation (CUDA-graph safe).
//
// Kernel: kd_backward_kernel. The rows are cut into chunks of whole batches; a team of
// threads (32 to 256, all of a block for long rows) handles one (row, chunk) item, so that
// few long rows still spread over the whole GPU. Each element is recomputed from the saved
// maxima and log-sums (rowmath::divergence_grad for the divergence term, r - eps/V for the
// cross-entropy term, minus (1 - eps) at the label) and written once with 16-byte stores.
// Bytes per element: one read of student and teacher (no teacher when alpha == 1), one write
// of the gradient.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kd_loss_cuda_common.cuh"
#include "kdfast/kdfast.h"
#include "kdfast/rowmath.h"

namespace kdfast {
namespace cuda {
namespace {

using rowmath::Coefficients;
using rowmath::GradRow;
using rowmath::RowStats;

constexpr int kBackwardBlock = 256;
// Batches each thread handles per (row, chunk) item, at most.
constexpr int kBatchesPerChunk = 8;

struct BackwardParams {
  const void* grad_output;  // compute dtype
  int64_t grad_output_stride;
  const void* student;
  int64_t student_row_stride;
  const void* teacher;
  int64_t teacher_row_stride;
  const int64_t* labels;  // null: every row valid
  int64_t rows;
  int vocab;
  int team_size;       // threads per item: a power of two, 32 <= team_size <= kBackwardBlock
  int chunk_groups;    // groups per chunk: a multiple of kGroupsPerBatch * team_size
  int chunks_per_row;  // 1 whenever team_size < kBackwardBlock
  int64_t ignore_index;
  Reduction reduction;
  const void* row_stats;   // compute dtype, [rows, kRowStats]
  const void* valid_rows;  // compute dtype, one element
  void* grad_student;
};

// Gradient of one batch (before the label step): kd_factor dD/db + ce_factor (r - eps/V),
// element by element as chunk_grad does on the CPU.
template <Divergence D, class C>
__device__ __forceinline__ void batch_gradient(const C* s, const C* t, const GradRow<C>& g, const Coefficients<C>& k,
                                               C* out) {
  constexpr int kE = BatchLayout<C>::kElements;
  const C h = k.diff_scale, kappa = k.inv_scaled_t, inv_h = k.inv_diff_scale;
  const C max_s = g.stats.student_max * h, max_t = g.stats.teacher_max * h;
  const ScaledExp<C> exp_plain(C(1));
#pragma unroll
  for (int e = 0; e < kE; ++e) {
    const C ds = rowmath::scaled_difference(s[e], h, max_s);  // h (s - max): rowmath::difference_scale
    const C log_q = ds * kappa - g.stats.student_log_sum_T;
    // The same exp as divergence_grad uses for p, so that p and q tie exactly where they are
    // equal (the TVD gradient jumps at p == q).
    const C q = rowmath::exp_c(log_q);
    C value = C(0);
    if (k.need_kd) {
      const C dt = rowmath::scaled_difference(t[e], h, max_t);
      if constexpr (D == Divergence::ReverseKL) {
        value += rowmath::reverse_kl_grad(ds, dt, q, g.rkl_a, g.rkl_b, g.rkl_c);
      } else {
        value += g.kd_factor * rowmath::divergence_grad<D>(dt * kappa - g.stats.teacher_log_sum, log_q, q, g.stats.aux, k);
      }
    }
    if (k.need_ce) {
      const C r = k.need_student_1 ? exp_plain(ds * inv_h - g.stats.student_log_sum_1) : q;  // T == 1: r == q
      value += g.ce_factor * (r - g.smooth);
    }
    out[e] = value;
  }
}

template <class SX, class TX, class C, bool kVectorized>
__global__ void __launch_bounds__(kBackwardBlock, 1024 / kBackwardBlock)
    kd_backward_kernel(BackwardParams p, Coefficients<C> k) {
  constexpr int kW = BatchLayout<C>::kWidth;
  constexpr int kU = BatchLayout<C>::kGroups;
  constexpr int kE = BatchLayout<C>::kElements;
  const int team = p.team_size;
  const int lane = threadIdx.x & (team - 1);
  const int64_t item = static_cast<int64_t>(blockIdx.x) * (kBackwardBlock / team) + threadIdx.x / team;
  const int64_t row = p.chunks_per_row == 1 ? item : item / p.chunks_per_row;
  if (row >= p.rows) return;  // no barriers in this kernel
  const int chunk = static_cast<int>(item - row * p.chunks_per_row);
  const int vocab = p.vocab;
  const int row_groups = (vocab + kW - 1) / kW;
  const int first_group = chunk * p.chunk_groups;
  const int end_group = first_group + p.chunk_groups < row_groups ? first_group + p.chunk_groups : row_groups;
  const ThreadBatches<C> batches(vocab, first_group, end_group, team, lane);
  typename SX::Raw* g_row = static_cast<typename SX::Raw*>(p.grad_student) + row * static_cast<int64_t>(vocab);

  const int64_t label = p.labels != nullptr ? p.labels[row] : int64_t(-1);
  const C* st = static_cast<const C*>(p.row_stats) + row * kRowStats;
  const bool ignored = p.labels != nullptr && label == p.ignore_index;
  // Ignored rows get zeros; a row whose loss is NaN (a NaN input, or a bad label) gets NaN.
  if (ignored || st[kRowLossColumn] != st[kRowLossColumn]) {
    C zeros[kW];
#pragma unroll
    for (int e = 0; e < kW; ++e) zeros[e] = ignored ? C(0) : quiet_nan<C>();
    for (int b = 0; b < batches.total; ++b) {
      int first[kU];
      batches.first_elements(b, first);
#pragma unroll
      for (int u = 0; u < kU; ++u) store_group<SX, C, kVectorized>(g_row, first[u], vocab, zeros);
    }
    return;
  }

  // Per-row factors, as kd_backward_cpu computes them.
  double reduction_scale = 1.0;
  if (p.reduction == Reduction::Mean) {
    const double valid = static_cast<double>(*static_cast<const C*>(p.valid_rows));
    reduction_scale = valid > 0.0 ? 1.0 / valid : 0.0;
  } else if (p.reduction == Reduction::BatchMean) {
    reduction_scale = p.rows > 0 ? 1.0 / static_cast<double>(p.rows) : 0.0;
  }
  const double g = static_cast<double>(static_cast<const C*>(p.grad_output)[row * p.grad_output_stride]) * reduction_scale;
  const GradRow<C> grad_row = rowmath::make_grad_row(g, k, RowStats<C>{st[0], st[1], st[2], st[3], st[4], st[5]},
                                                     static_cast<int64_t>(vocab));
  const C label_step = grad_row.label_step;
  const bool step_at_label = k.need_ce && p.labels != nullptr;

  const typename SX::Raw* s_row = static_cast<const typename SX::Raw*>(p.student) + row * p.student_row_stride;
  const typename TX::Raw* t_row = static_cast<const typename TX::Raw*>(p.teacher) + row * p.teacher_row_stride;
  stream_batches<SX, TX, C, kVectorized>(
      s_row, t_row, vocab, batches, k.need_kd, [&](const C* s, const C* t, const int* first, auto) {
        C out[kE];
        switch (k.divergence) {
          case Divergence::ForwardKL: batch_gradient<Divergence::ForwardKL>(s, t, grad_row, k, out); break;
          case Divergence::ReverseKL: batch_gradient<Divergence::ReverseKL>(s, t, grad_row, k, out); break;
          case Divergence::JSD: batch_gradient<Divergence::JSD>(s, t, grad_row, k, out); break;
          default: batch_gradient<Divergence::TVD>(s, t, grad_row, k, out); break;
        }
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          if (step_at_label) {
            const int64_t offset = label - first[u];
            if (offset >= 0 && offset < kW) {
#pragma unroll
              for (int e = 0; e < kW; ++e) {
                if (e == offset) out[u * kW + e] -= label_step;
              }
            }
          }
          store_group<SX, C, kVectorized>(g_row, first[u], vocab, out + u * kW);
        }
      });
}

// Threads per item: enough that each thread handles about two batches, between a warp and a block.
template <class C>
int backward_team_size(int64_t vocab) {
  const int64_t groups = ceil_div(vocab, kGroupWidth<C>);
  const int64_t wanted = next_power_of_two(ceil_div(groups, 2 * kGroupsPerBatch<C>));
  return static_cast<int>(wanted < 32 ? 32 : (wanted > kBackwardBlock ? kBackwardBlock : wanted));
}

template <class SX, class TX, class C>
void backward_typed(const KDBackwardArgs& args, cudaStream_t stream) {
  if (args.rows == 0 || args.vocab == 0) return;
  const Coefficients<C> k = rowmath::make_coefficients<C>(args.options, args.vocab);
  BackwardParams params;
  params.grad_output = args.grad_output;
  params.grad_output_stride = args.grad_output_stride;
  params.student = args.student;
  params.student_row_stride = args.student_row_stride;
  params.teacher = args.teacher;
  params.teacher_row_stride = args.teacher_row_stride;
  params.labels = args.labels;
  params.rows = args.rows;
  params.vocab = static_cast<int>(args.vocab);
  params.team_size = backward_team_size<C>(args.vocab);
  params.chunk_groups = params.team_size * kGroupsPerBatch<C> * kBatchesPerChunk;
  const int64_t row_groups = ceil_div(args.vocab, kGroupWidth<C>);
  params.chunks_per_row = static_cast<int>(ceil_div(row_groups, params.chunk_groups));
  params.ignore_index = args.options.ignore_index;
  params.reduction = args.options.reduction;
  params.row_stats = args.row_stats;
  params.valid_rows = args.valid_rows;
  params.grad_student = args.grad_student;

  const int64_t items = args.rows * params.chunks_per_row;
  const int64_t blocks = ceil_div(items, kBackwardBlock / params.team_size);
  if (blocks > int64_t(0x7fffffff)) throw std::invalid_argument("kd_backward_cuda: too many rows for one launch");
  const bool vectorized =
      rows_are_16_byte_aligned(args.student, args.student_row_stride, sizeof(typename SX::Raw)) &&
      rows_are_16_byte_aligned(args.grad_student, args.vocab, sizeof(typename SX::Raw)) &&
      (!k.need_kd || rows_are_16_byte_aligned(args.teacher, args.teacher_row_stride, sizeof(typename TX::Raw)));
  if (vectorized) {
    kd_backward_kernel<SX, TX, C, true><<<static_cast<unsigned>(blocks), kBackwardBlock, 0, stream>>>(params, k);
  } else {
    kd_backward_kernel<SX, TX, C, false><<<static_cast<unsigned>(blocks), kBackwardBlock, 0, stream>>>(params, k);
  }
  check_launch("kd_backward_kernel");
}

template <class SX>
void backward_with_teacher(const KDBackwardArgs& args, cudaStream_t stream) {
  switch (args.teacher_dtype) {
    case DType::Float32: return backward_typed<SX, Float32Storage, float>(args, stream);
    case DType::BFloat16: return backward_typed<SX, BFloat16Storage, float>(args, stream);
    case DType::Float16: return backward_typed<SX, Float16Storage, float>(args, stream);
    default: break;
  }
  throw std::invalid_argument("kd_backward_cuda: unsupported teacher dtype code " +
                              std::to_string(static_cast<int>(args.teacher_dtype)));
}

}  // namespace
}  // namespace cuda

void kd_backward_cuda(const KDBackwardArgs& args, int device_index, uintptr_t stream_handle) {
  cuda::check_vocab_fits(args.vocab, "kd_backward_cuda");
  cuda::DeviceGuard guard(device_index);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (args.student_dtype) {
    case DType::Float64:
      if (args.teacher_dtype != DType::Float64) {
        throw std::invalid_argument("kd_backward_cuda: float64 student logits need float64 teacher logits");
      }
      cuda::backward_typed<cuda::Float64Storage, cuda::Float64Storage, double>(args, stream);
      break;
    case DType::Float32: cuda::backward_with_teacher<cuda::Float32Storage>(args, stream); break;
    case DType::BFloat16: cuda::backward_with_teacher<cuda::BFloat16Storage>(args, stream); break;
    case DType::Float16: cuda::backward_with_teacher<cuda::Float16Storage>(args, stream); break;
    default:
      throw std::invalid_argument("kd_backward_cuda: unsupported student dtype code " +
                                  std::to_string(static_cast<int>(args.student_dtype)));
  }
}

}  // namespace kdfast
