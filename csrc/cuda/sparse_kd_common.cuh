// What the sparse-loss CUDA kernels share (sparse_kd_loss.cu: forward and the loss reduction;
// sparse_kd_backward.cu: backward): block sizes and constants, the plan of what a call streams
// from the student row, the block-wide double reductions, the launch helpers (threads per row,
// the vector-path test). Contract: types.h (SparseKDForwardArgs / SparseKDBackwardArgs) and the
// file comment of sparse_kd_loss.cu. Everything here is in an anonymous namespace, one copy per
// kernel file.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "kd_loss_cuda_common.cuh"
#include "kdfast/sparse_rowmath.h"
#include "kdfast/types.h"

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

// Block-wide reductions of N doubles (every thread ends with the result; fixed order).
template <int N>
struct BlockScratch {
  double values[kSparseWarps][N];
};

template <int N, class Op>
__device__ __forceinline__ void block_reduce(double (&values)[N], BlockScratch<N>& scratch, Op op) {
  team_all_reduce(values, scratch.values, static_cast<int>(blockDim.x), op);
}

// ---------------------------------------------------------------- launch helpers

inline int sparse_block_size(int64_t vocab) {
  if (vocab >= 16384) return kSparseMaxBlock;
  if (vocab >= 2048) return 256;
  return 128;
}

// True when the rows of the given tensors (student; and gradient) share one pad on the 16-byte
// grid (rows_share_pad): then the kernels use 16-byte accesses per row.
template <class SX, class C>
bool rows_vectorizable(const void* student, int64_t row_stride, const void* gradient, int64_t vocab, int64_t rows) {
  const int size = static_cast<int>(sizeof(typename SX::Raw));
  const RowTensor tensors[2] = {{student, row_stride, size}, {gradient, vocab, size}};
  return rows_share_pad(tensors, gradient != nullptr ? 2 : 1, rows, kGroupWidth<C>);
}

}  // namespace
}  // namespace cuda
}  // namespace kdfast
