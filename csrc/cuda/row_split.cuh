// How the multi-teacher kernels (multi_teacher.cu) walk a thread's batches of a row, and how
// the sparse forward kernel (sparse_kd_loss.cu) cuts a row into bitmap windows; host-callable,
// so that tests/functional/cuda_multi_sparse_replay.cu replays the same code on the CPU.
// Contract: with ThreadBatches (kd_loss_cuda_layout.cuh) a thread visits batches 0..total-1 of
// its range; batch b is loaded element by element (it reaches outside the row: the head batch
// or the tail) exactly when batch_is_partial, else with 16-byte loads. A row of `groups`
// groups is cut into windows of window_groups groups (the last one shorter): window [g_lo,
// g_hi) covers the row elements [lo, hi), lo = g_lo W - pad except 0 for the first window
// (whose head group starts before the row), hi = g_hi W - pad except vocab for the last, so
// that the windows cover every row element once and group g of the window starts at bit
// g W - pad - lo of the window's bitmap.
#pragma once

#include <cuda_runtime.h>

#include "kd_loss_cuda_layout.cuh"

namespace kdfast {
namespace cuda {

template <class C>
__host__ __device__ __forceinline__ bool batch_is_partial(const ThreadBatches<C>& batches, int batch) {
  return batch < batches.begin || batch >= batches.full;
}

struct RowWindow {
  int g_hi;  // end group of the window
  int lo;    // first row element of the window (bit 0 of its bitmap)
  int hi;    // end row element of the window
};

__host__ __device__ __forceinline__ RowWindow row_window(int g_lo, int groups, int window_groups, int pad, int vocab,
                                                         int width) {
  RowWindow w;
  w.g_hi = groups - g_lo > window_groups ? g_lo + window_groups : groups;
  w.lo = g_lo == 0 ? 0 : g_lo * width - pad;
  w.hi = w.g_hi == groups ? vocab : w.g_hi * width - pad;
  return w;
}

}  // namespace cuda
}  // namespace kdfast
