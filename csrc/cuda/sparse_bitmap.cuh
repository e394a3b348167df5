// The kept-token bitmap of the sparse CUDA kernels (sparse_kd_loss.cu): bit i of word i / 32
// is set when row element i is one of the row's k kept indices. kept_bits reads the bits of one
// group of 8 consecutive row elements starting at any element `first` of the group grid
// (kd_loss_cuda_common.cuh): first may be negative (the head group, up to 7 elements before the
// row start; those bits are 0) and need not be a multiple of 8 (then the group may straddle two
// words). Host-callable, so that tests/functional/cuda_indexing_replay.cu checks it against a
// bit-by-bit lookup.
#pragma once

#include <cuda_runtime.h>

namespace kdfast {
namespace cuda {

// Bits e = 0..7: element first + e is kept. `words` = the bitmap's length in 32-bit words.
__host__ __device__ __forceinline__ unsigned kept_bits(const unsigned* bitmap, int words, int first) {
  if (first < 0) return bitmap[0] << (-first);
  const int word = first >> 5, shift = first & 31;
  unsigned bits = bitmap[word] >> shift;
  if (shift > 24 && word + 1 < words) bits |= bitmap[word + 1] << (32 - shift);
  return bits;
}

}  // namespace cuda
}  // namespace kdfast
