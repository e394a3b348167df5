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
// few long rows still spread over the whole GPU. With skip_unit_rows (after the one-pass
// kernel, which wrote every row's gradient for grad_output = 1) a row whose grad_output is 1
// is left as it is, so the usual loss.backward() costs no pass and no host synchronisation.
// Each element is recomputed from the saved maxima and log-sums (write_row_gradient,
// kd_loss_cuda_gradient.cuh; batch_gradient, kd_loss_cuda_rows.cuh: forward_kl q - p and reverse_kl
// with one FMA and a hardware exp2 per probability, reverse_kl's bracket in float math from the
// row's offsets, rowmath::divergence_grad for JSD and TVD, r - eps/V for the cross-entropy term,
// minus (1 - eps) at the label) and written once with 16-byte stores (scalar head and tail per
// row, kd_loss_cuda_layout.cuh). In place (grad_student == student) the loads are plain loads,
// not read-only-cache loads, since the kernel writes the memory it reads.
// Bytes per element: one read of student and teacher (no teacher when alpha == 1), one write
// of the gradient.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kd_loss_cuda_common.cuh"
#include "kd_loss_cuda_gradient.cuh"
#include "kd_loss_cuda_rows.cuh"
#include "kdfast/kdfast.h"
#include "kdfast/rowmath.h"

namespace kdfast {
namespace cuda {
namespace {

using rowmath::Coefficients;
using rowmath::GradRow;
using rowmath::RowStats;

// Resident 256-thread blocks per multiprocessor the register budget is sized for: two (up to
// 128 registers; ptxas uses about 94-118 and spills nothing). Three (80 registers) spill in
// the float32 and bfloat16 hot loops (benches/cuda_resources.py), four (64) spill everywhere.
constexpr int kBackwardMinBlocks = 2;

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
  bool skip_unit_rows;  // rows whose grad_output is 1 already hold their gradient (one-pass)
};

// kVectorized: rows on the 16-byte group grid (kd_loss_cuda_layout.cuh); kReadOnlyCache:
// loads through the non-coherent read-only path, only when grad_student does not alias the
// student logits (the in-place backward writes memory it reads).
template <class SX, class TX, class C, bool kVectorized, bool kReadOnlyCache>
__global__ void __launch_bounds__(kBackwardBlock, kBackwardMinBlocks)
    kd_backward_kernel(BackwardParams p, Coefficients<C> k) {
  constexpr int kW = BatchLayout<C>::kWidth;
  const int team = p.team_size;
  const int lane = threadIdx.x & (team - 1);
  const int64_t item = static_cast<int64_t>(blockIdx.x) * (kBackwardBlock / team) + threadIdx.x / team;
  const int64_t row = p.chunks_per_row == 1 ? item : item / p.chunks_per_row;
  if (row >= p.rows) return;  // no barriers in this kernel
  const int chunk = static_cast<int>(item - row * p.chunks_per_row);
  const int vocab = p.vocab;
  // Vectorised: the gradient, student and (when read) teacher rows share one pad (host-checked).
  const GradientRows<SX, TX> rows = gradient_rows<SX, TX, C, kVectorized>(
      p.grad_student, p.student, p.student_row_stride, p.teacher, p.teacher_row_stride, row, vocab, k);
  // Chunks are counted on the grid of the largest pad (host), so the last ones may be empty.
  const int row_groups = (vocab + rows.pad + kW - 1) / kW;
  const int first_group = chunk * p.chunk_groups;
  const int end_group = first_group + p.chunk_groups < row_groups ? first_group + p.chunk_groups : row_groups;
  const ThreadBatches<C> batches(vocab, rows.pad, first_group, end_group, team, lane);

  const int64_t label = p.labels != nullptr ? p.labels[row] : int64_t(-1);
  const C* st = static_cast<const C*>(p.row_stats) + row * kRowStats;
  const bool ignored = p.labels != nullptr && label == p.ignore_index;
  const C grad_output = static_cast<const C*>(p.grad_output)[row * p.grad_output_stride];
  // The one-pass kernel already wrote this row's gradient for grad_output = 1.
  if (p.skip_unit_rows && grad_output == C(1)) return;
  const double g = static_cast<double>(grad_output) * reduction_scale<C>(p.reduction, p.valid_rows, p.rows);
  write_row_gradient<SX, TX, C, kVectorized, kReadOnlyCache>(rows.g, rows.s, rows.t, vocab, batches, st, ignored,
                                                             label, p.labels != nullptr, g, k);
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
  const BackwardChunks chunks = backward_chunks<C>(args.vocab);
  params.team_size = chunks.team_size;
  params.chunk_groups = chunks.chunk_groups;
  params.chunks_per_row = chunks.chunks_per_row;
  params.ignore_index = args.options.ignore_index;
  params.reduction = args.options.reduction;
  params.row_stats = args.row_stats;
  params.valid_rows = args.valid_rows;
  params.grad_student = args.grad_student;
  params.skip_unit_rows = args.skip_unit_rows;

  const int64_t items = args.rows * params.chunks_per_row;
  const int64_t blocks = ceil_div(items, kBackwardBlock / params.team_size);
  if (blocks > int64_t(0x7fffffff)) throw std::invalid_argument("kd_backward_cuda: too many rows for one launch");
  // Per-row 16-byte accesses unless the rows sit differently on the 16-byte grid. In place
  // (the gradient overwrites the student logits) the loads must not use the read-only path.
  const int size_s = static_cast<int>(sizeof(typename SX::Raw)), size_t_ = static_cast<int>(sizeof(typename TX::Raw));
  const RowTensor tensors[3] = {{args.grad_student, args.vocab, size_s},
                                {args.student, args.student_row_stride, size_s},
                                {args.teacher, args.teacher_row_stride, size_t_}};
  const bool vectorized = rows_share_pad(tensors, k.need_kd ? 3 : 2, args.rows, kGroupWidth<C>);
  const auto address = [](const void* x) { return reinterpret_cast<uintptr_t>(x); };
  const uintptr_t s_end = address(args.student) + static_cast<uintptr_t>((args.rows - 1) * args.student_row_stride + args.vocab) * size_s;
  const uintptr_t g_end = address(args.grad_student) + static_cast<uintptr_t>(args.rows * args.vocab) * size_s;
  const bool in_place = address(args.grad_student) < s_end && address(args.student) < g_end;  // overlapping
  const unsigned grid = static_cast<unsigned>(blocks);
  if (vectorized && !in_place) {
    kd_backward_kernel<SX, TX, C, true, true><<<grid, kBackwardBlock, 0, stream>>>(params, k);
  } else if (vectorized) {
    kd_backward_kernel<SX, TX, C, true, false><<<grid, kBackwardBlock, 0, stream>>>(params, k);
  } else {  // rare (rows off each other's grid): plain loads, safe in place too
    kd_backward_kernel<SX, TX, C, false, false><<<grid, kBackwardBlock, 0, stream>>>(params, k);
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
