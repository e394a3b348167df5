// CUDA backward kernel of the sparse KD loss against top-k soft labels:
// kdfast::sparse_kd_backward_cuda (declared in bindings.cpp). Contract and design:
// sparse_kd_loss.cu's file comment (row_stats as its forward pass writes them; the student
// gradient [rows, vocab] contiguous in the student dtype, multiplied by grad_output). One block
// per row runs sparse_row_gradient (sparse_kd_gradient.cuh, shared with the one-pass kernel):
// it streams the row once and writes every gradient element once by the tail formula, then
// overwrites the k kept positions with their own gradient after a block barrier. With
// skip_unit_rows (the backward pass after the one-pass forward) a row whose grad_output is 1
// keeps the gradient the forward wrote; the others are recomputed exactly, so nothing reads
// grad_output on the host.
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "kd_loss_cuda_common.cuh"
#include "sparse_kd_common.cuh"
#include "sparse_kd_gradient.cuh"
#include "kdfast/kdfast.h"
#include "kdfast/sparse_rowmath.h"

namespace kdfast {
namespace cuda {
namespace {

// The row's gradient (sparse_kd_gradient.cuh) for its grad_output times the reduction's scale;
// with skip_unit_rows (after the one-pass forward) a row whose grad_output is 1 is left as it is.
// grad_output == nullptr stands for 1 (the forward's fallback for the one-pass gradient).
struct SparseBackwardParams {
  SparseGradientParams rows;
  const void* grad_output;  // compute dtype, or nullptr: 1
  int64_t grad_output_stride;
  bool skip_unit_rows;
};

template <class SX, class C, bool kVectorized>
__global__ void __launch_bounds__(kSparseMaxBlock)
    sparse_kd_backward_kernel(SparseBackwardParams p, SparseCoefficients<double> k) {
  const int64_t row = blockIdx.x;
  const double grad_output =
      p.grad_output != nullptr
          ? static_cast<double>(static_cast<const C*>(p.grad_output)[row * p.grad_output_stride])
          : 1.0;
  if (p.skip_unit_rows && grad_output == 1.0) return;  // the one-pass kernel already wrote this row
  const double g = grad_output * reduction_scale<double>(p.rows.reduction, p.rows.valid_rows, p.rows.rows);
  sparse_row_gradient<SX, C, kVectorized>(p.rows, k, row, g);
}

template <class SX, class C>
void sparse_backward_typed(const SparseKDBackwardArgs& args, cudaStream_t stream) {
  if (args.rows == 0 || args.vocab == 0) return;
  const SparseCoefficients<double> k = sparse::make_sparse_coefficients<double>(args.options, args.tail);
  SparseBackwardParams p;
  p.rows = make_gradient_params(args, k, args.row_stats, args.valid_rows, args.grad_student);
  p.grad_output = args.grad_output;
  p.grad_output_stride = args.grad_output_stride;
  p.skip_unit_rows = args.skip_unit_rows;
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
